"""Perplexity on one shared token stream, for every backend.

A protocol cuts the token ids into windows; each window is scored on a suffix of
its tokens. Backends (transformers, llama.cpp) only turn a window into
log-probabilities for that suffix, so every backend sees the same ids, the same
windows and the same scored positions.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from . import io


@dataclass(frozen=True)
class Window:
    start: int      # first token id fed to the model
    end: int        # one past the last
    n_scored: int   # the last n_scored tokens of the window are predicted and scored


def windows(n_tokens: int, protocol: str, context: int, max_windows: int = 0) -> list[Window]:
    n = n_tokens // context
    if n == 0:
        raise ValueError(f"the evaluation text has {n_tokens} tokens, fewer than one window of {context}")
    if protocol == "gptq":  # GPTQ/AWQ eval: non-overlapping windows, every token but the first scored
        n_scored = context - 1
    elif protocol == "llamacpp":  # llama-perplexity: logits of the second half only
        n_scored = context - context // 2 - 1
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    out = [Window(i * context, (i + 1) * context, n_scored) for i in range(n)]
    return out[:max_windows] if max_windows else out


def describe(protocol: str, context: int, max_windows: int, n_tokens: int, tokens_meta: dict) -> dict:
    wins = windows(n_tokens, protocol, context, max_windows)
    return {
        "name": protocol,
        "context": context,
        "stride": context,
        "scored": "all but the first token of each window" if protocol == "gptq" else "second half of each window",
        "bos": "as the tokenizer adds it to the whole text; windows are cut from the stream as is",
        "n_windows": len(wins),
        "max_windows": max_windows,
        "n_scored_tokens": sum(w.n_scored for w in wins),
        "text": tokens_meta["text"],
        "text_sha256": tokens_meta["text_sha256"],
        "tokenizer": tokens_meta["tokenizer"],
        "stream_tokens": n_tokens,
    }


def perplexity(scorer, tokens: np.ndarray, wins: list[Window], batch_size: int = 1) -> dict:
    """Score `wins` of `tokens` with `scorer`; returns ppl, its standard error and costs."""
    import torch

    nll_sum, nll_sq, count, fed = 0.0, 0.0, 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(wins), batch_size):
        group = wins[i:i + batch_size]
        n_scored = group[0].n_scored
        ids = np.stack([tokens[w.start:w.end] for w in group])
        logprobs = scorer.logprobs(ids, n_scored)                     # [B, n_scored, vocab]
        targets = torch.from_numpy(ids[:, -n_scored:].astype(np.int64))
        nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
        nll_sum += nll.sum().item()
        nll_sq += (nll * nll).sum().item()
        count += nll.numel()
        fed += ids.size
    eval_s = time.perf_counter() - t0
    mean = nll_sum / count
    # Standard error of exp(mean NLL), by the delta method, as llama-perplexity reports it.
    var = max(nll_sq / count - mean * mean, 0.0)
    ppl = math.exp(mean)
    return {
        "ppl": ppl,
        "ppl_stderr": ppl * math.sqrt(var / max(count - 1, 1)),
        "nll_sum": nll_sum,
        "n_tokens": count,
        "eval_s": eval_s,
        "eval_tokens_per_s": fed / eval_s,
    }


class TransformersScorer:
    """A Hugging Face causal LM; only the scored suffix goes through the output head."""

    def __init__(self, model_dir: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # fp16 on a GPU (bf16 where the checkpoint is bf16); fp32 on the CPU, where half matmuls are slow.
        if self.device == "cuda":
            self.dtype = torch.bfloat16 if _checkpoint_dtype(model_dir) == "bfloat16" else torch.float16
        else:
            self.dtype = torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype, device_map=self.device)
        self.model.eval()

    @property
    def info(self) -> dict:
        import torch

        return {
            "backend": "transformers",
            "device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
            "compute_dtype": str(self.dtype).removeprefix("torch."),
        }

    def logprobs(self, ids: np.ndarray, n_scored: int):
        import torch

        with torch.inference_mode():
            batch = torch.from_numpy(ids.astype(np.int64)).to(self.device)
            logits = self.model(input_ids=batch, logits_to_keep=n_scored + 1).logits[:, :-1]
            return torch.log_softmax(logits.float(), dim=-1).cpu()

    def peak_vram_mb(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None


def _checkpoint_dtype(model_dir: str) -> str | None:
    from pathlib import Path

    cfg = io.read_json(Path(model_dir) / "config.json")
    return cfg.get("dtype") or cfg.get("torch_dtype")


class LlamaCppScorer:
    """A GGUF model in llama.cpp, fed token ids directly (no llama.cpp tokenization)."""

    def __init__(self, gguf_path: str, context: int, threads: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.gpu = bool(L.llama_supports_gpu_offload())
        mparams.n_gpu_layers = 10_000 if self.gpu else 0
        self.model = L.llama_model_load_from_file(gguf_path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = context
        cparams.n_ubatch = min(context, 512)
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {context} tokens")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(context, 0, 1)
        self.context = context
        for i in range(context):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0

    @property
    def info(self) -> dict:
        return {"backend": "llama.cpp", "device": "cuda" if self.gpu else "cpu", "compute_dtype": "gguf"}

    def logprobs(self, ids: np.ndarray, n_scored: int):
        import torch

        L, out = self.L, []
        for row in ids:
            n = len(row)
            np.ctypeslib.as_array(self.batch.token, shape=(n,))[:] = row
            np.ctypeslib.as_array(self.batch.pos, shape=(n,))[:] = np.arange(n)
            flags = np.ctypeslib.as_array(self.batch.logits, shape=(n,))
            flags[:] = 0
            flags[n - n_scored - 1:n - 1] = 1  # logits at position p predict token p + 1
            self.batch.n_tokens = n
            L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
            rc = L.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            logits = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n_scored, self.n_vocab))
            out.append(torch.log_softmax(torch.from_numpy(logits.copy()), dim=-1))
        return torch.stack(out)

    def peak_vram_mb(self) -> float | None:
        return None

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def safetensors_stats(hf_dir: str) -> dict:
    """Size, parameter count and bits per weight from the safetensors headers (no weights read)."""
    import json
    import struct
    from pathlib import Path

    n_params = n_bytes = size = 0
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        size += path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, t in header.items():
            if name != "__metadata__":
                n_params += math.prod(t["shape"])
                n_bytes += t["data_offsets"][1] - t["data_offsets"][0]
    return {"size_bytes": size, "n_params": n_params, "bits_per_weight": 8 * n_bytes / n_params}


def evaluate_cell(cell: dict, scorer, tokens_file: str, tokens_meta_file: str, eval_spec: dict,
                  artifact: dict, threads: int, out: str) -> dict:
    """Score one cell and write its metrics.json (atomically)."""
    tokens = np.load(tokens_file)
    meta = io.read_json(tokens_meta_file)
    protocol = describe(eval_spec["protocol"], eval_spec["context"], eval_spec["max_windows"], tokens.size, meta)
    wins = windows(tokens.size, eval_spec["protocol"], eval_spec["context"], eval_spec["max_windows"])
    result = perplexity(scorer, tokens, wins, eval_spec.get("batch_size", 1))
    record = {
        **cell,
        "status": "ok",
        "error": None,
        "protocol": protocol,
        **result,
        "kl_mean": None,
        "top1_agree": None,
        **artifact,
        "peak_rss_mb": io.peak_rss_mb(),
        "peak_vram_mb": scorer.peak_vram_mb(),
        **scorer.info,
        "threads": threads,
        "versions": io.versions("torch", "transformers", "llama-cpp-python", "gguf"),
    }
    io.write_json(out, record)
    return record
