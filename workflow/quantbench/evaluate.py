"""Scoring one cell on the shared token stream: perplexity under a protocol, and how far the
cell's next-token distributions are from the FP16 baseline's (KL divergence, top-1 agreement, Δp).

Backends (transformers, llama.cpp) only turn a batch of windows into log-probabilities at the
scored positions; the windows come from `protocols`, so every backend scores the same ids.
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
from .protocols import Protocol, Window

ROWS = 512  # scored positions handled at once when comparing distributions (bounds memory)


@dataclass
class Reference:
    """The FP16 baseline's next-token distribution at every scored position, kept as its top-k
    log-probabilities and the log of the mass outside them: 8k + 12 bytes a token. KL from it is
    the KL with the tail merged into one outcome, a lower bound of the exact KL (exact once k
    covers the vocabulary)."""
    targets: np.ndarray       # int32 [T]: the scored token ids, to prove both sides scored the same
    target_logp: np.ndarray   # float32 [T]
    top_ids: np.ndarray       # int32 [T, k], most likely first
    top_logp: np.ndarray      # float32 [T, k]
    tail_logp: np.ndarray     # float32 [T]; -inf when k covers the vocabulary

    @classmethod
    def of(cls, logprobs, targets, target_logp, k: int) -> Reference:
        import torch

        k = min(k, logprobs.shape[-1])
        parts = []
        for lp in logprobs.split(ROWS):
            top_logp, top_ids = lp.topk(k, dim=-1)
            parts.append((top_ids, top_logp, torch.logsumexp(lp.scatter(-1, top_ids, -math.inf), -1)))
        ids, logp, tail = (torch.cat(x).numpy() for x in zip(*parts))
        return cls(targets.numpy().astype(np.int32), target_logp.numpy(), ids.astype(np.int32), logp, tail)

    @classmethod
    def empty(cls) -> Reference:
        return cls(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros((0, 0), np.int32),
                   np.zeros((0, 0), np.float32), np.zeros(0, np.float32))

    @classmethod
    def concat(cls, parts: list[Reference]) -> Reference:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def save(self, path: str) -> None:
        with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: str) -> Reference:
        with np.load(path) as z:
            return cls(*(z[f] for f in cls.__dataclass_fields__))

    def compare(self, logprobs, targets, target_logp, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per scored token: KL(reference || cell), whether the top-1 tokens agree, and Δp of the
        target (cell minus reference), for the reference rows [offset, offset + len(targets))."""
        import torch

        rows = slice(offset, offset + len(targets))
        if not np.array_equal(self.targets[rows], targets.numpy()):
            raise ValueError("the FP16 reference scored other tokens: it was made for another protocol or text")
        kl, top1 = [], []
        for i, lp in zip(range(0, len(targets), ROWS), logprobs.split(ROWS)):
            part = slice(offset + i, offset + i + len(lp))
            ids = torch.from_numpy(self.top_ids[part].astype(np.int64))
            p_logp = torch.from_numpy(self.top_logp[part]).double()
            p_tail = torch.from_numpy(self.tail_logp[part]).double()
            q_tail = torch.logsumexp(lp.scatter(-1, ids, -math.inf), -1).double()
            kl_top = (p_logp.exp() * (p_logp - lp.gather(-1, ids).double())).sum(-1)
            kl_tail = torch.where(p_tail > -math.inf, p_tail.exp() * (p_tail - q_tail), 0.0)
            kl.append((kl_top + kl_tail).numpy())
            top1.append((lp.argmax(-1) == ids[:, 0]).numpy())
        delta_p = np.exp(target_logp.double().numpy()) - np.exp(self.target_logp[rows].astype(np.float64))
        return np.concatenate(kl), np.concatenate(top1), delta_p


def _batches(wins: list[Window], batch_size: int):
    """Consecutive windows of one shape, at most batch_size at a time."""
    group: list[Window] = []
    for w in wins:
        if group and (len(group) == batch_size or _shape(w) != _shape(group[0])):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def _shape(w: Window) -> tuple:
    return w.end - w.start, w.n_scored, w.bos


def score(scorer, tokens: np.ndarray, wins: list[Window], protocol: Protocol, batch_size: int = 1,
          bos_id: int | None = None, reference: Reference | None = None, keep_top_k: int = 0):
    """Score `wins` of `tokens`: perplexity and costs, the distances from `reference` when given,
    and (keep_top_k > 0) this cell's distributions as a new Reference."""
    import torch

    nlls, kl, top1, delta_p, kept = [], [], [], [], []
    offset = fed = 0
    t0 = time.perf_counter()
    for group in _batches(wins, batch_size):
        n = group[0].n_scored
        ids = np.stack([tokens[w.start:w.end] for w in group]).astype(np.int64)
        if group[0].bos:
            ids[:, 0] = bos_id
        logprobs = scorer.logprobs(ids, n)                        # [B, n, vocab] float32
        logprobs = logprobs.reshape(-1, logprobs.shape[-1])
        targets = torch.from_numpy(ids[:, -n:].reshape(-1))
        target_logp = logprobs.gather(-1, targets[:, None])[:, 0]
        nlls += list((-target_logp.double()).reshape(len(group), n).numpy())
        if reference is not None:
            for acc, values in zip((kl, top1, delta_p), reference.compare(logprobs, targets, target_logp, offset)):
                acc.append(values)
        if keep_top_k:
            kept.append(Reference.of(logprobs, targets, target_logp, keep_top_k))
        offset += len(targets)
        fed += ids.size
    eval_s = time.perf_counter() - t0
    if reference is not None and offset != reference.targets.size:
        raise ValueError(f"the FP16 reference has {reference.targets.size} scored tokens, this cell {offset}")
    record = _perplexity(nlls, protocol.window_mean) | {
        "eval_s": eval_s, "eval_tokens_fed": fed, "eval_tokens_per_s": fed / eval_s}
    if reference is not None:
        record |= distances(np.concatenate(kl), np.concatenate(top1), np.concatenate(delta_p))
    return record, (Reference.concat(kept) if keep_top_k else None)


