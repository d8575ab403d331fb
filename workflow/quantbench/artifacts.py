"""What a cell's artifact weighs: size on disk, parameter count and bits per weight, counted the
way its method's record says (methods.Bits), for every family in one place."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from . import io
from .methods import Bits, Family, Method


def gguf_stats(path: str) -> dict:
    """Size, parameter count and bits per weight from the GGUF's own tensor table, its type mix, and the
    type its metadata names."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)
    field = reader.get_field("general.file_type")  # absent from some files
    file_type = LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_") if field else None
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_elements)
    return {
        "size_bytes": Path(path).stat().st_size,
        "n_params": n_params,
        "bits_per_weight": 8 * n_bytes / n_params,
        "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
        "file_type": file_type,  # the llama.cpp type its quantizer was asked for (Q4_K_M), or None
    }


def safetensors_stats(hf_dir: str) -> dict:
    """Size, parameter count and bits per weight from the safetensors headers (no weights read)."""
    n_params = n_bytes = size = 0
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        size += path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, t in header.items():
            if name != "__metadata__":
                n_params += math.prod(t["shape"])
                n_bytes += t["data_offsets"][1] - t["data_offsets"][0]
    return {"size_bytes": size, "stored_bytes": n_bytes, "n_params": n_params, "bits_per_weight": 8 * n_bytes / n_params}


def measure(method: Method, artifact: str, base_dir: str | None = None, quantize_info: str | None = None) -> dict:
    """The artifact's statistics, with what quantizing it recorded (quantize.json). A quantization that
    failed raises here, so the cell's row says why. In-memory methods get their bits per weight once
    loaded (`in_memory`)."""
    info = io.read_json(quantize_info) if quantize_info else {}
    if info.get("status", "ok") != "ok":
        what = "taking it" if method.family is Family.PREQUANTIZED else "quantization"
        raise RuntimeError(f"{what} failed: {info['error']}")
    if method.counted is Bits.GGUF:  # read once at quantize time, not by every evaluation
        return info if "tensor_types" in info else gguf_stats(artifact) | info
    stats = safetensors_stats(artifact)
    if method.counted is Bits.IN_MEMORY:  # nothing on disk: size is the in-memory footprint, known once loaded
        return {"n_params": stats["n_params"]}
    if method.counted is Bits.PACKED:  # over the unquantized model's parameters, not the packed tensors'
        n_params = safetensors_stats(base_dir)["n_params"]
        stats |= {"n_params": n_params, "bits_per_weight": 8 * stats["stored_bytes"] / n_params}
    return stats | info


def in_memory(weight_memory_mb: float, n_params: int) -> float:
    """Bits per weight of a model as loaded."""
    return 8 * weight_memory_mb * 2**20 / n_params
