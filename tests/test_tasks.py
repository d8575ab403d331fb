"""Task accuracy beside perplexity: lm-evaluation-harness on the tiny model's baseline, a bitsandbytes
cell and a GGUF cell, over a multiple-choice task built here from the tiny model's own text (a local
task: YAML and JSONL in a directory), each equal to what lm-eval's own CLI says of the same weights."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import share_tools, snakemake, write_config

from quantbench import paths

pytestmark = pytest.mark.integration

TASK, GEN_TASK, GROUP = "tiny_mc", "tiny_gen", "tiny_all"  # multiple choice; greedy generation; both
N_DOCS = 40
YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: docs.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata:
  version: 1.0
"""
GEN_YAML = f"""task: {GEN_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: docs.jsonl
output_type: generate_until
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs: {{until: ["."], max_gen_toks: 8, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Sentences of the text the tiny model was trained on: the first words as context, the true ending
    and three endings of other sentences as choices (data files named relative to the YAML)."""
    out = tmp_path_factory.mktemp("tasks") / "tiny-mc"
    out.mkdir()
    import tinymodel

    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", tinymodel.corpus()) if 8 <= len(s.split()) <= 30]
    rng = random.Random(0)
    docs = []
    for words in rng.sample(sentences, N_DOCS):
        cut = len(words) // 2
        endings = [" ".join(words[cut:])] + [" ".join(o[len(o) // 2:]) for o in rng.sample(sentences, 3)]
        order = rng.sample(range(4), 4)
        docs.append({"context": " ".join(words[:cut]), "choices": [endings[i] for i in order], "answer": order.index(0)})
    (out / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / f"{TASK}.yaml").write_text(YAML)
    (out / f"{GEN_TASK}.yaml").write_text(GEN_YAML)
    (out / "group.yaml").write_text(f"group: {GROUP}\ntask: [{TASK}, {GEN_TASK}]\n")
    return out


@pytest.fixture(scope="module")
def tasks_run(tmp_path_factory, tiny, task_dir, converter):
    work = tmp_path_factory.mktemp("tasks-run")
    share_tools(work, converter)
    cfg = write_config(work, {
        "models": {"tiny": {"source": "path", "path": str(tiny["hf"])}},
        "methods": {"bnb": {"variants": ["int8"]}, "gguf": {"variants": ["Q8_0"]}},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128, "max_windows": 4,
                 "tasks": [{"name": TASK, "path": str(task_dir)}, {"name": GEN_TASK, "path": str(task_dir)}]},
    })
    run = snakemake(work, config=cfg)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return work


def _cli(task_dir: Path, out: Path, model_args: str, task: str = TASK) -> dict:
    """lm-eval's own CLI, run directly, on the task: its results for it, and each document's answers
    by doc_id (per choice log-likelihoods, or the generated text)."""
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args,
                           "--tasks", task, "--include_path", str(task_dir), "--batch_size", "1", "--device", "cpu",
                           "--output_path", str(out), "--log_samples"], cwd=task_dir, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result,) = out.rglob("results_*.json")
    (samples,) = out.rglob(f"samples_{task}_*.jsonl")
    docs = [json.loads(line) for line in samples.read_text().splitlines()]
    if task == GEN_TASK:
        return json.loads(result.read_text())["results"][task] | {"texts": {d["doc_id"]: d["filtered_resps"][0]
                                                                           for d in docs}}
    return json.loads(result.read_text())["results"][task] | {
        "loglikelihoods": {d["doc_id"]: [float(r[0]) for r in d["filtered_resps"]] for d in docs}}


def _tasks(work: Path, method: str, variant: str, task: str = TASK) -> dict:
    record = json.loads((work / paths.cell(paths.METRICS, "tiny", method, variant)).read_text())
    assert record["status"] == "ok", record["error"]
    assert "tasks_error" not in record, record["tasks_error"]
    return record["tasks"][task]


def _same(ours: dict, theirs: dict) -> None:
    """The same metrics, and for every document and choice the same log-likelihood."""
    for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert ours["metrics"][metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-9), metric
    assert {d["doc_id"]: [r[0] for r in d["resps"]] for d in ours["documents"]} == theirs["loglikelihoods"]


def test_the_baseline_scores_what_lm_evals_cli_says(tasks_run, tiny, task_dir, tmp_path):
    ours = _tasks(tasks_run, "baseline", "fp16")
    assert ours["version"] in (1, 1.0) and ours["num_fewshot"] == 0 and ours["n_samples"]["effective"] == N_DOCS
    assert ours["metrics"]["acc"] > 0.25 + 2 * ours["metrics"]["acc_stderr"]  # it learned the text: above chance
    _same(ours, _cli(task_dir, tmp_path, f"pretrained={tiny['hf']},dtype=float32"))


