"""The tables users start from (workflow/references/claims.yaml): each claim of the usual guides
reproduced from the measured cells, with a verdict that says which numbers decided it."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from .methods import BASELINE, LLAMA_CPP, METHODS, Family
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
                rows.append(entry | {"verdict": f"not measured ({reasons})",
                                     "fits_verdict": "not measured" if claim.get("fits") else None})
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
                                 "verdict": _verdict(quality_ok and speed_ok is not False, "; ".join(why)),
                                 "fits_verdict": _fits(claim, ok(cells))})
    return pd.DataFrame(rows)


GPU_FAMILIES = ("gptq", "awq", "eetq")  # the families the document places on GPUs


def _fastest(cells: pd.DataFrame) -> pd.Series:
    """Each family's best generation speed (tg128, what a user of the model feels) among its cells; every
    GGUF file (llama.cpp's, AutoRound's, a published one) counts as GGUF."""
    quantized = cells[~cells["method"].isin([BASELINE.name]) & cells["tg_tokens_per_s"].notna()]
    family = quantized["method"].map(lambda m: "gguf" if METHODS[m].backend == LLAMA_CPP else m)
    return quantized.groupby(family)["tg_tokens_per_s"].max().sort_values(ascending=False)


def _fits(claim: dict, cells: pd.DataFrame) -> str | None:
    """Where a family fits, judged on the run's devices: on a CPU, GGUF should generate fastest and the
    GPU families slower than it; bitsandbytes should train (a QLoRA cell whose loss fell). A GPU claim
    measured on no GPU says so."""
    method = claim["method"]
    if not claim.get("fits"):
        return None
    if method == "bnb":
        trained = cells[(cells["method"] == "qlora") & cells.get("train_loss_last", pd.Series(dtype=float)).notna()]
        if trained.empty:
            return "not judged: no QLoRA cell trained in this run"
        fell = bool((trained["train_loss_last"] < trained["train_loss_first"]).all())
        return _verdict(fell, "its QLoRA training did not lower the loss") + (
            f" (QLoRA: loss {trained.iloc[0]['train_loss_first']:.3f} -> {trained.iloc[0]['train_loss_last']:.3f})")
    cpu = _fastest(cells[cells["device"] == "cpu"])
    on_gpu = _fastest(cells[cells["device"] != "cpu"])
    if method not in cpu and method not in on_gpu:
        return "not judged: no cell of it generated in this run"
    if method == "gguf":
        if method not in cpu:
            return "not judged: no GGUF cell ran on a CPU in this run"
        return _verdict(cpu.index[0] == "gguf", f"{cpu.index[0]} generated faster on this CPU") + (
            f" (on this CPU: tg128 {cpu['gguf']:.1f} tok/s, the next family {cpu.iloc[1]:.1f})" if len(cpu) > 1 else "")
    if method in on_gpu:
        best = on_gpu.index[0]
        return _verdict(best in GPU_FAMILIES, f"{best} generated faster on the GPU") + f" (on the GPU: {best} fastest)"
    if "gguf" in cpu:
        return (f"not judged on a GPU (none in this run); on this CPU it generates {cpu[method] / cpu['gguf']:.2f}x "
                "GGUF's tg128, as a GPU format would")
    return "not judged: no GPU in this run"


def practices_table(df: pd.DataFrame, claims: dict) -> pd.DataFrame:
    """The document's best practices, each judged per model where its cells allow, or said not judged."""
    rows = []
    for model, cells in df.groupby("model"):
        done = ok(cells)
        for practice in claims["practices"]:
            measured, verdict = PRACTICES[practice["id"]](done, claims)
            rows.append({"model": model, "practice": practice["text"], "measured": measured, "verdict": verdict})
    return pd.DataFrame(rows)


