"""GPU workflow bench: the real Snakemake workflow on one GPU over a Llama-3.2-1B-shaped model with
random bf16 weights, built here: FP16 baseline, GGUF Q4_K_M and Q8_0, GPTQ / AWQ / RTN w4g128 and
bitsandbytes int8 / nf4. Prints each job's wall time (Snakemake's benchmark files) and the report.

    python bench/gpu_workflow.py --work /tmp/gpu-workflow [--windows 16] [--wikitext DIR] [--tools DIR]

Run again with the same --work, it goes on where a stopped run left off.

The body is Llama-3.2-1B's (2048 wide, 16 layers, 8192-wide MLP, 32 query / 8 key-value heads, tied
embeddings); the vocabulary is a 32,000-piece BPE trained on the standard library's docstrings (the
tests' tokenizer, larger), so the GGUF converter takes it offline. GGUF cells run on llama.cpp's
build in the environment (a CPU build takes no GPU token and runs beside the GPU jobs). GPTQModel's
kernel is `triton`: `auto` would compile Marlin first, minutes on a fresh machine.
--wikitext fills the WikiText-2 cache from a local copy; --tools gives a directory holding
llama.cpp-<pin>/ (the converter) for machines that cannot reach PyPI.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import tinymodel  # noqa: E402

CORPUS = tinymodel.MODULES + ["email", "http", "html", "urllib", "zipfile", "tarfile", "shutil", "tempfile", "os",
                              "io", "enum", "typing", "dataclasses", "contextlib", "inspect", "ast", "asyncio",
                              "multiprocessing", "threading", "socket", "ssl", "sqlite3", "pickle", "random",
                              "statistics", "math", "pydoc", "doctest"]
W4 = {"name": "w4g128", "bits": 4, "group_size": 128}


def build_model(out: Path) -> int:
    tokenizer = tinymodel.build_tokenizer(tinymodel.corpus(CORPUS), out, vocab_size=32000)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=16, help="eval.max_windows (0 = all of WikiText-2 test)")
    parser.add_argument("--wikitext")
    parser.add_argument("--tools", type=Path)
    parser.add_argument("--json")
    a = parser.parse_args()
    work = a.work.resolve()
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'workflow'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    built = work / "n_params"  # written once the model is saved
    if not built.is_file():  # else a run stopped part-way goes on: Snakemake keeps the jobs that finished
        work.mkdir(parents=True, exist_ok=True)
        built.write_text(str(build_model(work / "model")))
        if a.tools:
            shutil.copytree(a.tools, work / "resources" / "tools", dirs_exist_ok=True)
        if a.wikitext:
            subprocess.run([sys.executable, "-m", "quantbench", "import-wikitext", a.wikitext, "--resources",
                            str(work / "resources")], check=True, env=env)
    params = int(built.read_text())
    config = {
        "models": {"llama-1b-shape": {"source": "path", "path": str(work / "model")}},
        "methods": {"gguf": {"variants": ["Q4_K_M", "Q8_0"]},
                    **{m: {"variants": [W4], "kernel": "triton"} for m in ("gptq", "awq", "rtn")},
                    "bnb": {"variants": [{"name": "int8", "mode": "int8"},
                                         {"name": "nf4", "mode": "nf4", "double_quant": True}]}},
        "calibration": {"source": "eval-holdout", "n_samples": 32, "seq_len": 2048, "seed": 0},
        "eval": {"text": {"dataset": "wikitext-2-raw-v1"}, "protocol": "gptq", "context": 2048,
                 "max_windows": a.windows},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
                          "--configfile", str(work / "config.yaml"), "--cores", str(os.cpu_count()),
                          "--resources", "gpu=1", "--rerun-incomplete", "--scheduler", "greedy"], env=env)
    wall = time.perf_counter() - t0
    jobs = {}
    for f in sorted((work / "results" / "benchmarks").rglob("*.tsv")):
        (row,) = csv.DictReader(f.open(), delimiter="\t")
        jobs[str(f.relative_to(work / "results" / "benchmarks"))] = float(row["s"])
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "params": params, "returncode": run.returncode, "wall_s": wall, "jobs_s": jobs}
    print(f"\n{out['gpu']}, {params / 1e9:.2f}B parameters, workflow exit {run.returncode}, {wall:.0f} s\n")
    print("| job | wall s |\n|---|---|")
    for job, s in jobs.items():
        print(f"| {job} | {s:.1f} |")
    summary = work / "results" / "report" / "summary.md"
    if summary.is_file():
        print("\n" + summary.read_text())
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
