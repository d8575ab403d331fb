"""The FP16 baseline's next-token distributions, stored once per model (distributions.npz): every
other cell's KL divergence, top-1 agreement and Δp are computed against them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import failures, io

ROWS = 512  # scored positions handled at once when comparing distributions (bounds memory)


@dataclass
class Distributions:
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
    def empty(cls) -> Distributions:
        z = np.zeros(0, np.float32)
        return cls(np.zeros(0, np.int32), z, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), z, z)

    def save(self, path: str) -> None:
        with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: str) -> Distributions:
        """The stored distributions. A file that cannot be read whole is removed, so that the next run
        recomputes it, and the job fails naming it: it is never compared with."""
        try:
            with np.load(path) as z:
                return cls(*(z[f] for f in cls.__dataclass_fields__))
        except Exception as exc:  # noqa: BLE001 - zip, pickle and shape errors alike mean a damaged file
            Path(path).unlink(missing_ok=True)
            raise failures.Damaged(f"{path} is damaged ({type(exc).__name__}: {exc}); it was removed: run again "
                                   "to recompute the FP16 baseline and the cells compared with it") from exc

    def logits(self, rows: slice):
        """The baseline's logits at scored positions `rows`, [n, V] float32."""
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
        """The baseline's log-probabilities at scored positions `rows`, [n, V] float32."""
        import torch

        return torch.log_softmax(self.logits(rows), dim=-1)

    def compare(self, logprobs: np.ndarray, targets: np.ndarray, target_logp: np.ndarray,
                offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per scored token of one window: KL(baseline || cell), whether the top-1 tokens agree, and
        Δp of the target (cell minus baseline), for the baseline's rows [offset, offset + len(targets))."""
        import torch

        rows = slice(offset, offset + len(targets))
        if not np.array_equal(self.targets[rows], targets):
            raise ValueError("the FP16 baseline scored other tokens: its distributions were made for another protocol or text")
        kl, top1 = [], []
        for i in range(0, len(targets), ROWS):
            lp = torch.from_numpy(logprobs[i:i + ROWS])
            p = self.logprobs(slice(offset + i, offset + i + len(lp))).double()
            kl.append((p.exp() * (p - lp.double())).sum(-1).numpy())
            top1.append((lp.argmax(-1) == p.argmax(-1)).numpy())
        delta_p = np.exp(target_logp) - np.exp(self.target_logp[rows].astype(np.float64))
        return np.concatenate(kl), np.concatenate(top1), delta_p


class Recorder:
    """Collects the baseline's distributions while the scoring loop runs it: after each batch
    (`on_batch`), the hidden states that entered the output head at the scored positions."""

    def __init__(self, model):
        self.model, self.head_input, self.parts = model, None, []
        self.hook = model.get_output_embeddings().register_forward_pre_hook(
            lambda _, args: setattr(self, "head_input", args[0]))

    def __call__(self, targets: np.ndarray, target_logp: np.ndarray) -> None:
        self.parts.append((targets.reshape(-1).astype(np.int32), target_logp.reshape(-1).astype(np.float32),
                           self.head_input.reshape(targets.size, -1).float().cpu().numpy()))

    def finish(self) -> Distributions:
        """The distributions, once the stored head is shown to reproduce the model's own log-probabilities."""
        self.hook.remove()
        kept = Distributions(*(np.concatenate(x) for x in zip(*self.parts)), **Distributions.head_of(self.model))
        kept.check_head(self.model.dtype)
        return kept
