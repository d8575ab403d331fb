"""HF -> GGUF conversion and llama.cpp quantization.

The converter is llama.cpp's own `convert_hf_to_gguf.py`, taken from the sdist of
the pinned llama-cpp-python (the same llama.cpp revision that quantizes and
evaluates), fetched once into a cache instead of being vendored here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from . import io

LLAMA_CPP_PYTHON = "llama-cpp-python"
LLAMA_CPP_PYTHON_PIN = "0.3.36"  # the same pin as pyproject.toml and envs/llamacpp.yaml
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def fetch_converter(out_dir: str | os.PathLike, version: str = LLAMA_CPP_PYTHON_PIN) -> Path:
    """Unpack llama.cpp's converter from the llama-cpp-python sdist into `out_dir`."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--dest", tmp, f"{LLAMA_CPP_PYTHON}=={version}"],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with io.atomic_path(out_dir) as staging, tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].split("/")[0] in CONVERTER_PARTS]
            if not members:
                raise RuntimeError(f"{sdist.name} carries no vendor/llama.cpp/convert_hf_to_gguf.py")
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
            io.write_json(staging / "source.json", {"sdist": sdist.name, "sha256": io.sha256_file(sdist)})
    return out_dir / "convert_hf_to_gguf.py"


def convert(hf_dir: str, out: str, converter: str, outtype: str = "f16") -> None:
    with io.atomic_path(out) as tmp:
        subprocess.run(
            [sys.executable, converter, hf_dir, "--outtype", outtype, "--outfile", str(tmp)],
            check=True,
        )


def quantize(src: str, dst: str, gguf_type: str, threads: int) -> dict:
    """Quantize an F16 GGUF with llama.cpp's llama_model_quantize; returns timing info."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}", None)
    if ftype is None:
        raise ValueError(f"llama.cpp {llama_cpp.__version__} has no LLAMA_FTYPE_MOSTLY_{gguf_type}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    t0 = time.perf_counter()
    with io.atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(src.encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {gguf_type}) failed with code {rc}")
    return {"quantize_s": time.perf_counter() - t0, "quantize_threads": threads}


def stats(path: str) -> dict:
    """Size, parameter count and bits per weight from the GGUF's own tensor table."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
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
    }
