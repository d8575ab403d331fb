"""The scoring loop: a protocol's windows of the shared token stream -> per-token NLL, perplexity,
the distances from the FP16 baseline's distributions, and what it cost.

It asks a backend (backends/) only for logits at the scored positions, so every backend scores
the same ids in the same windows.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .distributions import Distributions
from .protocols import Protocol, Window

SOFTMAX_ROWS = 64  # rows a thread normalizes at once: their exponentials stay in cache


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


def score(backend, tokens: np.ndarray, wins: list[Window], protocol: Protocol, batch_size: int = 1,
          bos_id: int | None = None, baseline: Distributions | None = None,
          on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None, threads: int = 1) -> dict:
    """Score `wins` of `tokens` with `backend`: perplexity and costs, and the distances from the
    `baseline` distributions when given. `on_batch(targets, target_logp)` sees every batch (the
    baseline records its distributions through it)."""
    nlls, kl, top1, delta_p = [], [], [], []
    offset = fed = 0
    t0 = time.perf_counter()
    batch_size = backend.windows_per_batch or batch_size  # llama.cpp batches as llama-perplexity does
    with ThreadPoolExecutor(threads) as pool:
        for group in _batches(wins, batch_size):
            n = group[0].n_scored
            ids = np.stack([tokens[w.start:w.end] for w in group]).astype(np.int64)
            if group[0].bos:
                ids[:, 0] = bos_id
            logits = backend.logits(ids, n)  # [B, n, vocab] float32, ours to overwrite
            targets = ids[:, -n:]
            target_logp = log_softmax(logits, targets, pool, full=baseline is not None)
            nlls += list(-target_logp)
            if baseline is not None:
                for b in range(len(group)):
                    values = baseline.compare(logits[b], targets[b], target_logp[b], offset + b * n)
                    for acc, value in zip((kl, top1, delta_p), values):
                        acc.append(value)
            if on_batch is not None:
                on_batch(targets, target_logp)
            offset += targets.size
            fed += ids.size
    eval_s = time.perf_counter() - t0
    if baseline is not None and offset != baseline.targets.size:
        raise ValueError(f"the FP16 baseline's distributions have {baseline.targets.size} scored tokens, "
                         f"this cell {offset}")
    record = _perplexity(nlls, protocol.window_mean) | {
        "eval_s": eval_s, "eval_tokens_fed": fed, "eval_tokens_per_s": fed / eval_s}
    if baseline is not None:
        record |= distances(np.concatenate(kl), np.concatenate(top1), np.concatenate(delta_p))
    return record


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
