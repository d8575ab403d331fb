"""The autoround method's quantization: AutoRound (Intel's auto-round; sign-gradient descent on each
block's rounding and clipping, tuned to reproduce the block's FP outputs on the calibration tokens),
saved in GPTQ's checkpoint format so that GPTQModel loads it back as it does GPTQ's (packed.py)."""
from __future__ import annotations

import time

import numpy as np

from . import io

BATCH = 8  # AutoRound's default batch of calibration samples per tuning step


def quantize(params: dict, hf_dir: str, calib_ids: str, out_dir: str) -> dict:
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sources import trusts_remote_code

    trust = trusts_remote_code(hf_dir)
    samples = np.load(calib_ids).astype(np.int64)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float16 if cuda else torch.float32,
                                                 trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust)
    start = time.perf_counter()
    rounder = AutoRound(
        model, tokenizer=tokenizer, scheme="W4A16", bits=params["bits"], group_size=params["group_size"],
        sym=params["sym"], iters=params["iters"], dataset=[torch.from_numpy(row)[None] for row in samples],
        nsamples=len(samples), seqlen=samples.shape[1], batch_size=min(BATCH, len(samples)), seed=0,
        device_map="cuda" if cuda else "cpu", enable_torch_compile=False)
    rounder.quantize()
    quantize_s = time.perf_counter() - start
    with io.atomic_path(out_dir) as staging:
        rounder.save_quantized(str(staging), format="auto_gptq", inplace=True)
        tokenizer.save_pretrained(str(staging))
    return {"quantize_s": quantize_s}
