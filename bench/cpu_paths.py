"""How fast a packed checkpoint scores on this CPU by each path quantbench can take: GPTQModel's torch kernel
in bfloat16 (eager) and the checkpoint's dequantized weights in float32, each on the CPU as it is and with
torch held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2: how a CPU without AVX512-BF16 or AMX
computes), in one run so that the ratios compare like with like; and, as it is, the kernel path with
GPTQModel's own torch.compile, which quantbench turns off on a CPU. Each cell is its own process; the mean
log-probability of the scored tokens is printed beside the speed, so a faster path is seen to give the
same numbers.

    .venv/bin/snakemake --workflow-profile workflow/profiles/default   # the default run makes the checkpoint
    .venv/bin/python bench/cpu_paths.py [--checkpoint results/smollm2-135m/rtn/w4g128/model] [--tokens 128]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
# (path, QUANTBENCH_CPU_HALF, GPTQModel's torch.compile on): quantbench's two paths, and GPTQModel's default
PATHS = [("kernel, bfloat16", "bfloat16", False), ("kernel, bfloat16, compiled", "bfloat16", True),
         ("dequantized, float32", "none", False)]

CHILD = """
import json, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from quantbench import cpu, packed
checkpoint, tokens, n, compiled = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[6] == "1"
torch.set_num_threads(int(sys.argv[5]))
ids = torch.from_numpy(np.load(tokens)[:n].astype(np.int64))[None]
model, kernel = packed.load("rtn", checkpoint, "auto")
if compiled:  # GPTQModel's own default: torch.compile of each layer's dequantization
    for m in model.modules():
        if hasattr(m, "optimize"):
            m.optimized = False
            m.optimize()
with torch.no_grad():
    start = time.perf_counter()
    model(input_ids=ids, labels=ids)  # first pass: compiles where compiled
    first = time.perf_counter() - start
    start = time.perf_counter()
    loss = float(model(input_ids=ids, labels=ids).loss)
    seconds = time.perf_counter() - start
print(json.dumps({"kernel": kernel + (" + torch.compile" if compiled else ""), "dtype": str(model.dtype),
                  "loss": loss, "tokens_per_s": n / seconds, "first_pass_s": first,
                  "torch_isa": torch.backends.cpu.get_cpu_capability(), "native": list(cpu.native_halves())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="results/smollm2-135m/rtn/w4g128/model")
    ap.add_argument("--tokens-file", default="results/smollm2-135m/data/eval_tokens.npy")
    ap.add_argument("--tokens", type=int, default=128, help="tokens scored in one forward")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    rows = []
    for isa, caps in (("as it is", {}), ("held to AVX2", AVX2)):
        for path, half, compiled in PATHS:
            if compiled and caps:
                continue  # emulated bfloat16 either way
            env = {**os.environ, **caps, "QUANTBENCH_CPU_HALF": half}
            out = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "workflow"), args.checkpoint,
                                  args.tokens_file, str(args.tokens), str(args.threads), "1" if compiled else "0"],
                                 env=env, capture_output=True, text=True, check=True).stdout
            rows.append({"cpu": isa, "path": path, **json.loads(out.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| torch ISA | path | kernel | first pass s | tokens/s | mean NLL | vs float32 path, same ISA |\n"
          "|---|---|---|---|---|---|---|")
    for row in rows:
        ref = next(r for r in rows if r["cpu"] == row["cpu"] and r["path"].startswith("dequantized"))
        print(f"| {row['torch_isa']} ({row['cpu']}) | {row['path']} | {row['kernel']} | {row['first_pass_s']:.1f} | "
              f"{row['tokens_per_s']:.1f} | {row['loss']:.5f} | {row['tokens_per_s'] / ref['tokens_per_s']:.3f}x |")


if __name__ == "__main__":
    main()
