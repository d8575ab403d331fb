"""Every cell's metrics.json as one table: a row per cell (failed and skipped cells keep theirs),
ΔPPL and size against each model's FP16 baseline, and the row helpers the report's parts share."""
from __future__ import annotations

import json

import pandas as pd

from .methods import BASELINE

COLUMNS = [  # the CSV's leading columns; every other metric follows
    "model", "method", "variant", "status", "bits", "ppl", "ppl_stderr", "delta_ppl_pct", "kl_mean", "kl_p99",
    "top1_agree", "size_bytes", "size_ratio", "bits_per_weight", "weight_memory_mb", "eval_tokens_per_s",
    "pp_tokens_per_s", "tg_tokens_per_s", "peak_rss_mb", "peak_vram_mb", "quantize_s", "device", "compute_dtype", "error",
]

def load(records: list[dict]) -> pd.DataFrame:
    """The cells' metrics.json records as one flat row each."""
    rows = []
    for record in records:
        record = dict(record)
        protocol = record.pop("protocol", None) or {}
        versions = record.pop("versions", None) or {}
        record["tensor_types"] = _share(record.get("tensor_types"))
        record |= {f"protocol_{k}": v for k, v in protocol.items() if not isinstance(v, dict)}
        tokenizer = protocol.get("tokenizer") or {}
        record["protocol_tokenizer"] = f"{tokenizer.get('kind', 'hf')}:{tokenizer.get('class')}"
        record |= {f"version_{k}": v for k, v in versions.items()}
        if record.get("tasks"):  # lm-eval's metrics, a column each; every document's answers stay in metrics.json
            record |= {f"task_{task}_{metric}": value for task, result in record["tasks"].items()
                       for metric, value in result["metrics"].items()}
            record["tasks"] = {task: {k: v for k, v in result.items() if k != "documents"}
                               for task, result in record["tasks"].items()}
        record = {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in record.items()}
        rows.append(record)
    return pd.json_normalize(rows, max_level=0)


def _share(types: dict | None) -> str | None:
    """{'Q5_0': 78e6, 'Q8_0': 30e6} -> 'Q5_0 72%, Q8_0 28%': what a GGUF really stores."""
    if not types:
        return None
    total = sum(types.values())
    return ", ".join(f"{t} {n / total:.0%}" for t, n in types.items() if n / total >= 0.005)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """ΔPPL % and size ratio against each model's FP16 baseline; sorted by model, then bits per weight."""
    numeric = [c for c in COLUMNS if c not in ("model", "method", "variant", "status", "device", "compute_dtype", "error")]
    df = df.reindex(columns=[*df.columns, *(c for c in COLUMNS if c not in df.columns)])  # even if every cell failed
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    base = df[(df["method"] == BASELINE.name) & (df["status"] == "ok")].set_index("model")
    df["delta_ppl_pct"] = (df["ppl"] - df["model"].map(base["ppl"])) / df["model"].map(base["ppl"]) * 100
    df["size_ratio"] = df["size_bytes"] / df["model"].map(base["size_bytes"])
    df = df.sort_values(["model", "bits_per_weight"], ascending=[True, False], na_position="last")
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]].reset_index(drop=True)


def label(row) -> str:
    return f"{row['model']} {row['method']} {row['variant']}"


def ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"]


def peak_mb(row, step: str = "") -> float:
    """The peak memory of a cell's `step` ("" its evaluation, "train_" its training): VRAM on a GPU, else RSS."""
    vram = row.get(f"{step}peak_vram_mb")
    return vram if pd.notna(vram) else row.get(f"{step}peak_rss_mb")


def weights_in_memory(row) -> float:
    """Bytes the weights take once loaded: the framework's footprint, or the (mapped) GGUF file."""
    mb = row.get("weight_memory_mb")
    return mb * 2**20 if pd.notna(mb) else row.get("size_bytes")


def weight_bytes(df: pd.DataFrame) -> pd.Series:
    """What each cell's weights take: the artifact on disk, or for load-time methods their in-memory footprint."""
    return df["size_bytes"].fillna(df["weight_memory_mb"] * 2**20)
