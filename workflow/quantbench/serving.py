"""Which vLLM `--quantization` value serves a checkpoint, read from its quantization_config by the rules
of vLLM's own loaders at a pinned version (VLLM), so a user knows before a GPU is rented.

vLLM 0.33.0 (vllm/model_executor/layers/quantization/): `gptq` and `gptq_marlin` are names of
AutoGPTQConfig (auto_gptq.py), `awq` and `awq_marlin` of AutoAWQConfig (auto_awq.py). Each one's
from_config requires the keys below (get_from_keys: any one of the names) and takes only the bit
widths of its TYPE_MAP: GPTQ 4 or 8 bits, symmetric only; AWQ 4 bits.
"""
from __future__ import annotations

VLLM = "0.33.0"
REQUIRED = {  # quant_method -> the keys its loader's from_config requires, each a tuple of accepted names
    "gptq": (("bits",), ("group_size",), ("desc_act",), ("sym",)),
    "awq": (("w_bit", "bits"), ("q_group_size", "group_size"), ("zero_point",)),
}
NAMES = {"gptq": ("gptq", "gptq_marlin"), "awq": ("awq", "awq_marlin")}  # the --quantization values that load it


def _takes(method: str, qc: dict) -> str | None:
    """Why vLLM's loader refuses these values, or None."""
    bits = qc.get("bits", qc.get("w_bit"))
    if method == "gptq" and (bits, qc.get("sym")) not in ((4, True), (8, True)):
        return f"vLLM's GPTQ loader takes 4 or 8 bits, symmetric (TYPE_MAP), not bits={bits}, sym={qc.get('sym')}"
    if method == "awq" and bits != 4:
        return f"vLLM's AWQ loader takes 4 bits (TYPE_MAP), not {bits}"
    return None


def vllm(qc: dict | None) -> dict:
    """{"vllm_quantization": the --quantization value, or None, "vllm_note": why not / its alternatives}."""
    method = (qc or {}).get("quant_method", "").lower()
    if method not in REQUIRED:
        return {"vllm_quantization": None, "vllm_note": f"no GPTQ or AWQ quantization_config (vLLM {VLLM})"}
    missing = [names for names in REQUIRED[method] if not any(n in qc for n in names)]
    why = (f"quantization_config lacks {' and '.join('/'.join(n) for n in missing)}, which vLLM's loader requires"
           if missing else _takes(method, qc))
    if why:
        return {"vllm_quantization": None, "vllm_note": f"{why} (vLLM {VLLM})"}
    name, marlin = NAMES[method]
    return {"vllm_quantization": name,
            "vllm_note": f"--quantization {name} (or {marlin}; vLLM {VLLM} picks its kernel by the GPU)"}
