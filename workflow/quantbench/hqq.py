"""The hqq method's module: HQQ (half-quadratic quantization; calibration-free), each linear layer of
the loaded model quantized by hqq's own API. transformers 5 no longer accepts `HqqConfig` while loading
("not available yet"), so the model loads unquantized and hqq replaces its linear layers, the head
excepted, as transformers' integration did (groups along the input axis, axis=1)."""
from __future__ import annotations


def quantize(params: dict, device: str, load):
    import torch
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    from .support import hqq_blocks

    model = load()
    if problem := hqq_blocks(model):  # a model downloaded by this run, unseen before any job
        raise ValueError(problem)
    config = BaseQuantizeConfig(nbits=params["bits"], group_size=params["group_size"], axis=1)
    dtype = model.dtype if device == "cuda" else torch.float32
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=dtype, device=device)
    return model


def require() -> None:
    import hqq  # noqa: F401
