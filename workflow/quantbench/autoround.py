"""The autoround and autoround-gguf methods' quantization: AutoRound (Intel's auto-round; sign-gradient
descent on each block's rounding and clipping, tuned to reproduce the block's FP outputs on the
calibration tokens). autoround is saved in GPTQ's checkpoint format, so that GPTQModel loads it back as
it does GPTQ's (packed.py); autoround-gguf is AutoRound's own GGUF export of a llama.cpp type, evaluated
in llama.cpp beside llama.cpp's own quantization of that type."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import cpu, io

BATCH = 8  # AutoRound's default batch of calibration samples per tuning step


def _rounder(hf_dir: str, calib_ids: str, **options):
    """AutoRound over the model in hf_dir, calibrated on the shared spec's token samples; and the tokenizer."""
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sources import trusts_remote_code

    trust = trusts_remote_code(hf_dir)
    samples = np.load(calib_ids).astype(np.int64)
    cuda = torch.cuda.is_available()
    if not cuda:
        options["amp"] = tuning_dtype() == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float16 if cuda else torch.float32,
                                                 trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust)
    rounder = AutoRound(model, tokenizer=tokenizer, dataset=[torch.from_numpy(row)[None] for row in samples],
                        nsamples=len(samples), seqlen=samples.shape[1], batch_size=min(BATCH, len(samples)), seed=0,
                        device_map="cuda" if cuda else "cpu", enable_torch_compile=False, **options)
    return rounder, tokenizer


def tuning_dtype() -> str:
    """What AutoRound tunes in on this CPU: it picks bfloat16 on any CPU, and is held to float32 (amp off)
    where this one emulates bfloat16."""
    return cpu.compute_dtype("bfloat16")


def quantize(params: dict, hf_dir: str, calib_ids: str, out_dir: str) -> dict:
    """autoround: a GPTQ-format checkpoint directory."""
    rounder, tokenizer = _rounder(hf_dir, calib_ids, scheme="W4A16", bits=params["bits"],
                                  group_size=params["group_size"], sym=params["sym"], iters=params["iters"])
    start = time.perf_counter()
    rounder.quantize()
    quantize_s = time.perf_counter() - start
    with io.atomic_path(out_dir) as staging:
        rounder.save_quantized(str(staging), format="auto_gptq", inplace=True)
        tokenizer.save_pretrained(str(staging))
    return {"quantize_s": quantize_s, **_dtype()}


def _dtype() -> dict:
    import torch

    return {} if torch.cuda.is_available() else {"quantize_dtype": tuning_dtype()}


def export_gguf(params: dict, hf_dir: str, calib_ids: str, out: str, threads: int) -> dict:
    """autoround-gguf: one GGUF file of the variant's llama.cpp type (AutoRound's export writes it, its
    vocabulary and metadata converted by its own copy of llama.cpp's converter)."""
    import torch

    torch.set_num_threads(threads)
    scheme = f"gguf:{params['type'].lower()}"
    rounder, _ = _rounder(hf_dir, calib_ids, scheme=scheme, iters=params["iters"])
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
        start = time.perf_counter()
        rounder.quantize_and_save(tmp, format=scheme)  # for GGUF, part of the rounding happens as it packs
        quantize_s = time.perf_counter() - start
        written = sorted(Path(tmp).rglob("*.gguf"))
        if len(written) != 1:
            raise RuntimeError(f"AutoRound's {scheme} export wrote {[p.name for p in written] or 'no GGUF file'}; "
                               "expected one")
        with io.atomic_path(out) as staging:
            shutil.move(written[0], staging)
    return {"quantize_s": quantize_s, **_dtype()}
