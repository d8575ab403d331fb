"""The torchao method's module: torchao's weight-only int8 and int4, and float8 weights and activations
(CUDA), applied by transformers' TorchAoConfig while loading.

int4 is torchao's IntxWeightOnlyConfig on every device (symmetric, one scale per group), so a cell means
the same numbers on a CPU and a GPU; torchao 0.18 holds those int4 values unpacked in int8 bytes,
which the cell's bits per weight (its memory) show."""
from __future__ import annotations


def quantize(params: dict, device: str, load):
    import torch
    from torchao import quantization as ao
    from transformers import TorchAoConfig

    if params["weights"] == "int8":
        config = ao.Int8WeightOnlyConfig()
    elif params["weights"] == "int4":
        config = ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(params["group_size"]))
    else:
        config = ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow())
    return load(TorchAoConfig(config))


def require() -> None:
    import torchao  # noqa: F401
