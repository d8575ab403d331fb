"""Task accuracy beside perplexity: lm-evaluation-harness on each cell's already loaded model.

Transformers-backed cells go through lm-eval's own Hugging Face wrapper (HFLM) given the loaded model
object. GGUF cells go through the same wrapper with llama.cpp standing in for the model's forward
(`LlamaCppModel`): lm-eval's request building, truncation, tokenization (the model's Hugging Face
tokenizer, so every cell of a model scores the same token ids) and scoring all stay lm-eval's, and only
the logits come from llama.cpp. lm-eval's own GGUF path asks a llama.cpp server for the log-probabilities
of the prompt's text and splits context from continuation by character offsets; in-process there is
no server to start, and the split is the one every other cell gets.

A task's data is a local directory (`path`: lm-eval task YAMLs and their data files, which the YAMLs
may name relative to it) or the Hub's, fetched once through `datasets` into resources/ (`fetch`), never
by an evaluation.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from . import io

# the harness's own seeds (lm_eval.evaluator's defaults), written down so the record says them
SEED = 1234
BOOTSTRAP_ITERS = 100_000  # lm-eval's default: the stderr of metrics that have no closed form


def task_record(task) -> dict:
    """A config entry (`name` or {name, num_fewshot, limit, path}) with its keys filled in."""
    task = {"name": task} if isinstance(task, str) else dict(task)
    return {"name": task["name"], "num_fewshot": task.get("num_fewshot"), "limit": task.get("limit"),
            "path": str(Path(task["path"]).expanduser().resolve()) if task.get("path") else None}


def check(tasks: list, fetched_file: str) -> tuple[str, str] | None:
    """Before any job: each local task's directory declares it; each Hub task is one lm-eval ships, whose
    data was fetched before or can be now. Returns (key, why) of the first that cannot run."""
    fetched = io.read_json(fetched_file) if Path(fetched_file).is_file() else {}
    hub = []
    for i, task in enumerate(map(task_record, tasks)):
        key, name = f"eval.tasks[{i}]", task["name"]
        if task["path"]:
            root = Path(task["path"])
            if not root.is_dir():
                return f"{key}.path", f"{task['path']} is not a directory (lm-eval task YAMLs and their data files)"
            if name not in _declared(root):
                return f"{key}.name", f"no YAML under {root} declares task, group or tag '{name}'"
        elif name not in fetched:
            hub.append((key, name))
    if not hub:
        return None
    from importlib.util import find_spec

    spec = find_spec("lm_eval")
    if spec is None:
        return hub[0][0], "the Hub's tasks need lm-eval here (pip install -e '.[tasks]'); or give the task a path"
    shipped = _declared(Path(spec.origin).parent / "tasks")  # one scan of every YAML lm-eval ships
    for key, name in hub:
        if name not in shipped:
            return key, (f"lm-eval {_version()} ships no task '{name}' (`lm-eval ls tasks` lists them); a task of "
                         "your own takes a path: the directory of its YAML and data files")
    from .sources import hub_unreachable

    reason = hub_unreachable()
    if reason:
        key, name = hub[0]
        return key, (f"task '{name}' takes its data from the Hugging Face Hub, which cannot be reached ({reason}), "
                     f"and it was not fetched before into {Path(fetched_file).parent}: give it a path (a directory "
                     "with the task's YAML and its data as JSON/JSONL files) or run once where the Hub is reachable")
    return None


def _declared(root: Path) -> set[str]:
    """The names YAMLs under root declare as a task, group or tag (list items: a group's tasks, a task's tags)."""
    import re

    pattern = re.compile(r"^(?:task|group|tag):\s*['\"]?([^'\"\s]+)['\"]?\s*$|^\s*-\s*([^\s'\":]+)\s*$", re.MULTILINE)
    return {a or b for p in root.rglob("*.yaml")
            for a, b in pattern.findall(p.read_text(encoding="utf-8", errors="replace"))}


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


@contextlib.contextmanager
def _inside(path: str | None):
    """In a local task's directory, so that its YAML may name its data files relative to it."""
    before = os.getcwd()
    os.chdir(path or before)
    try:
        yield
    finally:
        os.chdir(before)


def _offline() -> None:
    """Evaluations read what `fetch` cached: never the network (set where transformers already imported
    huggingface_hub, which read the variable then)."""
    import datasets.config
    import huggingface_hub.constants

    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True


def _use_cache(cache: str | None) -> None:
    """`datasets` keeps the Hub's task data in `cache` (resources/): `fetch` fills it, evaluations read it.
    datasets reads the variable once, when imported, so its module setting is set too."""
    if cache:
        os.environ["HF_DATASETS_CACHE"] = cache
        import datasets.config

        datasets.config.HF_DATASETS_CACHE = Path(cache)


def evaluate(lm, tasks: list, cache: str | None = None, offline: bool = True) -> dict:
    """Each task's metrics (lm-eval's names: acc, acc_norm, with their stderr), version, few-shot count
    and how many documents it scored."""
    if offline:
        _offline()
    _use_cache(cache)
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = {}
    for task in map(task_record, tasks):
        with _inside(task["path"]):
            results = lm_eval.simple_evaluate(
                model=lm, tasks=[task["name"]], num_fewshot=task["num_fewshot"], limit=task["limit"],
                task_manager=TaskManager(include_path=task["path"]), log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS,
                random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED)
        for name, metrics in results["results"].items():  # a group's subtasks too
            out[name] = {
                "metrics": {k.removesuffix(",none"): v for k, v in metrics.items() if k != "alias"
                            and isinstance(v, (int, float))},
                "version": results["versions"].get(name), "num_fewshot": results["n-shot"].get(name),
                "limit": task["limit"], "n_samples": results.get("n-samples", {}).get(name),
                "higher_is_better": results.get("higher_is_better", {}).get(name), "path": task["path"],
                "max_length": lm.max_length,
                "documents": [_document(d) for d in results.get("samples", {}).get(name, [])],
            }
    return out


