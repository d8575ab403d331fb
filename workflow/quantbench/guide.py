"""The selection guide: the best measured cell of each model for each usual scenario, the numbers
that decided it, and whether that agrees with the usual advice."""
from __future__ import annotations

import pandas as pd

from .methods import BASELINE, QLORA
from .summary import label, ok, peak_mb, weight_bytes


def selection_guide(df: pd.DataFrame, budget_pct: float) -> list[dict]:
    """The guide of each model: its cells are ranked among themselves only (each model scored its own
    token stream, against its own FP16 baseline)."""
    return [{"model": model, **entry} for model, cells in df.groupby("model", sort=True)
            for entry in _model_guide(cells, budget_pct)]


def _model_guide(df: pd.DataFrame, budget_pct: float) -> list[dict]:
    """For each usual scenario: the best measured cell, the numbers that decided it, and whether it
    agrees with the usual advice. Cells beyond the quality budget (ΔPPL %) are not candidates."""
    quantized = ok(df[df["method"] != BASELINE.name]).dropna(subset=["delta_ppl_pct"])
    qlora = quantized[quantized["method"] == QLORA.name]
    quantized = quantized[quantized["method"] != QLORA.name]  # a fine-tuned model: no candidate for inference
    fit = quantized[quantized["delta_ppl_pct"] <= budget_pct]
    out = []

    def entry(scenario, advice, best, decided_by, agrees, why_not=None):
        out.append({"scenario": scenario, "advice": advice,
                    "best": None if best is None else label(best), "decided_by": decided_by,
                    "agreement": "not enough measured cells to judge it" if agrees is None else
                    ("agrees" if agrees else "disagrees") + (f": {why_not}" if why_not else "")})

    def numbers(row, *extra):
        parts = [f"ΔPPL {row['delta_ppl_pct']:+.1f}%", f"KL {row['kl_mean']:.4f}" if pd.notna(row.get("kl_mean")) else None,
                 f"{row['size_bytes'] / 1e6:.0f} MB" if pd.notna(row.get("size_bytes")) else None,
                 f"{row['bits_per_weight']:.2f} bpw" if pd.notna(row.get("bits_per_weight")) else None, *extra]
        return ", ".join(p for p in parts if p)

    # CPU / low memory: the smallest weights on a CPU within the quality budget.
    cpu = fit[fit["device"] == "cpu"]
    if cpu.empty:
        entry("CPU / low memory", "GGUF Q4_K_M or Q5_K_M", None, f"no CPU cell within ΔPPL ≤ {budget_pct}%", None)
    else:
        best = cpu.loc[weight_bytes(cpu).idxmin()]
        agrees = best.get("file_type") in ("Q4_K_M", "Q5_K_M")  # a GGUF file of that type, whoever quantized it
        entry("CPU / low memory", "GGUF Q4_K_M or Q5_K_M", best,
              f"smallest weights within ΔPPL ≤ {budget_pct}% on the CPU: " + numbers(best, f"peak {peak_mb(best):.0f} MB"),
              agrees, None if agrees else f"{best['method']} {best['variant']} is smaller at the same quality budget")

    # GPU throughput: the fastest cell on CUDA within the quality budget.
    gpu = fit[fit["device"] != "cpu"]
    if gpu.empty:
        entry("GPU throughput", "AWQ or GPTQ", None, "no cell ran on a GPU in this run", None)
    else:
        best = gpu.loc[gpu["eval_tokens_per_s"].idxmax()]
        entry("GPU throughput", "AWQ or GPTQ", best,
              f"most eval tokens/s on {best['device']} within ΔPPL ≤ {budget_pct}%: "
              + numbers(best, f"{best['eval_tokens_per_s']:.0f} tok/s"), best["method"] in ("awq", "gptq"))

    # Fine-tuning (QLoRA): measured QLoRA cells where the run has them (the least peak memory per step
    # within the budget), else the bitsandbytes 4-bit bases QLoRA trains on (the closest to FP16).
    four = quantized[(quantized["method"] == "bnb") & (quantized["bits"] == 4)]
    if not qlora.empty:
        fitting = qlora[qlora["delta_ppl_pct"] <= budget_pct]
        candidates = fitting if not fitting.empty else qlora
        best = candidates.loc[candidates.apply(peak_mb, axis=1, step="train_").idxmin()]
        memory = peak_mb(best, "train_")
        entry("Fine-tuning (QLoRA)", "bitsandbytes 4-bit (nf4)", best,
              f"QLoRA measured: {best['trainable_params']:.0f} trainable parameters, {memory:.0f} MB peak, "
              f"{best['train_s_per_step']:.2f} s a step, loss {best['train_loss_first']:.3f} → "
              f"{best['train_loss_last']:.3f}; then " + numbers(best), not fitting.empty,
              None if not fitting.empty else f"no QLoRA cell is within the {budget_pct}% budget")
    elif four.empty:
        entry("Fine-tuning (QLoRA)", "bitsandbytes 4-bit (nf4)", None, "no bitsandbytes 4-bit cell in this run", None)
    else:
        best = four.sort_values("kl_mean" if four["kl_mean"].notna().all() else "delta_ppl_pct").iloc[0]
        within = best["delta_ppl_pct"] <= budget_pct
        entry("Fine-tuning (QLoRA)", "bitsandbytes 4-bit (nf4)", best,
              "least KL from FP16 among the bitsandbytes 4-bit bases QLoRA trains on: " + numbers(best),
              within, None if within else f"its ΔPPL is beyond the {budget_pct}% budget")

    # Quality first: the least KL from FP16; the usual order AWQ > GPTQ > GGUF Q6_K checked as measured.
    by = "kl_mean" if quantized["kl_mean"].notna().any() else "delta_ppl_pct"
    if quantized.empty:
        entry("Quality first", "AWQ > GPTQ > GGUF Q6_K", None, "no quantized cell ran", None)
    else:
        best = quantized.loc[quantized[by].idxmin()]
        order = []
        for name, rows in (("AWQ", quantized[quantized["method"] == "awq"]),
                           ("GPTQ", quantized[quantized["method"] == "gptq"]),
                           ("GGUF Q6_K", quantized[(quantized["method"] == "gguf") & (quantized["variant"] == "Q6_K")])):
            if not rows.empty:
                order.append((name, float(rows[by].min())))
        ranked = sorted(order, key=lambda x: x[1])
        agrees = [n for n, _ in ranked] == [n for n, _ in order] if len(order) > 1 else None
        measured = " < ".join(f"{n} ({v:.4g})" for n, v in ranked)
        entry("Quality first", "AWQ > GPTQ > GGUF Q6_K", best,
              f"least {by} of all quantized cells: " + numbers(best) + (f"; measured {by} order: {measured}" if order else ""),
              agrees, None if agrees in (True, None) else f"measured order is {' > '.join(n for n, _ in ranked)}")
    return out
