"""The tables users start from (workflow/references/claims.yaml): each claim of the usual guides
reproduced from the measured cells, with a verdict that says which numbers decided it."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from .methods import BASELINE, METHODS, Family
from .summary import label, ok, peak_mb, weights_in_memory

CLAIMS = Path(__file__).resolve().parent.parent / "references" / "claims.yaml"
PARAMS_7B = 7e9


def load(path: str | Path = CLAIMS) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _verdict(ok: bool | None, why: str) -> str:
    return "not measured" if ok is None else ("agrees" if ok else f"disagrees: {why}")


def _within(measured: float, claimed: float, tolerance: float) -> bool:
    return abs(measured - claimed) <= tolerance * claimed


def precision_table(df: pd.DataFrame, claims: dict) -> pd.DataFrame:
    """Bytes per parameter, a 7B model's size and the memory to run it, per precision: claimed, and
    extrapolated from each model's cells of that precision. The weights scale with the parameter
    count; the rest of the measured peak (runtime, activations, logits) is carried over as it is."""
    tol, rows = claims["size_tolerance"], []
    for model, cells in ok(df).groupby("model"):
        for claim in claims["precision"]:
            picked = []
            for _, row in cells.iterrows():
                if row["method"] == BASELINE.name:
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
                overhead = peak_mb(row) * 2**20 - weights_in_memory(row)
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
                "claimed_quality": claim["quality"], "claimed_note": claim["note"], "delta_ppl_pct": row["delta_ppl_pct"],
                "kl_mean": row["kl_mean"],
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
    claimed = {claim["method"] for claim in claims["methods"]}
    for model, cells in df.groupby("model"):
        base = cells[(cells["method"] == BASELINE.name) & (cells["status"] == "ok")]
        # Methods the usual tables do not name (HQQ, AutoRound, torchao, quanto, ...): measured, nothing to check.
        unclaimed = [{"method": name, "label": name, "quality_loss": None, "speed": None, "fits": None}
                     for name in cells["method"].unique() if name not in claimed and METHODS[name].family not in
                     (Family.BASELINE, Family.PREQUANTIZED, Family.FINETUNE)]
        for claim in claims["methods"] + unclaimed:
            family = cells[cells["method"] == claim["method"]]
            if family.empty:
                continue
            rep = _representative(ok(family))
            entry = {"model": model, "method": claim["label"], "claimed_quality_loss": claim["quality_loss"],
                     "claimed_speed": claim["speed"], "claimed_fits": claim.get("fits"), "cell": None,
                     "delta_ppl_pct": None, "speed_vs_fp16": None, "device": None}
            if rep is None:
                reasons = "; ".join(sorted({f"{r['status']}: {r['error']}" for _, r in family.iterrows()}))
                rows.append(entry | {"verdict": f"not measured ({reasons})"})
                continue
            speed = None
            if not base.empty and base.iloc[0]["device"] == rep["device"]:
                speed = rep["eval_tokens_per_s"] / base.iloc[0]["eval_tokens_per_s"]
            if claim["quality_loss"] is None:
                rows.append(entry | {"cell": f"{rep['method']} {rep['variant']}", "delta_ppl_pct": rep["delta_ppl_pct"],
                                     "speed_vs_fp16": speed, "device": rep["device"],
                                     "verdict": "measured; the usual tables make no claim"})
                continue
            quality_ok = rep["delta_ppl_pct"] <= qbands[claim["quality_loss"]]
            speed_ok = None if speed is None else bool(speed >= sbands[claim["speed"]])  # numpy's bool is never False
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
