"""The gptq, awq, rtn and autoround methods' module: packed checkpoints through GPTQModel (the
maintained successor of AutoGPTQ and AutoAWQ), quantized once and loaded back to be evaluated. RTN uses
the same packing and kernels as GPTQ, so the two differ only in how the weights were rounded —
the baseline the GPTQ and AWQ papers compare against. AutoRound quantizes through auto-round
(autoround.py) into GPTQ's format, and is loaded back the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from . import architecture, cpu, failures, io, support
from .sources import trusts_remote_code


def quantize_config(method: str, params: dict):
    from gptqmodel import AWQConfig, GPTQConfig, RTNConfig

    if method == "gptq":
        return GPTQConfig(bits=params["bits"], group_size=params["group_size"], desc_act=params["desc_act"],
                          sym=params["sym"], damp_percent=params["damp"])
    if method == "awq":  # GEMM layout with zero points: what transformers and vLLM's "awq" load
        return AWQConfig(bits=params["bits"], group_size=params["group_size"], sym=not params["zero_point"])
    if method == "rtn":
        return RTNConfig(bits=params["bits"], group_size=params["group_size"], sym=params["sym"])
    raise ValueError(f"no GPTQModel method {method!r}")


def quantize(method: str, params: dict, hf_dir: str, calib_ids: str | None, out_dir: str, threads: int) -> dict:
    import torch

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(threads))
    torch.set_num_threads(threads)
    if method == "autoround":
        from . import autoround

        return measured(autoround.quantize(params, hf_dir, calib_ids, out_dir), threads)
    from gptqmodel import BACKEND, GPTQModel

    if problem := support.gptqmodel(hf_dir, io.read_json(Path(hf_dir) / "config.json")):  # a downloaded model
        raise ValueError(problem)
    calibration = None
    if calib_ids:
        samples = np.load(calib_ids)
        calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in samples]
    cuda = torch.cuda.is_available()
    stored = stored_dtype(hf_dir) or "float16"
    # GPTQModel picks bfloat16 on any CPU; where the CPU emulates it, quantizing takes float32 (and saves the
    # weights it leaves unquantized in the model's own dtype again: the checkpoint is the same either way)
    dtype = {} if cuda else {"dtype": getattr(torch, cpu.compute_dtype(stored))}
    t0 = time.perf_counter()
    model = GPTQModel.load(hf_dir, quantize_config(method, params), trust_remote_code=trusts_remote_code(hf_dir),
                           **dtype)
    kwargs = {}
    if method == "awq" and not cuda:
        kwargs["backend"] = BACKEND.AWQ_TORCH  # AWQ's default kernels need CUDA
        if dtype["dtype"] == torch.float32:
            _awq_in_float32()
    model.quantize(calibration, batch_size=1, **kwargs)
    quantize_s = time.perf_counter() - t0
    if not cuda:
        _unquantized_to(model.model, getattr(torch, stored))
    with io.atomic_path(out_dir) as staging:
        model.save(str(staging))
    return measured({"quantize_s": quantize_s, "quantize_dtype": str(model.model.dtype if cuda else dtype["dtype"])
                     .removeprefix("torch.")}, threads)


def _awq_in_float32() -> None:
    """GPTQModel 7.6's AWQ as it works in float16 and bfloat16, in float32 (this child process only):
    - its kernel's dtype check refuses float32, though its pack() stores float16 scales from it;
    - its scale search keeps a master copy of each weight as `w.detach().to(torch.float32).cpu().contiguous()`,
      which for a contiguous float32 weight on the CPU is the weight itself: every grid point then starts from
      the last one's quantized weights (ppl 5e6 on SmolLM2). The search is recompiled from its own source with
      that copy made a copy (`.clone()`), nothing else changed."""
    import inspect
    import textwrap

    import torch
    from gptqmodel.looper import awq_processor
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    AwqTorchLinear.SUPPORTS_DTYPES = [*AwqTorchLinear.SUPPORTS_DTYPES, torch.float32]
    source = textwrap.dedent(inspect.getsource(awq_processor.AWQProcessor._compute_best_scale))
    aliasing = "fc.weight.detach().to(torch.float32).cpu().contiguous()"
    if source.count(aliasing) != 1:
        raise RuntimeError("GPTQModel's AWQ scale search is not the one quantbench corrects for float32: "
                           "quantize AWQ on a CPU that computes bfloat16 natively, or on a GPU")
    namespace = dict(vars(awq_processor))
    exec(compile(source.replace(aliasing, aliasing.replace(".contiguous()", ".clone()")),  # noqa: S102
                 awq_processor.__file__, "exec"), namespace)
    awq_processor.AWQProcessor._compute_best_scale = namespace["_compute_best_scale"]


def _unquantized_to(model, dtype) -> None:
    """The weights quantization left as they were (embeddings, norms, head) back in `dtype`; the packed
    layers keep theirs (scales in float16)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    for module in model.modules():
        if not isinstance(module, BaseQuantLinear):
            module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
    model.config.dtype = dtype


def stored_dtype(model_dir: str) -> str | None:
    return architecture.stored_dtype(io.read_json(Path(model_dir) / "config.json"))


