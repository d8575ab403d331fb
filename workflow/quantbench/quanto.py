"""The quanto method's module: optimum-quanto's int8, int4 and int2 weights (activations unquantized),
applied by transformers' QuantoConfig while loading."""
from __future__ import annotations


def quantize(params: dict, device: str, load):
    from transformers import QuantoConfig

    return load(QuantoConfig(weights=params["weights"]))


def require() -> None:
    import optimum.quanto  # noqa: F401
