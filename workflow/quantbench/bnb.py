"""The bnb method's module: bitsandbytes int8 (LLM.int8 with its outlier threshold), nf4 and fp4,
quantized while transformers loads the model."""
from __future__ import annotations


def quantize(params: dict, device: str, load):
    import torch
    from transformers import BitsAndBytesConfig

    if params["mode"] == "int8":
        return load(BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=params["threshold"]))
    return load(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=params["mode"],
                                   bnb_4bit_use_double_quant=params["double_quant"],
                                   bnb_4bit_compute_dtype=getattr(torch, params["compute_dtype"])))


def require() -> None:
    """bitsandbytes runs on a CPU too: nothing to check."""
