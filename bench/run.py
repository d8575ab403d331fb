"""Time quantbench's evaluation against the upstream implementations, whole process against
whole process, on the same model and text, and check that the numbers are equal:

  1. GGUF Q4_K_M, `llamacpp` protocol (n_ctx 512, llama.cpp tokens) vs `llama-perplexity`;
  2. FP16 model, `sliding-seed` protocol (2048 / 512) vs the Hugging Face loop (bench/hf_loop.py).

Needs a finished default run (its GGUF, HF directory and WikiText cache). See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "bench"))

import upstream  # noqa: E402

from quantbench import paths, textdata  # noqa: E402


def timed(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return time.perf_counter() - t0, out.stdout + out.stderr


def quantbench(work: Path, text: dict, tokenizer: list[str], model: list[str], method: str, eval_spec: dict,
               threads: int) -> list[list[str]]:
    """The two stages quantbench runs for a cell: tokenize once, then evaluate."""
    py = [sys.executable, "-m", "quantbench"]
    ids, meta = str(work / "ids.npy"), str(work / "meta.json")
    cell = json.dumps({"model": "bench", "method": method, "variant": "bench", "params": {}})
    return [[*py, "tokenize", "--text", json.dumps(text), *tokenizer, "--ids", ids, "--meta", meta],
            [*py, "evaluate", "--cell", cell, *model, "--tokens", ids, "--tokens-meta", meta, "--eval", json.dumps(eval_spec),
             "--threads", str(threads), "--out", str(work / "metrics.json")]]


def compare(name: str, tool: list[str], ours: list[list[str]], parse, work: Path, repeats: int) -> dict:
    """Wall times of the upstream tool and of quantbench's evaluation stage, run in turn; the ratio is the
    median of the pair-by-pair ratios, so that drifts in machine speed hit both sides alike. Tokenizing
    runs once per model and is shared by every cell: shown separately."""
    times = {"upstream": [], "tokenize": [], "evaluate": []}
    for _ in range(repeats):
        t, out = timed(tool)
        times["upstream"].append(t)
        upstream_value = parse(out)
        for stage, cmd in zip(("tokenize", "evaluate"), ours):
            times[stage].append(timed(cmd)[0])
    metrics = json.loads((work / "metrics.json").read_text())
    if metrics.get("status", "ok") != "ok":
        sys.exit(f"{name}: quantbench's evaluation failed: {metrics.get('error')}")
    upstream_t, tok_t, eval_t = (statistics.median(times[k]) for k in ("upstream", "tokenize", "evaluate"))
    pairs = list(zip(times["upstream"], times["evaluate"], times["tokenize"]))
    per_cell = statistics.median(r / e for r, e, _ in pairs)
    with_tokenize = statistics.median(r / (e + t) for r, e, t in pairs)
    print(f"{name}\n  upstream {upstream_t:.1f} s; quantbench evaluate {eval_t:.1f} s (+ tokenize once per model "
          f"{tok_t:.1f} s), medians of {repeats}\n  speed vs upstream (median of pair ratios): {per_cell:.2f}x "
          f"per cell, {with_tokenize:.2f}x with tokenizing\n  ppl: upstream {upstream_value:.6f}, quantbench "
          f"{metrics['ppl']:.6f} over {metrics['n_tokens']} scored tokens", flush=True)
    return {"comparison": name, "upstream_s": upstream_t, "evaluate_s": eval_t, "tokenize_s": tok_t,
            "ratio_per_cell": per_cell, "ratio_with_tokenize": with_tokenize,
            "upstream_ppl": upstream_value, "quantbench_ppl": metrics["ppl"], "quantbench_stderr": metrics["ppl_stderr"],
            "scored_tokens": metrics["n_tokens"], "eval_tokens_per_s": metrics["eval_tokens_per_s"],
            "all_s": {k: [round(x, 2) for x in v] for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chunks", type=int, default=40, help="llama-perplexity chunks of 512 (= quantbench max_windows)")
    ap.add_argument("--loop-chars", type=int, default=40000, help="characters of WikiText-2 for the HF loop")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    hf_dir = ROOT / paths.MODEL_DIR.format(model=a.model)
    q4 = ROOT / paths.cell(paths.GGUF_FILE, a.model, "gguf", "Q4_K_M")
    resources = str(ROOT / paths.RESOURCES)
    for needed in (hf_dir, q4, textdata.cache_file(resources)):
        if not needed.exists():
            sys.exit(f"{needed} is missing: run the default workflow first (README)")
    tool = upstream.tool("llama-perplexity")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw = textdata.describe_text({"dataset": textdata.WIKITEXT}, resources, "llamacpp")
        raw_file = work / "wiki.test.raw"
        raw_file.write_text(textdata.load_text(raw) + "\n", encoding="utf-8")  # wiki.test.raw itself
        spec = {"protocol": "llamacpp", "context": 512, "max_windows": a.chunks, "tokens": "gguf", "batch_size": "auto",
                "compile": False}
        results.append(compare(
            "GGUF Q4_K_M, llamacpp protocol: llama-perplexity vs quantbench",
            [str(tool), "-m", str(q4), "-f", str(raw_file), "-c", "512", "--chunks", str(a.chunks), "-t", str(a.threads)],
            quantbench(work, raw, ["--gguf", str(q4)],
                       ["--artifact", str(q4), "--quantize-info", str(q4.parent / "quantize.json")], "gguf", spec,
                       a.threads),
            lambda out: float(re.search(r"Final estimate: PPL = ([\d.]+)", out).group(1)), work, a.repeats))

        joined = textdata.load_text(textdata.describe_text({"dataset": textdata.WIKITEXT}, resources))
        text_file = work / "wikitext-prefix.txt"
        text_file.write_text(joined[:a.loop_chars], encoding="utf-8")
        spec = {"protocol": "sliding-seed", "context": 2048, "stride": 512, "batch_size": "auto", "compile": False}
        results.append(compare(
            "FP16, sliding-seed protocol: Hugging Face loop vs quantbench",
            [sys.executable, str(ROOT / "bench" / "hf_loop.py"), str(hf_dir), str(text_file), "2048", "512", str(a.threads)],
            quantbench(work, textdata.describe_text({"text_file": str(text_file)}, "", "sliding-seed"), ["--hf", str(hf_dir)],
                       ["--artifact", str(hf_dir)], "baseline", spec, a.threads),
            lambda out: float(re.search(r"ppl ([\d.]+)", out).group(1)), work, a.repeats))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