def test_a_bitsandbytes_cell_scores_what_lm_evals_cli_says_of_its_weights(tasks_run, tiny, task_dir, tmp_path):
    """The CLI loads the same int8 weights, saved from bitsandbytes' quantization of the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    saved = tmp_path / "int8"
    model = AutoModelForCausalLM.from_pretrained(tiny["hf"], dtype=torch.float32, device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    model.save_pretrained(saved)
    AutoTokenizer.from_pretrained(tiny["hf"]).save_pretrained(saved)
    _same(_tasks(tasks_run, "bnb", "int8"), _cli(task_dir, tmp_path / "out", f"pretrained={saved},dtype=float32"))


def test_a_gguf_cell_scores_through_llama_cpp_what_lm_evals_cli_says_of_the_file(tasks_run, tiny, task_dir, tmp_path):
    """lm-eval's CLI reads the GGUF through transformers (its weights dequantized, the arithmetic torch's);
    the cell scores it in llama.cpp: the same requests and token ids, near-equal log-likelihoods."""
    gguf = tasks_run / paths.cell(paths.GGUF_FILE, "tiny", "gguf", "Q8_0")
    ours = _tasks(tasks_run, "gguf", "Q8_0")
    theirs = _cli(task_dir, tmp_path, f"pretrained={tiny['hf']},gguf_file={gguf},tokenizer={tiny['hf']},dtype=float32")
    base = {d["doc_id"]: [r[0] for r in d["resps"]] for d in _tasks(tasks_run, "baseline", "fp16")["documents"]}
    mine = {d["doc_id"]: [r[0] for r in d["resps"]] for d in ours["documents"]}
    assert mine.keys() == theirs["loglikelihoods"].keys() == base.keys() and len(mine) == N_DOCS
    pairs = [(a, b) for k in mine for a, b in zip(mine[k], theirs["loglikelihoods"][k])]
    gap = max(abs(a - b) / abs(b) for a, b in pairs)
    off = max(abs(a - b) / abs(b) for k in base for a, b in zip(base[k], theirs["loglikelihoods"][k]))
    print(f"GGUF Q8_0 log-likelihoods: llama.cpp vs the CLI's transformers up to {gap:.2e} relative; "
          f"the CLI's vs FP16's up to {off:.2e}")
    # llama.cpp's Q8_0 kernels round the activations too; a wrong position, token or BOS would be off by tens of %
    assert gap < 5e-3
    assert ours["metrics"]["acc"] == pytest.approx(theirs["acc,none"]) and ours["metrics"]["acc_norm"] == pytest.approx(
        theirs["acc_norm,none"])


def test_the_report_shows_accuracy_beside_the_baseline(tasks_run):
    summary = (tasks_run / "results" / "report" / "summary.md").read_text()
    section = summary.split("## Task accuracy (lm-evaluation-harness)")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| tiny ")]
    assert len(rows) == 9  # 3 cells x (acc, acc_norm; exact_match)
    df = pd.read_csv(tasks_run / "results" / "report" / "summary.csv").set_index(["method", "variant"])
    base = df.loc[("baseline", "fp16"), f"task_{TASK}_acc"]
    for cell in [("bnb", "int8"), ("gguf", "Q8_0")]:
        delta = 100 * (df.loc[cell, f"task_{TASK}_acc"] - base)
        assert any(f"| {cell[0]} " in r and f"| {delta:+.1f} " in r and "| acc " in r for r in rows), (cell, delta)


def test_fetching_a_group_caches_its_tasks_data_and_counts_it_as_fetched(task_dir, tmp_path, monkeypatch):
    """What the fetch job does for the Hub's tasks, on the local group: its tasks' data lands in the given
    cache, and the group is then accepted offline."""
    from conftest import REPO

    from quantbench import tasks

    cache = tmp_path / "task-data"
    out = cache / "fetched.json"
    spec = json.dumps([{"name": GROUP, "path": str(task_dir)}])
    proc = subprocess.run([sys.executable, "-m", "quantbench", "fetch-task-data", "--tasks", spec, "--cache", str(cache),
                           "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "workflow")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    leaf = {"version": 1.0, "dataset_path": "json", "dataset_name": None}
    assert json.loads(out.read_text()) == {TASK: leaf, GEN_TASK: leaf, GROUP: {"tasks": sorted([TASK, GEN_TASK])}}
    assert list(cache.rglob("*.arrow"))  # datasets' prepared copy, which evaluations read offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tasks.check([GROUP], str(out)) is None
    assert tasks.check(["arc_easy"], str(out))[0] == "eval.tasks[0]"  # not fetched, and offline