def measured(info: dict, threads: int) -> dict:
    """A quantization's record with the threads, peak memory and device it took."""
    import torch

    return {
        **info,
        "quantize_threads": threads,
        "quantize_peak_rss_mb": io.peak_rss_mb(),
        "quantize_peak_vram_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "quantize_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def quantize_isolated(method: str, params: dict, hf_dir: str, calib_ids: str | None, out_dir: str,
                      threads: int) -> dict:
    """quantize() in a child process: GPTQModel's worker threads can turn a caught error into a
    failed exit of the whole interpreter, so the outcome is read from the child, not trusted to it.
    The child works in a scratch directory until it exits: GPTQModel's threads write ./logs."""
    hf_dir, out_dir = str(Path(hf_dir).resolve()), str(Path(out_dir).resolve())
    calib_ids = calib_ids and str(Path(calib_ids).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "info.json"
        args = [json.dumps([method, params, hf_dir, calib_ids, out_dir, threads]), str(result)]
        proc = subprocess.Popen([sys.executable, "-m", "quantbench.packed", *args], stderr=subprocess.PIPE,
                                cwd=tmp)
        tail = b""
        while chunk := os.read(proc.stderr.fileno(), 1 << 16):  # GPTQModel's progress reaches the job log as it comes
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-(1 << 20):]  # enough for the last error line
        proc.wait()
        if proc.returncode == 0 and result.is_file():
            return json.loads(result.read_text())
    raise failures.from_exit(proc.returncode, failures.error_line(tail.decode(errors="replace")))


def run(cell: dict, hf_dir: str, calib_ids: str | None, calib_meta: str | None, out_dir: str, info_file: str,
        threads: int) -> None:
    """Quantize one cell into out_dir and record how it went in info_file. A deterministic failure is
    recorded, not raised: the cell's evaluation turns it into a failed row. A transient one fails the job."""
    try:
        info = {"status": "ok", **quantize_isolated(cell["method"], cell["params"], hf_dir, calib_ids, out_dir,
                                                    threads)}
    except Exception as exc:  # noqa: BLE001 - recorded; the evaluation turns it into a failed row
        if failures.is_transient(exc):
            raise
        traceback.print_exc()
        info = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    if calib_meta:
        info["calibration"] = io.read_json(calib_meta)
    io.write_json(info_file, info)


def load(method: str, model_dir: str, kernel: str, trust_remote_code: bool = False):
    """A checkpoint loaded back by GPTQModel with `kernel`, and how it computes: the kernel classes it uses.

    On a CPU, GPTQModel's kernels compute in float16 or bfloat16 only: they run where the CPU computes one
    natively, eagerly (GPTQModel would torch.compile each layer's dequantization: minutes of recompiles
    on a CPU, for a few percent). Where it computes neither, each packed layer becomes a float32 Linear
    holding its exact dequantized weights (`dequantized`): the checkpoint's numbers, at float32's speed."""
    import torch
    from gptqmodel import GPTQModel

    cuda = torch.cuda.is_available()
    if not cuda and kernel not in ("auto", "torch"):
        from .backends import Skipped

        raise Skipped(f"GPTQModel's {kernel} kernel needs CUDA, and this machine has none")
    kwargs = {"backend": backend(method, kernel, cuda), "trust_remote_code": trust_remote_code}
    if cuda:
        model = GPTQModel.load(model_dir, device="cuda", **kwargs).model
        return model, kernel_classes(model)
    stored = stored_dtype(model_dir)
    half = cpu.half(stored)
    # float32 weights load in float16 (GPTQModel's CPU kernels take no float32): their packed layers keep float16 scales
    model = GPTQModel.load(model_dir, device="cpu", dtype=getattr(torch, half or _half_of(stored)), **kwargs).model
    used = kernel_classes(model)
    if half:
        _eager(model)
        return model, used
    dequantized(model)
    return model.float(), f"float32 Linear (dequantized {used})"


def _half_of(stored: str | None) -> str:
    return stored if stored in cpu.HALVES else "float16"


def kernel_classes(model) -> str | None:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return ",".join(sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})) or None


def _eager(model) -> None:
    """GPTQModel's layers with their own dequantization, not the torch.compile wrapper it set on them."""
    for module in model.modules():
        module.__dict__.pop("dequantize_weight", None)


def dequantized(model) -> None:
    """Each GPTQModel layer of `model` replaced by a float32 torch Linear holding its exact weights:
    scale x (q - zero), unpacked by GPTQModel's own code with the scales in float32, where float16 scales
    times small integers are exact."""
    import torch
    from gptqmodel.nn_modules.qlinear import AWQuantLinear, BaseQuantLinear, PackableQuantLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseQuantLinear):
            continue
        scales = module.scales
        if isinstance(module, AWQuantLinear):
            weight = dequantize_gemm(module.qweight, module.qzeros, scales.float(), module.bits, module.group_size)
        else:
            module.scales = scales.float()
            weight = PackableQuantLinear.dequantize_weight(module)  # [in, out]
            module.scales = scales
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.data = weight.float().t().contiguous()
        if module.bias is not None:
            linear.bias.data = module.bias.float()
        model.set_submodule(name, linear)


def backend(method: str, kernel: str, cuda: bool):
    """GPTQModel's BACKEND for a kernel name. `auto` on a CPU is the plain torch kernel: GPTQModel's
    packed-int4 CPU kernels need in_features divisible by the group size, and it has no such limit
    (it runs in bf16). RTN and AutoRound checkpoints are in GPTQ's format."""
    from gptqmodel import BACKEND

    if kernel == "auto":
        return BACKEND.AUTO if cuda else BACKEND.TORCH
    names = {"gptq": {"torch": "GPTQ_TORCH", "triton": "GPTQ_TRITON", "marlin": "GPTQ_MARLIN", "exllama_v2": "GPTQ_EXLLAMA_V2"},
             "awq": {"torch": "AWQ_TORCH", "triton": "AWQ_GEMM_TRITON", "marlin": "AWQ_MARLIN", "exllama_v2": "AWQ_EXLLAMA_V2"}}
    return BACKEND[names["awq" if method == "awq" else "gptq"][kernel]]


if __name__ == "__main__":
    info = quantize(*json.loads(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(info))
