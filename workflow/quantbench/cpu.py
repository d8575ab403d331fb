"""What this machine's CPU computes natively, and the compute dtype each CPU path takes from it.

torch computes bfloat16 at full speed on a CPU only where it has the instructions for it (AVX512-BF16,
AMX); float16 likewise (AVX512-FP16, AMX-FP16). Elsewhere (most laptops, many servers: AVX2 only) it
emulates them: a 2048x576 @ 576x1536 matmul took 0.052 s in float32 and 2.8 s in bfloat16 on one such
machine. Whether a half type is native is measured here, once per process, by timing it against
float32 (so an ISA cap such as ONEDNN_MAX_CPU_ISA counts too), never assumed; QUANTBENCH_CPU_HALF
overrides the measurement (tests exercise both paths on any machine with it).
"""
from __future__ import annotations

import functools
import os
import time

OVERRIDE = "QUANTBENCH_CPU_HALF"  # "bfloat16", "float16", "both" or "none": the half types to take as native
HALVES = ("bfloat16", "float16")  # in order of preference: bfloat16 keeps float32's range
# The /proc/cpuinfo flags that decide how fast a CPU computes each dtype, shown in every row
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "bf16", "fphp")
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")  # oneDNN's and ATen's caps on the vector ISA they use
EMULATED = 4.0  # a half type this many times slower than float32 is emulated (native: ~0.1-1x; emulated: 30-60x)


@functools.cache
def native_halves() -> tuple[str, ...]:
    """The half types torch computes natively on this CPU, bfloat16 first."""
    given = os.environ.get(OVERRIDE)
    if given is not None:
        allowed = {"none": (), "both": HALVES, **{h: (h,) for h in HALVES}}
        if given not in allowed:
            raise ValueError(f"{OVERRIDE}={given!r}: use one of {sorted(allowed)}")
        return allowed[given]
    return tuple(h for h in HALVES if _slowdown(h) < EMULATED)


def _slowdown(half: str) -> float:
    """How many times longer a matmul takes in `half` than in float32 on one thread (best of a few)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        times = {}
        for dtype in (torch.float32, getattr(torch, half)):
            x, y = a.to(dtype), b.to(dtype)
            x @ y  # warm-up
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                x @ y
                best = min(best, time.perf_counter() - start)
            times[dtype] = best
        return times[getattr(torch, half)] / times[torch.float32]
    finally:
        torch.set_num_threads(threads)


def compute_dtype(wanted: str) -> str:
    """`wanted` where this CPU computes it natively (float32 always), else float32."""
    return wanted if wanted == "float32" or wanted in native_halves() else "float32"


def half(preferred: str | None = None) -> str | None:
    """A half type this CPU computes natively, `preferred` where it is one; None where neither is."""
    native = native_halves()
    return preferred if preferred in native else (native[0] if native else None)


@functools.cache
def describe() -> dict:
    """The CPU as every row records it: its model name, the flags that decide its dtypes' speed, and
    which half types it computes natively (measured, or as QUANTBENCH_CPU_HALF said)."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "CPU part") and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the platform's own word
        import platform

        model = platform.processor() or platform.machine()
    import torch

    caps = {k: os.environ[k] for k in ISA_CAPS if k in os.environ}
    return {"cpu": model, "cpu_flags": [f for f in FLAGS if f in flags], "cpu_native_half": list(native_halves()),
            "cpu_half_decided_by": OVERRIDE if os.environ.get(OVERRIDE) is not None else "measured",
            # the vector ISA torch's own kernels run, and any cap set on it (a cap makes a CPU compute as an older one)
            "cpu_torch_isa": torch.backends.cpu.get_cpu_capability(), "cpu_isa_caps": caps or None}
