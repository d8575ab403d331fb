"""The tables users start from (workflow/references/claims.yaml), reproduced from the measured
cells, and a selection guide that names the best measured cell for each usual scenario.

Every verdict is computed from the summary table: a claim 'agrees' or 'disagrees' with the
measurement, and each guide entry says which numbers decided it.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from .config import BASELINE

CLAIMS = Path(__file__).resolve().parent.parent / "references" / "claims.yaml"
PARAMS_7B = 7e9


def load_claims(path: str | Path = CLAIMS) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def label(row) -> str:
    return f"{row['model']} {row['method']} {row['variant']}"


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"]


def _peak_mb(row) -> float:
    vram = row.get("peak_vram_mb")
    return vram if pd.notna(vram) else row.get("peak_rss_mb")


def _weights_in_memory(row) -> float:
    """Bytes the weights take once loaded: the framework's footprint, or the (mapped) GGUF file."""
    mb = row.get("weight_memory_mb")
    return mb * 2**20 if pd.notna(mb) else row.get("size_bytes")


def weight_bytes(df: pd.DataFrame) -> pd.Series:
    """What each cell's weights take: the artifact on disk, or for load-time methods their in-memory footprint."""
    return df["size_bytes"].fillna(df["weight_memory_mb"] * 2**20)


def _verdict(ok: bool | None, why: str) -> str:
    return "not measured" if ok is None else ("agrees" if ok else f"disagrees: {why}")


def _within(measured: float, claimed: float, tolerance: float) -> bool:
    return abs(measured - claimed) <= tolerance * claimed


def precision_table(df: pd.DataFrame, claims: dict) -> pd.DataFrame:
    """Bytes per parameter, a 7B model's size and the memory to run it, per precision: claimed, and
    extrapolated from each model's cells of that precision. The weights scale with the parameter
    count; the rest of the measured peak (runtime, activations, logits) is carried over as it is."""
    tol, rows = claims["size_tolerance"], []
    for model, cells in _ok(df).groupby("model"):
        for claim in claims["precision"]:
            picked = []
            for _, row in cells.iterrows():
                if row["method"] == BASELINE:
                    if claim["bits"] == 32 and row.get("compute_dtype") == "float32":
                        bpp = row["weight_memory_mb"] * 2**20 / row["n_params"]  # fp32 in memory
                    elif claim["bits"] == 16:
                        bpp = row["bits_per_weight"] / 8  # fp16 on disk
                    else:
                        continue
                elif row.get("bits") == claim["bits"] and pd.notna(row.get("bits_per_weight")):
                    bpp = row["bits_per_weight"] / 8
                else:
                    continue
                overhead = _peak_mb(row) * 2**20 - _weights_in_memory(row)
                picked.append((label(row), bpp, bpp * PARAMS_7B / 1e9, (bpp * PARAMS_7B + overhead) / 1e9))
            if not picked:
                continue
            bpp, size, memory = (float(pd.Series([p[i] for p in picked]).median()) for i in (1, 2, 3))
            off = [name for name, m, c in (("bytes/param", bpp, claim["bytes_per_param"]),
                                            ("size", size, claim["size_7b_gb"]),
                                            ("memory", memory, claim["memory_7b_gb"])) if not _within(m, c, tol)]
            rows.append({
                "model": model, "precision": claim["precision"],
                "claimed_bytes_per_param": claim["bytes_per_param"], "measured_bytes_per_param": bpp,
                "claimed_size_7b_gb": claim["size_7b_gb"], "measured_size_7b_gb": size,
                "claimed_memory_7b_gb": claim["memory_7b_gb"], "measured_memory_7b_gb": memory,
                "verdict": _verdict(not off, f"{', '.join(off)} off by more than {tol:.0%}"),
                "cells": "; ".join(p[0].split(" ", 1)[1] for p in picked),
            })
    return pd.DataFrame(rows)


