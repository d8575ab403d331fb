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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import io
from .protocols import Protocol, Window

ROWS = 512  # scored positions handled at once when comparing distributions (bounds memory)
SOFTMAX_ROWS = 64  # rows a thread normalizes at once: their exponentials stay in cache


@dataclass
class Reference:
    """The FP16 baseline's next-token distribution at every scored position, stored exactly and
    compactly: the hidden state entering the output head (hidden_size floats a token) and the head
    itself, once. The distributions are recomputed from them, so KL, top-1 agreement and Δp are
    exact, not a top-k approximation, at 4 * hidden_size + 8 bytes a token."""
    targets: np.ndarray       # int32 [T]: the scored token ids, to prove both sides scored the same
    target_logp: np.ndarray   # float32 [T]
    hidden: np.ndarray        # float32 [T, H]: input of the output head at each scored position
    head: np.ndarray          # float32 [V, H]
    head_bias: np.ndarray     # float32 [V], or [0] without a bias
    logit_scale: np.ndarray   # float32 [2]: multiplier, then soft cap (0: none), as the model's forward applies

    @classmethod
    def head_of(cls, model) -> dict:
        """The output head and what the model's forward does to its logits (Cohere, Granite, Gemma 2)."""
        head, cfg = model.get_output_embeddings(), model.config
        scale = getattr(cfg, "logit_scale", None) or 1 / (getattr(cfg, "logits_scaling", None) or 1)
        bias = head.bias.detach().float().cpu().numpy() if getattr(head, "bias", None) is not None else np.zeros(0, np.float32)
        return {"head": head.weight.detach().float().cpu().numpy(), "head_bias": bias,
                "logit_scale": np.array([scale, getattr(cfg, "final_logit_softcapping", None) or 0], np.float32)}

    @classmethod
    def empty(cls) -> Reference:
        z = np.zeros(0, np.float32)
        return cls(np.zeros(0, np.int32), z, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), z, z)

    def save(self, path: str) -> None:
        with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: str) -> Reference:
        with np.load(path) as z:
            return cls(*(z[f] for f in cls.__dataclass_fields__))

    def logits(self, rows: slice):
        """The reference's logits at scored positions `rows`, [n, V] float32."""
        import torch

        logits = torch.from_numpy(self.hidden[rows]) @ torch.from_numpy(self.head).T
        if self.head_bias.size:
            logits += torch.from_numpy(self.head_bias)
        scale, softcap = (float(x) for x in self.logit_scale)
        logits = logits * scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return logits

    def check_head(self, dtype) -> None:
        """The stored head must reproduce the model's own log-probabilities. It recomputes the logits
        in fp32; the model rounded them to its compute dtype, which moves a log-probability by up to
        eps * max|logit| of its row (fp16/bf16 on a GPU); twice that is allowed, for margin."""
        import torch

        rows = slice(0, min(ROWS, len(self.targets)))
        logits = self.logits(rows)
        ids = torch.from_numpy(self.targets[rows].astype(np.int64))[:, None]
        got = torch.log_softmax(logits, -1).gather(1, ids)[:, 0]
        want = torch.from_numpy(self.target_logp[rows])
        error = (got - want).abs()
        if (error > 1e-3 + 1e-4 * want.abs() + 2 * torch.finfo(dtype).eps * logits.abs().amax(-1)).any():
            raise ValueError(f"the model's output head cannot be recomputed from its hidden states and weights: "
                             f"log-probabilities differ by up to {float(error.max()):.3g} ({dtype} logits)")

    def logprobs(self, rows: slice):
        """The reference's log-probabilities at scored positions `rows`, [n, V] float32."""
        import torch

        return torch.log_softmax(self.logits(rows), dim=-1)

    def compare(self, logprobs: np.ndarray, targets: np.ndarray, target_logp: np.ndarray,
                offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per scored token of one window: KL(reference || cell), whether the top-1 tokens agree, and
        Δp of the target (cell minus reference), for the reference rows [offset, offset + len(targets))."""
        import torch

        rows = slice(offset, offset + len(targets))
        if not np.array_equal(self.targets[rows], targets):
            raise ValueError("the FP16 reference scored other tokens: it was made for another protocol or text")
        kl, top1 = [], []
        for i in range(0, len(targets), ROWS):
            lp = torch.from_numpy(logprobs[i:i + ROWS])
            p = self.logprobs(slice(offset + i, offset + i + len(lp))).double()
            kl.append((p.exp() * (p - lp.double())).sum(-1).numpy())
            top1.append((lp.argmax(-1) == p.argmax(-1)).numpy())
        delta_p = np.exp(target_logp) - np.exp(self.target_logp[rows].astype(np.float64))
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
          bos_id: int | None = None, reference: Reference | None = None, keep_reference: bool = False,
          threads: int = 1):
    """Score `wins` of `tokens`: perplexity and costs, the distances from `reference` when given,
    and (keep_reference, transformers only) this cell's distributions as a new Reference."""
    nlls, kl, top1, delta_p, kept = [], [], [], [], []
    offset = fed = 0
    t0 = time.perf_counter()
    batch_size = getattr(scorer, "windows_per_batch", batch_size)  # llama.cpp batches as llama-perplexity does
    with ThreadPoolExecutor(threads) as pool:
        for group in _batches(wins, batch_size):
            n = group[0].n_scored
            ids = np.stack([tokens[w.start:w.end] for w in group]).astype(np.int64)
            if group[0].bos:
                ids[:, 0] = bos_id
            logits = scorer.logits(ids, n)  # [B, n, vocab] float32, ours to overwrite
            targets = ids[:, -n:]
            target_logp = log_softmax(logits, targets, pool, full=reference is not None)
            nlls += list(-target_logp)
            if reference is not None:
                for b in range(len(group)):
                    values = reference.compare(logits[b], targets[b], target_logp[b], offset + b * n)
                    for acc, value in zip((kl, top1, delta_p), values):
                        acc.append(value)
            if keep_reference:
                kept.append((targets.reshape(-1).astype(np.int32), target_logp.reshape(-1).astype(np.float32),
                             scorer.head_input.reshape(targets.size, -1).float().cpu().numpy()))
            offset += targets.size
            fed += ids.size
    eval_s = time.perf_counter() - t0
    if reference is not None and offset != reference.targets.size:
        raise ValueError(f"the FP16 reference has {reference.targets.size} scored tokens, this cell {offset}")
    record = _perplexity(nlls, protocol.window_mean) | {
        "eval_s": eval_s, "eval_tokens_fed": fed, "eval_tokens_per_s": fed / eval_s}
    if reference is not None:
        record |= distances(np.concatenate(kl), np.concatenate(top1), np.concatenate(delta_p))
    if not keep_reference:
        return record, None
    kept = Reference(*(np.concatenate(x) for x in zip(*kept)), **Reference.head_of(scorer.model))
    kept.check_head(scorer.dtype)
    return record, kept


def log_softmax(logits: np.ndarray, targets: np.ndarray, pool: ThreadPoolExecutor, full: bool) -> np.ndarray:
    """The targets' log-probabilities [B, n] (float64) from logits [B, n, V], computed as llama-perplexity
    does: float exponentials summed in double. Rows are split over the pool's threads (numpy releases the
    GIL); with `full`, logits are turned into log-probabilities in place (for the KL comparison)."""
    out = np.empty(targets.shape)

    def rows(b: int, r: slice) -> None:
        x = logits[b, r]
        x -= x.max(-1, keepdims=True)
        log_norm = np.log(np.exp(x).sum(-1, dtype=np.float64))
        out[b, r] = np.take_along_axis(x, targets[b, r, None], -1)[:, 0] - log_norm
        if full:
            x -= log_norm.astype(np.float32)[:, None]

    n = targets.shape[1]
    jobs = [(b, slice(i, i + SOFTMAX_ROWS)) for b in range(len(targets)) for i in range(0, n, SOFTMAX_ROWS)]
    list(pool.map(lambda job: rows(*job), jobs))
    return out


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

    def __init__(self, model, backend: str = "transformers", kernel: str | None = None):
        self.model = model.eval()
        self.kernel = kernel
        self.device = "cuda" if next(model.parameters()).is_cuda else "cpu"
        self.dtype = model.dtype
        self.backend = backend
        self.weight_bytes = model.get_memory_footprint()
        self.head_input = None  # what entered the output head in the last forward (for the FP16 reference)
        model.get_output_embeddings().register_forward_pre_hook(lambda _, args: setattr(self, "head_input", args[0]))

    @classmethod
    def load(cls, method: str, params: dict, model_dir: str, threads: int, kernel: str = "auto") -> TransformersScorer:
        """The baseline, a GPTQModel checkpoint (gptq/awq/rtn, evaluated by `kernel`) or a load-time
        quantization (bnb/eetq)."""
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import is_kernels_available

        torch.set_num_threads(threads)
        cuda = torch.cuda.is_available()
        device = "cuda" if cuda else "cpu"
        if method in ("gptq", "awq", "rtn"):
            from gptqmodel import GPTQModel
            from gptqmodel.nn_modules.qlinear import BaseQuantLinear

            if not cuda and kernel not in ("auto", "torch"):
                raise Skipped(f"GPTQModel's {kernel} kernel needs CUDA, and this machine has none")
            kwargs = {"backend": gptqmodel_backend(method, kernel, cuda)}
            if not cuda:
                kwargs["dtype"] = torch.bfloat16
            model = GPTQModel.load(model_dir, device=device, **kwargs).model
            used = sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})
            return cls(model, backend=f"gptqmodel-{method}", kernel=",".join(used) or None)
        if method == "eetq" and not cuda:
            raise Skipped("EETQ's int8 kernels need CUDA, and this machine has none")
        if method == "eetq" and not is_kernels_available():
            raise RuntimeError("EETQ needs the `kernels` package (pip install -e '.[eetq]'), which fetches the "
                               "Hub kernel kernels-community/quantization-eetq (offline: pre-fetch it into KERNELS_CACHE)")
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
            "kernel": self.kernel,
            "weight_memory_mb": self.weight_bytes / 2**20,
        }

    def logits(self, ids: np.ndarray, n_scored: int) -> np.ndarray:
        """Logits predicting the last n_scored tokens, [B, n_scored, vocab] float32 on the CPU; the output
        head runs on those positions only."""
        import torch

        length = ids.shape[1]
        with torch.inference_mode():
            batch = torch.from_numpy(ids).to(self.device)
            keep = torch.arange(length - n_scored - 1, length - 1, device=self.device)
            return self.model(input_ids=batch, logits_to_keep=keep).logits.float().cpu().numpy()

    def peak_vram_mb(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None


def gptqmodel_backend(method: str, kernel: str, cuda: bool):
    """GPTQModel's BACKEND for a kernel name. `auto` on a CPU is the plain torch kernel: GPTQModel's
    packed-int4 CPU kernels need in_features divisible by the group size, and it has no such limit
    (it runs in bf16). RTN checkpoints are in GPTQ's format."""
    from gptqmodel import BACKEND

    if kernel == "auto":
        return BACKEND.AUTO if cuda else BACKEND.TORCH
    names = {"gptq": {"torch": "GPTQ_TORCH", "triton": "GPTQ_TRITON", "marlin": "GPTQ_MARLIN", "exllama_v2": "GPTQ_EXLLAMA_V2"},
             "awq": {"torch": "AWQ_TORCH", "triton": "AWQ_GEMM_TRITON", "marlin": "AWQ_MARLIN", "exllama_v2": "AWQ_EXLLAMA_V2"}}
    return BACKEND[names["gptq" if method == "rtn" else method][kernel]]


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
    """A GGUF model in llama.cpp, fed token ids directly (no llama.cpp tokenization), decoding as
    llama-perplexity does: windows of n_ctx go n_batch / n_ctx at a time into one llama_decode
    (n_batch 2048, n_ubatch 512, one KV cache per sequence), logits requested from the first
    scored position to the window's end. The same batches give the same floating-point sums."""

    N_BATCH, N_UBATCH = 2048, 512  # llama-perplexity's defaults

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
        self.windows_per_batch = max(1, self.N_BATCH // context)
        cparams = L.llama_context_default_params()
        cparams.n_ctx = context * self.windows_per_batch
        cparams.n_batch = min(self.N_BATCH, cparams.n_ctx)
        cparams.n_ubatch = self.N_UBATCH
        cparams.n_seq_max = self.windows_per_batch
        cparams.kv_unified = False
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens")
        self.n_batch = cparams.n_batch
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    @property
    def info(self) -> dict:
        return {"backend": "llama.cpp", "device": "cuda" if self.gpu else "cpu", "compute_dtype": "gguf"}

    def logits(self, ids: np.ndarray, n_scored: int) -> np.ndarray:
        """Logits predicting the last n_scored tokens of each window (rows of ids, one sequence each),
        [B, n_scored, vocab] float32: a view of llama.cpp's output buffer, valid until the next call."""
        L, (n_seq, n) = self.L, ids.shape
        first = n - n_scored - 1  # logits at position p predict token p + 1; the last one predicts nothing
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        out = []
        for start in range(0, n, self.n_batch):  # several batches only when one window exceeds n_batch
            size = min(n - start, self.n_batch)
            count = size * n_seq
            positions = np.tile(np.arange(start, start + size), n_seq)
            np.ctypeslib.as_array(self.batch.token, shape=(count,))[:] = ids[:, start:start + size].reshape(-1)
            np.ctypeslib.as_array(self.batch.pos, shape=(count,))[:] = positions
            np.ctypeslib.as_array(self.batch.n_seq_id, shape=(count,))[:] = 1
            np.ctypeslib.as_array(self.batch.logits, shape=(count,))[:] = positions >= first
            for k in range(count):
                self.batch.seq_id[k][0] = k // size
            self.batch.n_tokens = count
            rc = L.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            n_out = int((positions >= first).sum())
            if n_out:
                logits = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))
                out.append(logits if start + size == n else logits.copy())  # the next decode overwrites it
        logits = out[0] if len(out) == 1 else np.concatenate(out)
        return logits.reshape(n_seq, n_scored + 1, self.n_vocab)[:, :-1]

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
        scores, kept = score(scorer, tokens, wins, protocol, eval_spec.get("batch_size", 1),
                             meta["tokenizer"]["bos_token_id"], ref, keep_reference=bool(write_reference),
                             threads=threads)
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
            n = kept.targets.size  # the baseline's distances from itself, by definition
            record |= distances(np.zeros(n), np.ones(n, bool), np.zeros(n)) | {"reference": {
                "bytes": Path(write_reference).stat().st_size, "bytes_per_token": 4 * kept.hidden.shape[1] + 8,
                "head_bytes": kept.head.nbytes + kept.head_bias.nbytes}}
    return record
