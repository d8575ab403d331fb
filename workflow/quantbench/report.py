"""Aggregate every cell's metrics.json into results/report/summary.{csv,md}."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from . import io
from .config import BASELINE

COLUMNS = [  # the table's leading columns; every other metric follows in the CSV
    "model", "method", "variant", "status", "ppl", "ppl_stderr", "delta_ppl_pct", "kl_mean", "kl_p99", "top1_agree",
    "size_bytes", "size_ratio", "bits_per_weight", "weight_memory_mb", "eval_tokens_per_s", "peak_rss_mb", "peak_vram_mb",
    "quantize_s", "device", "compute_dtype", "error",
]


def load(metrics_files: list[str]) -> pd.DataFrame:
    rows = []
    for path in metrics_files:
        record = io.read_json(path)
        protocol = record.pop("protocol", None) or {}
        versions = record.pop("versions", None) or {}
        record["tensor_types"] = _share(record.get("tensor_types"))
        record |= {f"protocol_{k}": v for k, v in protocol.items() if not isinstance(v, dict)}
        tokenizer = protocol.get("tokenizer") or {}
        record["protocol_tokenizer"] = f"{tokenizer.get('kind', 'hf')}:{tokenizer.get('class')}"
        record |= {f"version_{k}": v for k, v in versions.items()}
        record = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in record.items()}
        rows.append(record)
    return pd.json_normalize(rows, max_level=0)


def _share(types: dict | None) -> str | None:
    """{'Q5_0': 78e6, 'Q8_0': 30e6} -> 'Q5_0 72%, Q8_0 28%': what a GGUF really stores."""
    if not types:
        return None
    total = sum(types.values())
    return ", ".join(f"{t} {n / total:.0%}" for t, n in types.items() if n / total >= 0.005)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    base = df[df["method"] == BASELINE].set_index("model")
    df = df.copy()
    df["delta_ppl_pct"] = (df["ppl"] - df["model"].map(base["ppl"])) / df["model"].map(base["ppl"]) * 100
    df["size_ratio"] = df["size_bytes"] / df["model"].map(base["size_bytes"])
    df = df.sort_values(["model", "bits_per_weight"], ascending=[True, False], na_position="last")
    lead = [c for c in COLUMNS if c in df.columns]
    return df[lead + [c for c in df.columns if c not in lead]].reset_index(drop=True)


def markdown(df: pd.DataFrame, models: dict) -> str:
    shown = df.copy()
    shown["method"] = shown["method"].replace({BASELINE: "FP16 (baseline)"})
    shown["size_MB"] = shown["size_bytes"] / 1e6
    cols = ["model", "method", "variant", "status", "ppl", "ppl_stderr", "delta_ppl_pct", "kl_mean", "kl_p99",
            "top1_agree", "size_MB",
            "size_ratio", "bits_per_weight", "weight_memory_mb", "eval_tokens_per_s", "peak_rss_mb", "quantize_s",
            "compute_dtype", "tensor_types", "error"]
    table = shown[[c for c in cols if c in shown.columns]].to_markdown(index=False, floatfmt=".4g")
    lines = ["# quantbench summary", "", table, ""]
    first = df.iloc[0]
    lines += [
        f"Protocol: `{first.get('protocol_name')}` ({first.get('protocol_follows')}), "
        f"context {first.get('protocol_context')}, stride {first.get('protocol_stride')}, "
        f"{first.get('protocol_n_windows')} windows, {first.get('protocol_n_scored_tokens')} scored tokens "
        f"(max_windows={first.get('protocol_max_windows')}; 0 means the whole text), "
        f"tokenizer {first.get('protocol_tokenizer')}, text sha256 `{str(first.get('protocol_text_sha256'))[:16]}…`. "
        "ΔPPL % = (ppl − ppl_FP16) / ppl_FP16 × 100; size_ratio = size / FP16 size. "
        "kl_mean, kl_p99: KL(FP16 ‖ cell) of the next-token distributions over the scored tokens, mean and "
        "99th percentile (nats); top1_agree: share of scored positions whose most likely token is FP16's. "
        "The FP16 baseline is computed in the dtype named in compute_dtype (fp32 on a CPU). "
        "tensor_types: the share of weights a GGUF stores in each type (llama.cpp falls back from a "
        "k-quant to a legacy type for rows whose length is not a multiple of 256).",
        "",
    ]
    lines += _calibration_note(df)
    for row in df[df["status"] != "ok"].itertuples():
        lines += [f"- **{row.model} {row.method} {row.variant}** {row.status}: {row.error}"]
    for name, spec in models.items():
        if spec.get("note"):
            lines += [f"- **{name}**: {spec['note']}"]
    return "\n".join(lines) + "\n"


def _calibration_note(df: pd.DataFrame) -> list[str]:
    if "calibration" not in df.columns or df["calibration"].isna().all():
        return []
    spec = json.loads(df["calibration"].dropna().iloc[0])
    line = (f"- **Calibration** (GPTQ, AWQ): `{spec['source']}`, {spec['n_samples']} × {spec['seq_len']} tokens, "
            f"seed {spec['seed']}, the same tokens for every cell (sha256 `{spec['tokens_sha256'][:16]}…`).")
    if spec["source"] == "eval-holdout":
        line += (f" They are the first {spec['n_tokens']} tokens of the evaluation stream, the offline default; "
                 "no cell scores them, so every row is scored on the tokens after them.")
    return [line]


def build(metrics_files: list[str], models: dict, out_dir: str) -> pd.DataFrame:
    df = summarize(load(metrics_files))
    out = Path(out_dir)
    with io.atomic_path(out / "summary.csv") as tmp:
        df.to_csv(tmp, index=False)
    with io.atomic_path(out / "summary.md") as tmp:
        tmp.write_text(markdown(df, models))
    return df