def gguf_table(df: pd.DataFrame, claims: dict) -> pd.DataFrame:
    """GGUF levels: claimed size share of FP16 and quality words, against the measured share, ΔPPL and KL."""
    bands, tol, rows = claims["quality_bands"], claims["size_tolerance"], []
    for claim in claims["gguf_levels"]:
        for _, row in df[(df["method"] == "gguf") & (df["variant"] == claim["type"])].iterrows():
            measured = row["status"] == "ok"
            size_ok = _within(row["size_ratio"], claim["size_ratio"], tol) if measured else None
            quality_ok = row["delta_ppl_pct"] <= bands[claim["quality"]] if measured else None
            why = []
            if size_ok is False:
                why.append(f"size {row['size_ratio']:.0%} of FP16, not ~{claim['size_ratio']:.0%}")
            if quality_ok is False:
                why.append(f"ΔPPL {row['delta_ppl_pct']:+.1f}% is beyond '{claim['quality']}' (≤ {bands[claim['quality']]}%)")
            rows.append({
                "model": row["model"], "type": claim["type"], "claimed_size_ratio": claim["size_ratio"],
                "measured_size_ratio": row["size_ratio"], "bits_per_weight": row["bits_per_weight"],
                "claimed_quality": claim["quality"], "delta_ppl_pct": row["delta_ppl_pct"], "kl_mean": row["kl_mean"],
                "verdict": _verdict(None if not measured else size_ok and quality_ok, "; ".join(why)),
            })
    return pd.DataFrame(rows)


def _representative(cells: pd.DataFrame) -> pd.Series | None:
    """A family's 4-bit cell of least ΔPPL (its most-used width), else its cell of least ΔPPL."""
    cells = cells.dropna(subset=["delta_ppl_pct"])
    if cells.empty:
        return None
    four = cells[cells["bits"] == 4]
    return (four if not four.empty else cells).sort_values("delta_ppl_pct").iloc[0]


def method_table(df: pd.DataFrame, claims: dict) -> pd.DataFrame:
    """Method families: claimed quality loss and speed, against ΔPPL and eval tokens/s relative to FP16
    on the same device."""
    qbands, sbands, rows = claims["quality_bands"], claims["speed_bands"], []
    for model, cells in df.groupby("model"):
        base = cells[(cells["method"] == BASELINE) & (cells["status"] == "ok")]
        for claim in claims["methods"]:
            family = cells[cells["method"] == claim["method"]]
            if family.empty:
                continue
            rep = _representative(_ok(family))
            entry = {"model": model, "method": claim["label"], "claimed_quality_loss": claim["quality_loss"],
                     "claimed_speed": claim["speed"], "cell": None, "delta_ppl_pct": None, "speed_vs_fp16": None,
                     "device": None}
            if rep is None:
                reasons = "; ".join(sorted({f"{r['status']}: {r['error']}" for _, r in family.iterrows()}))
                rows.append(entry | {"verdict": f"not measured ({reasons})"})
                continue
            speed = None
            if not base.empty and base.iloc[0]["device"] == rep["device"]:
                speed = rep["eval_tokens_per_s"] / base.iloc[0]["eval_tokens_per_s"]
            quality_ok = rep["delta_ppl_pct"] <= qbands[claim["quality_loss"]]
            speed_ok = None if speed is None else speed >= sbands[claim["speed"]]
            why = []
            if not quality_ok:
                why.append(f"ΔPPL {rep['delta_ppl_pct']:+.1f}% is beyond '{claim['quality_loss']}' "
                           f"(≤ {qbands[claim['quality_loss']]}%)")
            if speed_ok is False:
                why.append(f"{speed:.2f}x FP16's tokens/s on {rep['device']} is below '{claim['speed']}' "
                           f"(≥ {sbands[claim['speed']]}x)")
            rows.append(entry | {"cell": f"{rep['method']} {rep['variant']}", "delta_ppl_pct": rep["delta_ppl_pct"],
                                 "speed_vs_fp16": speed, "device": rep["device"],
                                 "verdict": _verdict(quality_ok and speed_ok is not False, "; ".join(why))})
    return pd.DataFrame(rows)


def selection_guide(df: pd.DataFrame, budget_pct: float) -> list[dict]:
    """For each usual scenario: the best measured cell, the numbers that decided it, and whether it
    agrees with the usual advice. Cells beyond the quality budget (ΔPPL %) are not candidates."""
    quantized = _ok(df[df["method"] != BASELINE]).dropna(subset=["delta_ppl_pct"])
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
        agrees = best["method"] == "gguf" and best["variant"] in ("Q4_K_M", "Q5_K_M")
        entry("CPU / low memory", "GGUF Q4_K_M or Q5_K_M", best,
              f"smallest weights within ΔPPL ≤ {budget_pct}% on the CPU: " + numbers(best, f"peak {_peak_mb(best):.0f} MB"),
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

    # Fine-tuning (QLoRA): adapters train over a bitsandbytes 4-bit base; the closest to FP16 wins.
    four = quantized[(quantized["method"] == "bnb") & (quantized["bits"] == 4)]
    if four.empty:
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