def _perplexity(nlls: list[np.ndarray], window_mean: bool) -> dict:
    """exp(mean NLL) with its standard error by the delta method, as llama-perplexity reports it."""
    values = np.array([x.mean() for x in nlls]) if window_mean else np.concatenate(nlls)
    mean = values.mean()
    var = max((values * values).mean() - mean * mean, 0.0)
    ppl = math.exp(mean)
    count = sum(x.size for x in nlls)
    return {"ppl": ppl, "ppl_stderr": ppl * math.sqrt(var / max(values.size - 1, 1)),
            "nll_sum": float(sum(x.sum() for x in nlls)), "n_tokens": count}


def distances(kl: np.ndarray, top1: np.ndarray, delta_p: np.ndarray) -> dict:
    """The statistics llama.cpp's --kl-divergence reports, over every scored token."""
    n = kl.size
    agree = top1.mean()
    return {
        "kl_mean": float(kl.mean()),
        "kl_mean_stderr": float(kl.std() / math.sqrt(max(n - 1, 1))),
        "kl_median": float(np.median(kl)),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_p999": float(np.percentile(kl, 99.9)),
        "kl_max": float(kl.max()),
        "top1_agree": float(agree),
        "top1_agree_stderr": math.sqrt(agree * (1 - agree) / max(n - 1, 1)),
        "delta_p_mean": float(delta_p.mean()),
        "delta_p_rms": float(np.sqrt((delta_p * delta_p).mean())),
        "delta_p_p01": float(np.percentile(delta_p, 1)),
        "delta_p_p99": float(np.percentile(delta_p, 99)),
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
    def load(cls, method: str, params: dict, model_dir: str, threads: int) -> TransformersScorer:
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
        """Log-probabilities of the last n_scored tokens; the output head runs on those positions only."""
        import torch

        length = ids.shape[1]
        with torch.inference_mode():
            batch = torch.from_numpy(ids).to(self.device)
            keep = torch.arange(length - n_scored - 1, length - 1, device=self.device)
            logits = self.model(input_ids=batch, logits_to_keep=keep).logits
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


def evaluate_cell(cell: dict, open_scorer, artifact, tokens_file: str, tokens_meta_file: str, eval_spec: dict,
                  threads: int, reference: str | None = None, write_reference: str | None = None) -> dict:
    """Score one cell. A cell that cannot run is recorded, not raised: status 'skipped' or 'failed'
    with the reason, so the rest of the matrix and the report go on. The baseline writes the FP16
    reference (`write_reference`) that every other cell compares with (`reference`)."""
    tokens, meta = np.load(tokens_file), io.read_json(tokens_meta_file)
    protocol = Protocol.from_spec(eval_spec)
    wins = protocol.windows(tokens.size, add_bos=meta["tokenizer"]["add_bos"])
    record = {
        **cell, "status": "ok", "error": None,
        "protocol": protocol.describe(wins, tokens.size, meta),
        "ppl": None, "ppl_stderr": None, "kl_mean": None, "top1_agree": None,
        "threads": threads,
        "versions": io.versions("torch", "transformers", "llama-cpp-python", "gguf", "gptqmodel", "bitsandbytes"),
    }
    scorer, kept = None, None
    try:
        record |= artifact()
        ref = Reference.load(reference) if reference else None
        if ref is not None and ref.targets.size == 0:
            ref, record["kl_error"] = None, "the FP16 baseline did not run, so there is no reference to compare with"
        scorer = open_scorer()
        top_k = eval_spec.get("kl_top_k", 128) if write_reference else 0
        scores, kept = score(scorer, tokens, wins, protocol, eval_spec.get("batch_size", 1),
                             meta["tokenizer"]["bos_token_id"], ref, top_k)
        record |= scores
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
    if write_reference:  # written even when the baseline failed (empty), so the other cells still run
        kept = kept or Reference.empty()
        kept.save(write_reference)
        if kept.targets.size:
            record |= {"kl_mean": 0.0, "top1_agree": 1.0, "reference": {
                "top_k": int(kept.top_ids.shape[1]), "bytes_per_token": 8 * int(kept.top_ids.shape[1]) + 12,
                "bytes": Path(write_reference).stat().st_size,
                "tail_mass_mean": float(np.exp(kept.tail_logp.astype(np.float64)).mean())}}
    return record
