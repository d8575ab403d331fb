"""The qlora method's module: the model loaded in bitsandbytes 4-bit, LoRA adapters attached with peft
and trained for the variant's steps on the calibration tokens (never scored ones), then evaluated
with its adapters on the shared token stream as any other cell: what a QLoRA fine-tune costs
(trainable parameters, peak memory, seconds per step) and what it does to quality.
"""
from __future__ import annotations

import time

import numpy as np

from . import io


def require() -> None:
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401


def train(params: dict, calib_ids: str, device: str, dtype, load):
    """The adapted model (adapters in its modules) and what training recorded; `load` loads the base
    model in `dtype` as the transformers backend places it, given a quantization config."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from . import bnb

    torch.manual_seed(0)
    model = bnb.quantize({"mode": params["quant_type"], "double_quant": params["double_quant"],
                          "compute_dtype": str(dtype).removeprefix("torch.")}, device, load)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = params["target_modules"]
    lora = LoraConfig(r=params["r"], lora_alpha=params["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    samples = torch.from_numpy(np.load(calib_ids).astype(np.int64))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params["lr"])
    losses, seconds = [], []
    model.train()
    for step in range(params["steps"]):
        batch = samples[step % len(samples)][None].to(device)
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        print(f"step {step + 1}/{params['steps']}: loss {losses[-1]:.4f}, {seconds[-1]:.2f} s", flush=True)
    model.eval()
    with torch.no_grad():  # the first step's sample again, after training: its loss before and after
        after = float(model(input_ids=samples[0][None].to(device), labels=samples[0][None].to(device)).loss)
    record = {"trainable_params": trainable, "train_steps": params["steps"], "train_tokens_per_step": samples.shape[1],
              "train_loss_first": losses[0], "train_loss_last": after, "train_losses": losses,
              "train_s_per_step": float(np.median(seconds)), "train_s": float(sum(seconds)),
              "train_peak_rss_mb": io.peak_rss_mb(),
              "train_peak_vram_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}
    return model.base_model.model, record  # the model itself, LoRA layers in place of its linear layers
