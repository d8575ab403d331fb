"""The FP16 baseline's next-token distributions, stored once per model (distributions.npz): every
other cell's KL divergence, top-1 agreement and Δp are computed against them, on the cell's device."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import failures, io


def _to_numpy(t) -> np.ndarray:
    """A tensor as numpy; bfloat16, which numpy lacks, as its 16-bit patterns."""
    import torch

    t = t.detach().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _to_torch(a: np.ndarray, dtype: str):
    import torch

    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


@dataclass
class Distributions:
    """The FP16 baseline's next-token distribution at every scored position, stored exactly and
    compactly: the hidden state entering the output head and the head itself, once, both in the
    compute dtype the baseline ran in. The distributions are recomputed from them with the same
    matmul, so KL, top-1 agreement and Δp are exact, not a top-k approximation, at
    hidden_size * (2 bytes in fp16/bf16, 4 in fp32) + 8 bytes a scored token."""
    targets: np.ndarray       # int32 [T]: the scored token ids, to prove both sides scored the same
    target_logp: np.ndarray   # float32 [T]
    hidden: np.ndarray        # [T, H] in `dtype`: input of the output head at each scored position
    head: np.ndarray          # [V, H] in `dtype`
    head_bias: np.ndarray     # [V], or [0] without a bias
    logit_scale: np.ndarray   # float32 [2]: multiplier, then soft cap (0: none), as the model's forward applies
    dtype: np.ndarray         # str []: the compute dtype (float32, float16, bfloat16)
    head_ref: np.ndarray      # str [2]: the head's tensor in the model's safetensors and the sha256 of its bytes
                              # in `dtype`, when it is stored there and not here (`head` then empty); else ''

    @classmethod
    def empty(cls) -> Distributions:
        z = np.zeros(0, np.float32)
        return cls(np.zeros(0, np.int32), z, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), z, z,
                   np.array("float32"), np.array(["", ""]))

    def save(self, path: str) -> None:
        with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: str, model_dir: str) -> Distributions:
        """The stored distributions, with the head from `model_dir` (the unquantized model) where it
        was stored there. A file that cannot be read whole is removed, so that the next run recomputes
        it, and the job fails naming it: it is never compared with."""
        try:
            with np.load(path) as z:
                kept = cls(*(z[f] for f in cls.__dataclass_fields__))
        except Exception as exc:  # noqa: BLE001 - zip, pickle and shape errors alike mean a damaged file
            Path(path).unlink(missing_ok=True)
            raise failures.Damaged(f"{path} is damaged ({type(exc).__name__}: {exc}); it was removed: run again "
                                   "to recompute the FP16 baseline and the cells compared with it") from exc
        name, digest = (str(x) for x in kept.head_ref)
        if name:
            head = _checkpoint_tensor(model_dir, name, str(kept.dtype))
            if head is None or io.sha256_bytes(head.data) != digest:
                raise failures.Damaged(f"the output head {name!r} of {model_dir} is not the one the FP16 baseline "
                                       f"ran with ({path}): run the baseline again")
            kept.head = head
        return kept

    @property
    def bytes_per_token(self) -> int:
        return self.hidden.shape[1] * self.hidden.itemsize + 8

    def head_on(self, device):
        """The stored head as a backends.Head on `device` (moved there once)."""
        from .backends import Head

        if getattr(self, "_head", None) is None or self._head.weight.device != device:
            dtype = str(self.dtype)
            bias = _to_torch(self.head_bias, dtype).to(device) if self.head_bias.size else None
            scale, softcap = (float(x) for x in self.logit_scale)
            self._head = Head(_to_torch(self.head, dtype).to(device), bias, scale, softcap)
        return self._head

    def reference(self, offset: int, targets: np.ndarray, device):
        """The baseline's logits at its scored rows [offset, offset + len(targets)) on `device`, in its compute
        dtype, as its forward made them, and its target log-probabilities there (float32); other targets
        than the baseline scored are refused."""
        import torch

        rows = slice(offset, offset + len(targets))
        if not np.array_equal(self.targets[rows], targets):
            raise ValueError("the FP16 baseline scored other tokens: its distributions were made for another protocol or text")
        hidden, target_logp = _to_torch(self.hidden[rows], str(self.dtype)), torch.from_numpy(self.target_logp[rows])
        if device.type == "cuda":  # page-locked (torch's cached host blocks), so that the rows travel while the GPU
            # computes: a copy from pageable memory holds the host until the GPU has caught up, every chunk
            hidden, target_logp = hidden.pin_memory(), target_logp.pin_memory()
        return self.head_on(device)(hidden.to(device, non_blocking=True)), target_logp.to(device, non_blocking=True)


class Recorder:
    """Collects the baseline's distributions while the scoring loop runs it: after each batch
    (`on_batch`), the head inputs at the scored positions, in the compute dtype, into one host
    buffer for all `n_tokens`. From a GPU, each batch goes by DMA into one of two page-locked
    staging buffers on a stream of its own while the next batch computes, and a thread moves it on
    into the (pageable) buffer: a copy straight into pageable memory occupies the driver, and with
    it the launches of the next batch; pinning the whole buffer (2.4 GB for an 8B model) stalled
    the first batch instead."""

    def __init__(self, backend, n_tokens: int):
        import torch

        self.model, self.head = backend.model, backend.head
        self.targets, self.target_logp, self.filled, self.copies = [], [], 0, []
        weight = self.head.weight
        self.hidden = torch.empty((n_tokens, weight.shape[1]), dtype=weight.dtype)
        self.copier = ThreadPoolExecutor(1) if weight.is_cuda else None
        self.staging, self.stream = [], None

    def __call__(self, targets: np.ndarray, target_logp: np.ndarray, logits) -> None:
        hidden = logits.hidden.to(self.head.weight.dtype)
        rows = slice(self.filled, self.filled + len(hidden))
        self.filled += len(hidden)
        if self.copier is None:
            self.hidden[rows].copy_(hidden)
        else:
            self._stage(hidden, rows)
        self.targets.append(targets.reshape(-1).astype(np.int32))
        self.target_logp.append(target_logp.reshape(-1).astype(np.float32))

    def _stage(self, hidden, rows: slice) -> None:
        """hidden (on the GPU) into self.hidden[rows]: DMA into the staging buffer the batch before last
        used, once its move onwards is done, then moved on by the thread."""
        import torch

        if self.stream is None:
            self.stream = torch.cuda.Stream(hidden.device)
        if not self.staging or len(self.staging[0]) < len(hidden):  # the first batch, or a larger one
            for copy in self.copies:
                copy.result()
            self.staging = [torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True) for _ in range(2)]
        k = len(self.copies) % 2
        if len(self.copies) >= 2:
            self.copies[-2].result()  # the staging buffer is free again
        buffer = self.staging[k][:len(hidden)]
        self.stream.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(self.stream):
            buffer.copy_(hidden, non_blocking=True)
            hidden.record_stream(self.stream)  # the allocator keeps hidden until the copy has read it
            done = self.stream.record_event()
        self.copies.append(self.copier.submit(_move_on, done, buffer, self.hidden[rows]))

    def finish(self, model_dir: str | None = None) -> Distributions:
        """The distributions. Where `model_dir`'s safetensors hold the head exactly as the baseline ran
        it, only its name and sha256 are kept (an 8B model's head is 1 GB in bf16)."""
        import torch

        for copy in self.copies:
            copy.result()  # the copies to the host, done (or their error raised)
        if self.copier is not None:
            self.copier.shutdown()
        self.staging = []  # page-locked, up to a batch's rows twice: not kept for the rest of the job
        head = self.head
        dtype = str(head.weight.dtype).removeprefix("torch.")
        name = next((n for n, p in self.model.named_parameters() if p is self.model.get_output_embeddings().weight), None)
        stored = _checkpoint_tensor(model_dir, name, dtype) if model_dir and name else None
        if stored is not None and torch.equal(_to_torch(stored, dtype).to(head.weight.device), head.weight):
            weight, ref = np.zeros((0, 0), stored.dtype), np.array([name, io.sha256_bytes(stored.data)])
        else:
            weight, ref = _to_numpy(head.weight), np.array(["", ""])
        bias = _to_numpy(head.bias.to(head.weight.dtype)) if head.bias is not None else np.zeros(0, np.float32)
        return Distributions(np.concatenate(self.targets), np.concatenate(self.target_logp),
                             _to_numpy(self.hidden[:self.filled]), weight, bias,
                             np.array([head.scale, head.softcap], np.float32), np.array(dtype), ref)


def _move_on(done, staging, dst) -> None:
    """Once the DMA into `staging` is `done`, its rows into dst (host memory to host memory)."""
    done.synchronize()
    dst.copy_(staging)


def _checkpoint_tensor(model_dir: str, name: str, dtype: str) -> np.ndarray | None:
    """Tensor `name` of a Hugging Face directory's safetensors in `dtype` (as stored by _to_numpy), or None."""
    import torch
    from safetensors import safe_open

    index = Path(model_dir) / "model.safetensors.index.json"
    files = [Path(model_dir) / io.read_json(index)["weight_map"].get(name, "")] if index.is_file() \
        else sorted(Path(model_dir).glob("*.safetensors"))
    for file in files:
        if file.is_file():
            with safe_open(str(file), "pt") as f:
                if name in f.keys():
                    return _to_numpy(f.get_tensor(name).to(getattr(torch, dtype)))
    return None
