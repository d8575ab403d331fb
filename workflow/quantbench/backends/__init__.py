"""Evaluation backends: what turns windows of token ids into logits at the scored positions.

A backend is one module here behind the interface below, written down once; the scoring loop
(scoring.py) needs nothing else of it. `open_backend` picks the backend a method's family runs in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Logits normalized at once on a GPU (512 MB in fp32): memory bounded for any vocabulary, and chunks large enough
# that launching their kernels never outlasts running them (SmolLM2, compiled: 837k tok/s at 2^26, 1.05M at 2^27)
CHUNK_ELEMENTS = 1 << 27
CPU_CHUNK_ROWS = 64  # on a CPU, rows whose exponentials stay in cache


# What users feel, measured the same way for every backend, as llama-bench measures it (its defaults):
# prompt processing of N_PROMPT tokens and generation of N_GEN, at batch 1, each test a warm-up and then
# REPETITIONS runs from an empty cache, reported as the mean and standard deviation of their tokens/s.
N_PROMPT, N_GEN, REPETITIONS = 512, 128, 5


def rates(run, reset, n_tokens: int, repetitions: int) -> np.ndarray:
    """Tokens/s of each of `repetitions` timed calls of `run` (after `reset`), after a warm-up call."""
    import time

    run(warm_up=True)
    seconds = []
    for _ in range(repetitions):
        reset()
        start = time.perf_counter()
        run(warm_up=False)
        seconds.append(time.perf_counter() - start)
    return n_tokens / np.array(seconds)


def speed_record(pp: np.ndarray, tg: np.ndarray, **test) -> dict:
    """A speed test's figures for metrics.json (`test`: what else decided them: threads, batch sizes)."""
    return {"pp_tokens_per_s": float(pp.mean()), "pp_tokens_per_s_stdev": float(pp.std(ddof=1)),
            "tg_tokens_per_s": float(tg.mean()), "tg_tokens_per_s_stdev": float(tg.std(ddof=1)),
            "speed_test": {"n_prompt": N_PROMPT, "n_gen": N_GEN, "repetitions": pp.size, **test,
                           "follows": "llama-bench"}}


class Skipped(Exception):
    """A cell that cannot run on this machine (a CUDA-only method or kernel without CUDA)."""


@dataclass
class Head:
    """An output head as the model's forward applies it: weight [V, H] (and bias) in the compute dtype,
    then a logit multiplier and soft cap (Cohere, Granite, Gemma 2)."""
    weight: object  # torch.Tensor
    bias: object | None = None
    scale: float = 1.0
    softcap: float = 0.0

    @classmethod
    def of(cls, model) -> Head:
        head, cfg = model.get_output_embeddings(), model.config
        scale = getattr(cfg, "logit_scale", None) or 1 / (getattr(cfg, "logits_scaling", None) or 1)
        return cls(head.weight.detach(), getattr(head, "bias", None), float(scale),
                   float(getattr(cfg, "final_logit_softcapping", None) or 0))

    def __call__(self, hidden):
        """Logits [n, V] from head inputs [n, H], in the compute dtype, as the model's forward makes them."""
        import torch

        logits = torch.nn.functional.linear(hidden.to(self.weight.device, self.weight.dtype), self.weight, self.bias)
        if self.scale != 1:
            logits = logits * self.scale
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


class Logits:
    """A batch's logits at the scored positions, handed out a chunk of rows at a time as torch tensors
    on the backend's device, in the dtype the model made them: only per-token scalars leave it."""
    n_rows: int
    device: object  # torch.device
    hidden = None  # head inputs [n_rows, H] in the compute dtype, where the backend has them (the baseline records them)

    def rows(self, r: slice):
        raise NotImplementedError

    @property
    def chunk_rows(self) -> int:
        return CPU_CHUNK_ROWS if self.device.type == "cpu" else max(1, CHUNK_ELEMENTS // self.vocab)


class HostLogits(Logits):
    """Logits the backend made on the host (llama.cpp): [B, n + 1, V] float32, whose last row of each
    window predicts nothing."""

    def __init__(self, array: np.ndarray):
        import torch

        n_seq, n_out, self.vocab = array.shape
        self.array = torch.from_numpy(array.reshape(-1, self.vocab))
        self.index = (torch.arange(n_seq)[:, None] * n_out + torch.arange(n_out - 1)).reshape(-1)
        self.n_rows, self.device = self.index.numel(), self.array.device

    def rows(self, r: slice):
        return self.array[self.index[r]]


class HeadLogits(Logits):
    """Head inputs [n, H] and the head: logits are made a chunk of rows at a time where they live."""

    def __init__(self, hidden, head: Head):
        self.hidden, self.head = hidden, head
        self.n_rows, self.vocab, self.device = hidden.shape[0], head.weight.shape[0], hidden.device

    def rows(self, r: slice):
        return self.head(self.hidden[r])


class Backend(Protocol):
    windows_per_batch: int | None
    """Windows decoded at once when the backend must batch as its upstream tool does (llama.cpp), else
    None: `eval.batch_size` decides."""

    def logits(self, ids: np.ndarray, n_scored: int) -> Logits:
        """Logits predicting the last n_scored tokens of each row of ids [B, L], B * n_scored rows, valid
        until the next call."""

    def info(self) -> dict:
        """backend, device, compute_dtype, and where known kernel and weight_memory_mb (for metrics.json)."""

    def speed(self, repetitions: int = REPETITIONS) -> dict:
        """pp and tg tokens/s (N_PROMPT, N_GEN) as llama-bench measures them: `speed_record`'s figures."""

    def complete(self, prompts: list[str], max_new_tokens: int, model_dir: str) -> list[dict]:
        """One greedy completion of each prompt as the backend's users run it (a user message through the
        chat template of the model's tokenizer in model_dir, where it has one): prompt, chat, completion,
        new_tokens, finish_reason."""

    def peak_vram_mb(self) -> float | None:
        """Peak GPU memory of the evaluation, or None off a GPU."""

    def close(self) -> None:
        """Free what the backend holds."""


def open_backend(method, params: dict, artifact: str, context: int, threads: int, kernel: str = "auto",
                 trust_remote_code: bool = False, gpus: int = 1, calib: str | None = None,
                 compile: bool = False) -> Backend:
    """The backend that evaluates a cell of `method` (a methods.Method) from its artifact: a GGUF file
    (llama.cpp) or a Hugging Face directory (transformers; load-time methods quantize while loading, and a
    fine-tuning method trains its adapters on the calibration tokens `calib` first; `compile`: the
    `eval.compile` setting)."""
    from ..methods import LLAMA_CPP

    if method.backend == LLAMA_CPP:
        from .llamacpp import LlamaCppBackend

        return LlamaCppBackend(artifact, context, threads)
    from .transformers import TransformersBackend

    return TransformersBackend.load(method, params, artifact, threads, kernel, trust_remote_code, gpus, calib, compile)
