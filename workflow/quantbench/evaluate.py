"""One cell's evaluation: its artifact's statistics, its backend, the scoring loop on the shared
token stream, and the distances from the FP16 baseline, as one metrics.json record.

A cell that cannot run is recorded, not raised: status 'skipped' or 'failed' with the reason,
so the rest of the matrix and the report go on.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import numpy as np

from . import architecture, artifacts, cpu, failures, io, serving
from .backends import Skipped, open_backend
from .distributions import Distributions, Recorder
from .methods import METHODS, Bits, Family
from .protocols import Protocol
from .scoring import distances, score
from .sources import tokenizer, trusts_remote_code

VERSIONS = ("torch", "transformers", "llama-cpp-python", "gguf", "gptqmodel", "bitsandbytes", "lm_eval")


def evaluate_cell(cell: dict, artifact: str, tokens_file: str, tokens_meta: str, eval_spec: dict, threads: int, *,
                  base_dir: str | None = None, quantize_info: str | None = None, kernel: str = "auto",
                  distributions: str | None = None, write_distributions: str | None = None, gpus: int = 1,
                  generation: dict | None = None, calib: str | None = None) -> dict:
    """Score one cell from its artifact (a GGUF file or a Hugging Face directory). The baseline writes
    the FP16 distributions (`write_distributions`) that every other cell compares with (`distributions`).
    With `generation` (the config's prompts), a backend that can also measures what its users feel."""
    method = METHODS[cell["method"]]
    tokens, meta = np.load(tokens_file), io.read_json(tokens_meta)
    protocol = Protocol.from_spec(eval_spec)
    wins = protocol.windows(tokens.size, add_bos=meta["tokenizer"]["add_bos"])
    record = {
        **cell, "status": "ok", "error": None,
        "protocol": protocol.describe(wins, tokens.size, meta),
        "ppl": None, "ppl_stderr": None, "kl_mean": None, "top1_agree": None,
        "threads": threads,
        "versions": io.versions(*VERSIONS),
        **cpu.describe(),  # where a speed was measured, and which dtypes that CPU computes natively
    }
    backend, kept = None, None
    try:
        record |= artifacts.measure(method, artifact, base_dir, quantize_info)
        if method.counted is Bits.PACKED:  # a checkpoint directory: what it says of itself, and who serves it
            qc = io.read_json(Path(artifact) / "config.json").get("quantization_config")
            record |= {"quantization_config": qc, **serving.vllm(qc)}
        _check_positions(base_dir or artifact, protocol.context)
        baseline = Distributions.load(distributions, base_dir or artifact) if distributions else None
        if baseline is not None and baseline.targets.size == 0:
            baseline = None
            record["kl_error"] = "the FP16 baseline did not run, so there are no distributions to compare with"
        trust = trusts_remote_code(base_dir or artifact)  # a packed checkpoint runs its base model's code
        backend = open_backend(method, cell["params"], artifact, protocol.context, threads, kernel, trust, gpus, calib,
                               eval_spec["compile"])
        if method.family is Family.PREQUANTIZED:
            _check_vocabulary(backend, base_dir, tokens, cell["model"])
        recorder = Recorder(backend, sum(w.n_scored for w in wins)) if write_distributions else None
        record |= score(backend, tokens, wins, protocol, eval_spec["batch_size"], meta["tokenizer"]["bos_token_id"],
                        baseline, recorder, eval_spec["compile"])
        if not np.isfinite(record["ppl"]):  # a kernel's NaN is a failed cell, never a row that looks scored
            raise ValueError(f"its perplexity is {record['ppl']}: the model's log-probabilities are not finite")
        kept = recorder.finish(artifact) if recorder else None
        record |= {"peak_rss_mb": io.peak_rss_mb(), "peak_vram_mb": backend.peak_vram_mb(), **backend.info()}
        if generation:
            record |= _run_as_users_do(backend, generation, base_dir or artifact)
        if eval_spec.get("tasks"):
            record |= _run_tasks(backend, method, artifact, eval_spec, base_dir or artifact, threads)
        if method.counted is Bits.IN_MEMORY:
            record["bits_per_weight"] = artifacts.in_memory(record["weight_memory_mb"], record["n_params"])
    except Skipped as exc:
        record |= {"status": "skipped", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any failure of the method becomes data in its row
        if failures.is_transient(exc):
            raise  # the machine's, not the method's: the job fails and may be retried
        traceback.print_exc()
        record |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if backend is not None:
            backend.close()
    if write_distributions:  # written even when the baseline failed (empty), so the other cells still run
        kept = kept or Distributions.empty()
        kept.save(write_distributions)
        if kept.targets.size:
            n = kept.targets.size  # the baseline's distances from itself, by definition
            record |= distances(np.zeros(n), np.ones(n, bool), np.zeros(n)) | {"distributions": {
                "bytes": Path(write_distributions).stat().st_size, "bytes_per_token": kept.bytes_per_token,
                "dtype": str(kept.dtype), "head_bytes": kept.head.nbytes + kept.head_bias.nbytes}}
    return record


def _check_positions(model_dir: str, context: int) -> None:
    """A model downloaded by the workflow is checked here, as a local one is before any job: windows
    longer than the positions it can attend to would score garbage, or crash."""
    config = Path(model_dir) / "config.json"
    problem = architecture.too_long(io.read_json(config), context) if config.is_file() else None  # else a GGUF
    if problem:
        raise ValueError(problem)


def _run_as_users_do(backend, generation: dict, model_dir: str) -> dict:
    """Speed and greedy completions: a failure here is the row's note, never the loss of its perplexity."""
    try:
        samples = backend.complete(generation["prompts"], generation["max_new_tokens"], model_dir)
        return backend.speed(generation["speed_repetitions"]) | {"samples": samples}
    except Exception as exc:  # noqa: BLE001
        if failures.is_transient(exc):
            raise
        traceback.print_exc()
        return {"generation_error": f"{type(exc).__name__}: {exc}"}


def _run_tasks(backend, method, artifact: str, eval_spec: dict, model_dir: str, threads: int) -> dict:
    """lm-eval's tasks on the model as it was scored (a GGUF cell's file in a llama.cpp context of the
    tasks' length): a failure here is the row's note, never the loss of its perplexity."""
    from . import paths, tasks
    from .methods import LLAMA_CPP

    lm = None
    try:
        if method.backend == LLAMA_CPP:
            lm = tasks.llamacpp_model(artifact, model_dir, threads)
        else:
            lm = tasks.hf_model(backend.model, model_dir, eval_spec["batch_size"])
        return {"tasks": tasks.evaluate(lm, eval_spec["tasks"], cache=str(Path(paths.TASK_DATA).resolve()))}
    except Exception as exc:  # noqa: BLE001
        if failures.is_transient(exc):
            raise
        traceback.print_exc()
        return {"tasks_error": f"{type(exc).__name__}: {exc}"}
    finally:
        if lm is not None and isinstance(lm.model, tasks.LlamaCppModel):
            lm.model.close()


def _check_vocabulary(backend, base_dir: str, tokens: np.ndarray, model: str) -> None:
    """A published artifact scores its model's token ids, so it must have the model's vocabulary: as many
    tokens, and each id of the evaluation text spelled the same (where it carries a tokenizer)."""
    config = io.read_json(Path(base_dir) / "config.json")
    width = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if backend.n_vocab != width:
        raise ValueError(f"not a quantization of model '{model}': its vocabulary has {backend.n_vocab} tokens, the "
                         f"model's {width}; refused before scoring")
    ids = [int(t) for t in np.unique(tokens)]
    for token, theirs, ours in zip(ids, backend.token_texts(ids) or [], tokenizer(base_dir).convert_ids_to_tokens(ids)):
        if theirs != ours:
            raise ValueError(f"not a quantization of model '{model}': token {token} is {theirs!r} in its vocabulary, "
                             f"{ours!r} in the model's tokenizer; refused before scoring")


def run(out: str, cell: dict, *args, **kwargs) -> None:
    """evaluate_cell, its record written to `out`, a line about it in the job's log."""
    record = evaluate_cell(cell, *args, **kwargs)
    io.write_json(out, record)
    where = f"{cell['model']}/{cell['method']}/{cell['variant']}"
    if record["status"] != "ok":
        print(f"{where}: {record['status']}: {record['error']}", file=sys.stderr)
    else:
        print(f"{where}: ppl {record['ppl']:.4f} ± {record['ppl_stderr']:.4f} over {record['n_tokens']} tokens, "
              f"{record['eval_tokens_per_s']:.0f} tok/s")

