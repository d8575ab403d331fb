"""pp512 / tg128 as quantbench measures them for a GGUF cell, against llama-bench built from the same
llama.cpp source (the workflow's one build of its programs), on the same file and threads.

Each round runs both, alternating which goes first, each in a fresh process; the figures are each
tool's median over the rounds of its mean tokens/s (llama-bench: `avg_ts` of its 5 repetitions).
Target: quantbench within 5% of llama-bench for both tests.

    python bench/gguf_speed.py [--gguf results/smollm2-135m/gguf/Q4_K_M/model.gguf ...] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import upstream

ROOT = upstream.ROOT
DEFAULT = [ROOT / "results/smollm2-135m/gguf/Q4_K_M/model.gguf", ROOT / "results/smollm2-135m/gguf/Q8_0/model.gguf"]
OURS = ("import json, sys; sys.path.insert(0, {workflow!r})\n"
        "from quantbench.backends.llamacpp import LlamaCppBackend\n"
        "b = LlamaCppBackend({gguf!r}, 512, {threads})\n"
        "print(json.dumps(b.speed())); b.close()\n")


def ours(gguf: Path, threads: int) -> dict:
    code = OURS.format(workflow=str(ROOT / "workflow"), gguf=str(gguf), threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    speed = json.loads(out.strip().splitlines()[-1])
    return {"pp": speed["pp_tokens_per_s"], "tg": speed["tg_tokens_per_s"]}


def llama_bench(gguf: Path, threads: int) -> dict:
    out = subprocess.run([str(upstream.tool("llama-bench")), "-m", str(gguf), "-p", "512", "-n", "128", "-r", "5",
                          "-t", str(threads), "-o", "json"], capture_output=True, text=True, check=True).stdout
    tests = json.loads(out)
    return {"pp" if t["n_prompt"] else "tg": t["avg_ts"] for t in tests}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", nargs="+", type=Path, default=DEFAULT)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rows = []
    for gguf in a.gguf:
        runs = {"quantbench": [], "llama-bench": []}
        for r in range(a.rounds):
            order = [("quantbench", ours), ("llama-bench", llama_bench)][:: 1 if r % 2 == 0 else -1]
            for name, measure in order:
                runs[name].append(measure(gguf, a.threads))
        row = {"gguf": str(gguf.relative_to(ROOT)) if gguf.is_relative_to(ROOT) else str(gguf), "threads": a.threads}
        for test in ("pp", "tg"):
            q, u = (statistics.median(x[test] for x in runs[n]) for n in ("quantbench", "llama-bench"))
            row |= {f"{test}_quantbench": round(q, 1), f"{test}_llama_bench": round(u, 1), f"{test}_ratio": round(q / u, 3),
                    f"{test}_within_5pct": abs(q / u - 1) <= 0.05}
        rows.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