def _document(sample: dict) -> dict:
    """One scored document: its id, the model's answers as lm-eval filtered them (per choice, the
    log-likelihood and whether it is the greedy continuation), its metrics: cells compare pairwise."""
    resps = [list(r) if isinstance(r, tuple) else r for r in sample["filtered_resps"]]
    return {"doc_id": sample["doc_id"], "resps": resps,
            **{m: sample[m] for m in sample.get("metrics", []) if isinstance(sample.get(m), (int, float))}}


# Requests are scored in lm-eval's default context for the model (its CLI's), at most this many tokens on
# every backend: llama.cpp allocates its KV cache up front, and every cell must truncate alike.
MAX_CONTEXT = 8192


def hf_model(model, model_dir: str, batch_size):
    """lm-eval's HFLM around a loaded transformers model (the cell as it was scored)."""
    from lm_eval.models.huggingface import HFLM

    from .sources import tokenizer

    lm = HFLM(pretrained=model, tokenizer=tokenizer(model_dir), batch_size=batch_size if isinstance(batch_size, int) else 1)
    lm._max_length = min(lm.max_length, MAX_CONTEXT)  # what its max_length argument sets
    return lm


def llamacpp_model(gguf: str, model_dir: str, threads: int):
    """lm-eval's HFLM with llama.cpp's logits in place of the model's forward, one request at a time, in a
    llama.cpp context of its own (the file opened again) of lm-eval's default length (at most MAX_CONTEXT)."""
    from lm_eval.models.huggingface import HFLM

    from .sources import tokenizer

    model = LlamaCppModel(model_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer(model_dir), batch_size=1)
    lm._max_length = model.open(gguf, min(lm.max_length, MAX_CONTEXT), threads)  # what its max_length argument sets
    return lm


class LlamaCppModel:
    """What HFLM asks of a causal LM, answered by llama.cpp for one request at a time (HFLM's batch of
    one, so never padded): the logits at every position of its token ids, and greedy generation with
    HFLM's stopping criteria."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoConfig, GenerationConfig

        self.backend = None
        self.config = AutoConfig.from_pretrained(model_dir)
        try:  # the end-of-sequence ids transformers' generate stops at
            self.generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(self.config)
        self.device = torch.device("cpu")  # where HFLM puts the ids; llama.cpp reads them from there
        self.name_or_path = model_dir

    def open(self, gguf: str, context: int, threads: int) -> int:
        from .backends.llamacpp import LlamaCppBackend

        self.backend = LlamaCppBackend(gguf, context, threads)
        return context

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def __call__(self, ids):
        import torch

        assert ids.shape[0] == 1, "one request at a time"
        return _Output(torch.from_numpy(self.backend.all_logits(ids.numpy())))

    def generate(self, input_ids, max_length: int, stopping_criteria=None, pad_token_id=None, **kwargs):
        """Greedy continuation of each row until max_length, an end-of-sequence token or a stop sequence."""
        import torch

        if kwargs.get("do_sample"):
            raise ValueError("only greedy generation is supported on llama.cpp cells (do_sample is set)")
        eos = self.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        rows = []
        for row in input_ids:
            ids = row.tolist()
            for token in self.backend.greedy(ids, max_length - len(ids)):
                ids.append(token)
                done = stopping_criteria is not None and stopping_criteria(torch.tensor([ids]), None)
                if token in eos or bool(done if isinstance(done, bool) else done.all()):
                    break
            rows.append(ids)
        width = max(map(len, rows))
        pad = pad_token_id if pad_token_id is not None else 0
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])

    def eval(self):
        return self

    def tie_weights(self):
        pass


class _Output:
    def __init__(self, logits):
        self.logits = logits


def fetch(tasks: list, cache: str, out: str) -> None:
    """Build each Hub task once, so that `datasets` fetches and caches its data under `cache`; what was
    fetched (task, version, dataset) goes to `out`."""
    _use_cache(cache)
    from lm_eval.tasks import TaskManager, get_task_dict

    fetched = {}
    for task in map(task_record, tasks):
        with _inside(task["path"]):
            built_tasks = get_task_dict([task["name"]], TaskManager(include_path=task["path"]))
        leaves = dict(_leaves(built_tasks))
        fetched |= {name: {"version": built.VERSION, "dataset_path": built.config.dataset_path,
                           "dataset_name": built.config.dataset_name} for name, built in leaves.items()}
        if task["name"] not in leaves:  # a group or a tag: the name the config gives, what it stands for
            fetched[task["name"]] = {"tasks": sorted(leaves)}
    io.write_json(out, fetched)


def _leaves(task_dict):
    """(name, task) of each task a group or tag stands for (lm-eval nests groups in dicts)."""
    for key, value in (task_dict.items() if isinstance(task_dict, dict) else enumerate(task_dict)):
        if isinstance(value, (dict, list)):
            yield from _leaves(value)
        else:
            yield key if isinstance(key, str) else value.config.task, value
