"""The transformers backend: the baseline, packed checkpoints loaded back by GPTQModel, and the
load-time methods (bitsandbytes, EETQ), each loaded as its method's module says."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from .. import io
from ..methods import Family
from . import Skipped


class TransformersBackend:
    """A Hugging Face causal LM; only the scored suffix goes through the output head."""

    windows_per_batch = None

    def __init__(self, model, backend: str = "transformers", kernel: str | None = None):
        self.model = model.eval()
        self.kernel = kernel
        self.device = "cuda" if next(model.parameters()).is_cuda else "cpu"
        self.dtype = model.dtype
        self.backend = backend
        self.weight_bytes = model.get_memory_footprint()

    @classmethod
    def load(cls, method, params: dict, model_dir: str, threads: int, kernel: str = "auto",
             trust_remote_code: bool = False) -> TransformersBackend:
        """A cell of `method` (a methods.Method) from a Hugging Face directory: the model itself (baseline),
        a packed checkpoint evaluated by `kernel`, or the model quantized while loading."""
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        cuda = torch.cuda.is_available()
        if method.cuda_only and not cuda:
            raise Skipped(f"{method.cuda_only}, and this machine has none")
        module = importlib.import_module(f"quantbench.{method.module}") if method.module else None
        if method.family is Family.PACKED:
            model, used = module.load(method.name, model_dir, kernel, trust_remote_code)
            return cls(model, backend=f"gptqmodel-{method.name}", kernel=used)
        kwargs = {}
        if method.family is Family.LOAD_TIME:
            module.require()
            kwargs["quantization_config"] = module.quantization_config(params)
        # fp16 on a GPU (bf16 where the checkpoint is bf16); fp32 on the CPU, where half matmuls are slow.
        dtype = torch.float32
        if cuda:
            dtype = torch.bfloat16 if _checkpoint_dtype(model_dir) == "bfloat16" else torch.float16
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map="cuda" if cuda else "cpu",
                                                     trust_remote_code=trust_remote_code, **kwargs)
        return cls(model, backend="transformers" if method.family is Family.BASELINE else f"transformers-{method.name}")

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
        import torch

        length = ids.shape[1]
        with torch.inference_mode():
            batch = torch.from_numpy(ids).to(self.device)
            keep = torch.arange(length - n_scored - 1, length - 1, device=self.device)
            return self.model(input_ids=batch, logits_to_keep=keep).logits.float().cpu().numpy()

    def peak_vram_mb(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None

    def close(self) -> None:
        pass


def _checkpoint_dtype(model_dir: str) -> str | None:
    cfg = io.read_json(Path(model_dir) / "config.json")
    return cfg.get("dtype") or cfg.get("torch_dtype")