def _level(cells: pd.DataFrame, claims: dict):
    levels = [level["type"] for level in claims["gguf_levels"]]  # llama.cpp's own, without an importance matrix
    gguf = cells[(cells["method"] == "gguf") & cells["variant"].isin(levels)].set_index("variant")
    quality = [t for t in ("Q5_K_M", "Q6_K") if t in gguf.index]
    if "Q4_K_M" not in gguf.index or not quality:
        return None, "not judged: needs gguf Q4_K_M and Q5_K_M or Q6_K in the matrix"
    from .plots import pareto_front

    front = pareto_front(gguf.reset_index(), "bits_per_weight", "delta_ppl_pct")
    q4 = gguf.loc["Q4_K_M"]
    balanced = "Q4_K_M" in set(front["variant"]) and q4["delta_ppl_pct"] <= claims["quality_bands"]["good"]
    better = all(gguf.loc[t, "delta_ppl_pct"] < q4["delta_ppl_pct"] for t in quality)
    measured = f"Q4_K_M ΔPPL {q4['delta_ppl_pct']:+.2f}% at {q4['bits_per_weight']:.2f} bpw; " + ", ".join(
        f"{t} {gguf.loc[t, 'delta_ppl_pct']:+.2f}% at {gguf.loc[t, 'bits_per_weight']:.2f} bpw" for t in quality)
    why = [] if balanced else [f"Q4_K_M is not both on the GGUF Pareto front and within 'good' "
                               f"(≤ {claims['quality_bands']['good']}%)"]
    why += [] if better else ["Q5/Q6 do not lose less than Q4_K_M"]
    return measured, _verdict(not why, "; ".join(why))


def _calibration(cells: pd.DataFrame, claims: dict):
    rtn = cells[cells["method"] == "rtn"]
    pairs = [(c, r) for _, c in cells[cells["method"].isin(["gptq", "awq"])].iterrows() for _, r in rtn.iterrows()
             if c["bits"] == r["bits"] and c.get("group_size") == r.get("group_size")]
    if not pairs:
        return None, "not judged: needs GPTQ or AWQ beside RTN at the same bits and group size"
    measured = "; ".join(f"{c['method']} {c['variant']} {c['delta_ppl_pct']:+.1f}% vs rtn {r['variant']} "
                         f"{r['delta_ppl_pct']:+.1f}%" for c, r in pairs)
    worse = [f"{c['method']} {c['variant']}" for c, r in pairs if c["delta_ppl_pct"] >= r["delta_ppl_pct"]]
    return measured, _verdict(not worse, f"{', '.join(worse)} no better than round-to-nearest")


def _evaluate(cells: pd.DataFrame, claims: dict):
    tasks = sorted({c.split("_")[1] for c in cells.columns if c.startswith("task_") and cells[c].notna().any()})
    if not tasks:
        return "perplexity and KL only", "not judged: no task ran (set eval.tasks to measure task performance)"
    return f"perplexity, KL and tasks ({', '.join(tasks)})", "agrees: this run measured both"


def _hardware(cells: pd.DataFrame, claims: dict):
    cpu = _fastest(cells[cells["device"] == "cpu"])
    gpu = _fastest(cells[cells["device"] != "cpu"])
    parts, why = [], []
    if len(cpu) > 1:
        parts.append(f"CPU: fastest tg128 {cpu.index[0]} ({cpu.iloc[0]:.1f} tok/s)")
        if cpu.index[0] != "gguf":
            why.append(f"{cpu.index[0]} generated faster than GGUF on the CPU")
    if len(gpu) > 1:
        parts.append(f"GPU: fastest tg128 {gpu.index[0]} ({gpu.iloc[0]:.1f} tok/s)")
        if gpu.index[0] not in ("awq", "gptq"):
            why.append(f"{gpu.index[0]} generated faster than AWQ/GPTQ on the GPU")
    if not parts:
        return None, "not judged: needs several families' speeds on one device"
    verdict = _verdict(not why, "; ".join(why))
    return "; ".join(parts), verdict + ("" if len(gpu) > 1 else " (the CPU half; no GPU in this run)")


def _community(cells: pd.DataFrame, claims: dict):
    published = cells[cells["method"].isin(["gguf-file", "checkpoint"])]
    if published.empty:
        return None, "not judged: no published file or checkpoint in the matrix (models.<m>.gguf_files, checkpoints)"
    measured = "; ".join(f"{r['variant']} ΔPPL {r['delta_ppl_pct']:+.2f}%, KL {r['kl_mean']:.4f}"
                         for _, r in published.iterrows())
    return measured, "measured; whether to prefer them is the user's call against the cells quantized here"


PRACTICES = {"level": _level, "calibration": _calibration, "evaluate": _evaluate, "hardware": _hardware,
             "community": _community}
