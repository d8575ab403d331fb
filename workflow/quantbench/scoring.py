"""The scoring loop: a protocol's windows of the shared token stream -> per-token NLL, perplexity,
the distances from the FP16 baseline's distributions, and what it cost.

It asks a backend (backends/) only for logits at the scored positions, so every backend scores
the same ids in the same windows; the logits stay on the backend's device.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from functools import cache

import numpy as np

from .distributions import Distributions
from .protocols import Protocol, Window

# `batch_size: auto` tries this many tokens a batch first, then halves until it fits. An 8B model scored
# as fast at 32 windows of 2048 as at 128 (H100), in half the memory.
AUTO_FIRST_TOKENS = 1 << 16
PROGRESS_EVERY_S = 30


def _shape(w: Window) -> tuple:
    return w.end - w.start, w.n_scored, w.bos


def _group(wins: list[Window], start: int, size: int) -> list[Window]:
    """Up to `size` consecutive windows of one shape from wins[start]."""
    group = wins[start:start + size]
    same = next((i for i, w in enumerate(group) if _shape(w) != _shape(group[0])), len(group))
    return group[:same]


class Progress:
    """Done / total, tokens/s and ETA in the job's log, at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, total: int):
        self.total, self.t0 = total, time.perf_counter()
        self.last = self.t0

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY_S and done < self.total:
            return
        self.last, rate = now, done / max(now - self.t0, 1e-9)
        print(f"{done}/{self.total} tokens scored ({done / self.total:.0%}), {rate:,.0f}/s, "
              f"ETA {(self.total - done) / max(rate, 1e-9):.0f} s", file=sys.stderr, flush=True)


def score(backend, tokens: np.ndarray, wins: list[Window], protocol: Protocol, batch_size: int | str = 1,
          bos_id: int | None = None, baseline: Distributions | None = None,
          on_batch: Callable | None = None, compile: bool = False) -> dict:
    """Score `wins` of `tokens` with `backend`: perplexity and costs, and the distances from the
    `baseline` distributions when given. Logits stay on the backend's device, normalized a chunk
    of rows at a time; only per-token scalars reach the host. `on_batch(targets, target_logp,
    logits)` sees every batch (the baseline records its distributions through it). With
    `batch_size: auto` on a GPU, the largest batch that fits is found by halving from
    AUTO_FIRST_TOKENS on running out of memory. With `compile`, chunks on a GPU are scored by
    `chunk_scores` compiled."""
    import torch

    nlls, dists = [], []
    offset = fed = done = i = largest = 0
    auto = batch_size == "auto"
    if backend.windows_per_batch:  # llama.cpp batches as llama-perplexity does
        size, auto = backend.windows_per_batch, False
    elif auto:
        auto = getattr(backend, "device", "cpu") == "cuda"
        size = max(1, AUTO_FIRST_TOKENS // max(w.end - w.start for w in wins)) if auto else 1
    else:
        size = batch_size
    progress = Progress(sum(w.n_scored for w in wins))
    t0 = time.perf_counter()
    while i < len(wins):
        group = _group(wins, i, size)
        n = group[0].n_scored
        ids = np.stack([tokens[w.start:w.end] for w in group]).astype(np.int64)
        if group[0].bos:
            ids[:, 0] = bos_id
        try:
            logits = backend.logits(ids, n)
            target_logp, dist = _score_rows(logits, ids[:, -n:].reshape(-1), baseline, offset, compile)
        except torch.OutOfMemoryError:
            if not auto or size == 1:
                raise
            size = len(group) // 2
            torch.cuda.empty_cache()
            continue
        auto = False  # a batch that fits once fits every time: later shapes are no larger
        largest = max(largest, len(group))
        nlls += list(-target_logp.reshape(len(group), n))
        dists.append(dist)
        if on_batch is not None:
            on_batch(ids[:, -n:], target_logp.reshape(len(group), n), logits)
        i, offset, fed, done = i + len(group), offset + target_logp.size, fed + ids.size, done + target_logp.size
        progress(done)
    eval_s = time.perf_counter() - t0
    if baseline is not None and offset != baseline.targets.size:
        raise ValueError(f"the FP16 baseline's distributions have {baseline.targets.size} scored tokens, "
                         f"this cell {offset}")
    record = _perplexity(nlls, protocol.window_mean) | {
        "eval_s": eval_s, "eval_tokens_fed": fed, "eval_tokens_per_s": fed / eval_s, "batch_size": largest}
    if baseline is not None:
        record |= distances(*(np.concatenate(x) for x in zip(*dists)))
    return record


def _score_rows(logits, targets: np.ndarray, baseline: Distributions | None, offset: int, compile: bool = False):
    """The targets' log-probabilities (float64 on the host) and, with a baseline, the per-token
    distances, a chunk of rows at a time where the logits are."""
    import torch

    scorer = compiled_chunk_scores() if compile and logits.device.type == "cuda" else chunk_scores
    t = torch.from_numpy(targets).to(logits.device)
    target_logp = torch.empty(t.numel(), dtype=torch.float32, device=logits.device)
    dist = []
    for start in range(0, t.numel(), logits.chunk_rows):
        r = slice(start, start + logits.chunk_rows)
        if baseline is None:
            target_logp[r] = scorer(logits.rows(r), t[r])[0]
            continue
        reference, reference_logp = baseline.reference(offset + start, targets[r], logits.device)
        target_logp[r], kl, top1 = scorer(logits.rows(r), t[r], reference)
        del reference  # before the next chunk's logits are made
        dist.append((kl, top1, target_logp[r].double().exp() - reference_logp.double().exp()))
    return target_logp.double().cpu().numpy(), tuple(torch.cat(d).cpu().numpy() for d in zip(*dist)) if dist else None


def chunk_scores(logits, targets, reference=None):
    """One chunk of rows: the targets' log-probabilities, and against the baseline's `reference` logits
    KL(baseline || cell) and whether the top-1 tokens agree. One log-softmax a side, accumulated in
    float32 from the logits' own dtype; KL's float32 terms summed in float64."""
    import torch

    logprobs = torch.log_softmax(logits, -1, dtype=torch.float32)
    target_logp = logprobs.gather(1, targets[:, None])[:, 0]
    if reference is None:
        return target_logp, None, None
    p = torch.log_softmax(reference, -1, dtype=torch.float32)
    kl = torch.nn.functional.kl_div(logprobs, p, reduction="none", log_target=True).sum(-1, dtype=torch.float64)
    return target_logp, kl, logprobs.argmax(-1) == p.argmax(-1)


@cache
def compiled_chunk_scores():
    """chunk_scores compiled for a GPU: the log-softmaxes, gather, KL and argmax fuse into reductions that
    write only per-token scalars, where eager torch writes a float32 copy and the float32 log-probabilities
    of every row (a third of a small model's eager scoring time on an H200)."""
    import torch

    return torch.compile(chunk_scores, dynamic=True)


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
