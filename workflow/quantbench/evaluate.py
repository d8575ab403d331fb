"""Perplexity on one shared token stream, for every backend.

A protocol cuts the token ids into windows; each window is scored on a suffix of
its tokens. Backends (transformers, llama.cpp) only turn a window into
log-probabilities for that suffix, so every backend sees the same ids, the same
windows and the same scored positions.
"""
from __future__ import annotations

import json
import math
import struct
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import io


@dataclass(frozen=True)
class Window:
    start: int      # first token id fed to the model
    end: int        # one past the last
    n_scored: int   # the last n_scored tokens of the window are predicted and scored


def windows(n_tokens: int, protocol: str, context: int, max_windows: int = 0, skip: int = 0) -> list[Window]:
    """Windows over tokens [skip, n_tokens); the first `skip` are reserved (calibration) and never scored."""
    n = (n_tokens - skip) // context
    if n <= 0:
        raise ValueError(f"the evaluation text has {n_tokens} tokens ({skip} reserved for calibration), "
                         f"fewer than one window of {context}")
    if protocol == "gptq":  # GPTQ/AWQ eval: non-overlapping windows, every token but the first scored
        n_scored = context - 1
    elif protocol == "llamacpp":  # llama-perplexity: logits of the second half only
        n_scored = context - context // 2 - 1
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    out = [Window(skip + i * context, skip + (i + 1) * context, n_scored) for i in range(n)]
    return out[:max_windows] if max_windows else out


def describe(wins: list[Window], protocol: str, context: int, max_windows: int, skip: int, n_tokens: int,
             tokens_meta: dict) -> dict:
    return {
        "name": protocol,
        "context": context,
        "stride": context,
        "scored": "all but the first token of each window" if protocol == "gptq" else "second half of each window",
        "bos": "as the tokenizer adds it to the whole text; windows are cut from the stream as is",
        "n_windows": len(wins),
        "max_windows": max_windows,
        "skip_tokens": skip,
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


LOAD_TIME = {"bnb", "eetq"}  # quantized while loading: no artifact on disk


class Skipped(Exception):
    """A cell that cannot run on this machine (e.g. a CUDA-only method without CUDA)."""


class TransformersScorer:
    """A Hugging Face causal LM; only the scored suffix goes through the output head."""

    def __init__(self, model, backend: str = "transformers"):
        self.model = model.eval()
        self.device = "cuda" if next(model.parameters()).is_cuda else "cpu"
        self.dtype = model.dtype
        self.backend = backend
        self.weight_bytes = model.get_memory_footprint()

    @classmethod
    def load(cls, method: str, params: dict, model_dir: str, threads: int) -> "TransformersScorer":
        """The baseline, a GPTQModel checkpoint (gptq/awq/rtn) or a load-time quantization (bnb/eetq)."""
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        cuda = torch.cuda.is_available()
        device = "cuda" if cuda else "cpu"
        if method in ("gptq", "awq", "rtn"):
            from gptqmodel import BACKEND, GPTQModel

            # On the CPU GPTQModel's packed-int4 kernels need in_features divisible by the group size;
            # its plain torch kernel does not, and runs in bf16.
            kwargs = {} if cuda else {"backend": BACKEND.TORCH, "dtype": torch.bfloat16}
            return cls(GPTQModel.load(model_dir, device=device, **kwargs).model, backend=f"gptqmodel-{method}")
        if method == "eetq" and not cuda:
            raise Skipped("EETQ's int8 kernels need CUDA, and this machine has none")
        # fp16 on a GPU (bf16 where the checkpoint is bf16); fp32 on the CPU, where half matmuls are slow.
        dtype = torch.float32
        if cuda:
            dtype = torch.bfloat16 if _checkpoint_dtype(model_dir) == "bfloat16" else torch.float16
        kwargs = {}
        if method == "bnb":
            kwargs["quantization_config"] = bnb_config(params)
        elif method == "eetq":
            from transformers import EetqConfig

            kwargs["quantization_config"] = EetqConfig("int8")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device, **kwargs)
        return cls(model, backend="transformers" if method == "baseline" else f"transformers-{method}")

    @property
    def info(self) -> dict:
        import torch

        return {
            "backend": self.backend,
            "device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "weight_memory_mb": self.weight_bytes / 2**20,
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


def bnb_config(params: dict):
    import torch
    from transformers import BitsAndBytesConfig

    if params["mode"] == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=params["threshold"])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=params["mode"],
                              bnb_4bit_use_double_quant=params["double_quant"],
                              bnb_4bit_compute_dtype=getattr(torch, params["compute_dtype"]))


def _checkpoint_dtype(model_dir: str) -> str | None:
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
    return {"size_bytes": size, "stored_bytes": n_bytes, "n_params": n_params, "bits_per_weight": 8 * n_bytes / n_params}


def evaluate_cell(cell: dict, open_scorer, artifact, tokens_file: str, tokens_meta_file: str,
                  eval_spec: dict, threads: int) -> dict:
    """Score one cell. A cell that cannot run is recorded, not raised: status 'skipped' or 'failed'
    with the reason, so the rest of the matrix and the report go on."""
    tokens = np.load(tokens_file)
    spec = [eval_spec["protocol"], eval_spec["context"], eval_spec["max_windows"], eval_spec.get("skip_tokens", 0)]
    wins = windows(tokens.size, *spec)
    record = {
        **cell, "status": "ok", "error": None,
        "protocol": describe(wins, *spec, tokens.size, io.read_json(tokens_meta_file)),
        "ppl": None, "ppl_stderr": None, "kl_mean": None, "top1_agree": None,
        "threads": threads,
        "versions": io.versions("torch", "transformers", "llama-cpp-python", "gguf", "gptqmodel", "bitsandbytes"),
    }
    scorer = None
    try:
        record |= artifact()
        scorer = open_scorer()
        record |= perplexity(scorer, tokens, wins, eval_spec.get("batch_size", 1))
        record |= {"peak_rss_mb": io.peak_rss_mb(), "peak_vram_mb": scorer.peak_vram_mb(), **scorer.info}
        if cell["method"] in LOAD_TIME:
            record["bits_per_weight"] = 8 * scorer.weight_bytes / record["n_params"]
    except Skipped as exc:
        record |= {"status": "skipped", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any failure of one cell becomes data in its row
        traceback.print_exc()
        record |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if hasattr(scorer, "close"):
            scorer.close()
    return record
