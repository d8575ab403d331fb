"""Evaluation backends: what turns windows of token ids into logits at the scored positions.

A backend is one module here behind the interface below, written down once; the scoring loop
(scoring.py) needs nothing else of it. `open_backend` picks the backend a method's family runs in.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Skipped(Exception):
    """A cell that cannot run on this machine (a CUDA-only method or kernel without CUDA)."""


class Backend(Protocol):
    windows_per_batch: int | None
    """Windows decoded at once when the backend must batch as its upstream tool does (llama.cpp), else
    None: `eval.batch_size` decides."""

    def logits(self, ids: np.ndarray, n_scored: int) -> np.ndarray:
        """Logits predicting the last n_scored tokens of each row of ids [B, L]: [B, n_scored, vocab]
        float32 on the host, the caller's to overwrite, valid until the next call."""

    def info(self) -> dict:
        """backend, device, compute_dtype, and where known kernel and weight_memory_mb (for metrics.json)."""

    def peak_vram_mb(self) -> float | None:
        """Peak GPU memory of the evaluation, or None off a GPU."""

    def close(self) -> None:
        """Free what the backend holds."""


def open_backend(method, params: dict, artifact: str, context: int, threads: int, kernel: str = "auto",
                 trust_remote_code: bool = False) -> Backend:
    """The backend that evaluates a cell of `method` (a methods.Method) from its artifact: a GGUF file
    (llama.cpp) or a Hugging Face directory (transformers; load-time methods quantize while loading)."""
    from ..methods import Family

    if method.family is Family.GGUF:
        from .llamacpp import LlamaCppBackend

        return LlamaCppBackend(artifact, context, threads)
    from .transformers import TransformersBackend

    return TransformersBackend.load(method, params, artifact, threads, kernel, trust_remote_code)
