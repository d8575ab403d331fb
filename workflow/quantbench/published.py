"""Published numbers (workflow/references/*.csv) set beside the cells that reproduce them.

A published number matches a cell when the model (the config key, or the Hugging Face repo it
downloads), method, variant, protocol and context all agree: numbers measured another way are
never compared.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

COLUMNS = ["model", "method", "variant", "protocol", "context", "metric", "value", "citation", "note"]
METRICS = {"ppl", "kl_mean"}
SHIPPED = Path(__file__).resolve().parent.parent / "references"


def shipped() -> list[str]:
    return sorted(str(p) for p in SHIPPED.glob("*.csv"))


def load(paths: list[str]) -> pd.DataFrame:
    """Every reference row, with the file it came from; a malformed file is named in the error."""
    frames = []
    for path in paths:
        df = pd.read_csv(path, dtype={"variant": str, "note": str}, keep_default_na=False, na_values={"value": [""]})
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; a reference CSV has {COLUMNS}")
        bad = sorted(set(df["metric"]) - METRICS)
        if bad:
            raise ValueError(f"{path}: unknown metric {bad}; known: {sorted(METRICS)}")
        if df["value"].isna().any() or not pd.api.types.is_numeric_dtype(df["value"]):
            raise ValueError(f"{path}: every row needs a numeric value")
        frames.append(df[COLUMNS].assign(source=Path(path).name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*COLUMNS, "source"])


def aliases(models: dict) -> pd.DataFrame:
    """(config key, name a reference may use for it): the key itself and its Hugging Face repo."""
    rows = [(key, key) for key in models] + [(key, spec["repo"]) for key, spec in models.items() if spec.get("repo")]
    return pd.DataFrame(rows, columns=["model", "reference_model"]).drop_duplicates()


def match(cells: pd.DataFrame, refs: pd.DataFrame, models: dict, tolerance_pct: float) -> pd.DataFrame:
    """One row per published number that one of the cells reproduces: measured, published, the
    difference, and whether it is within tolerance_pct of the published value."""
    columns = ["model", "method", "variant", "protocol", "context", "metric", "measured", "published",
               "delta", "delta_pct", "within_tolerance", "status", "citation", "note", "source"]
    if refs.empty or cells.empty or "protocol_context" not in cells:  # no cell was evaluated
        return pd.DataFrame(columns=columns)
    keyed = cells.merge(aliases(models), on="model").rename(
        columns={"protocol_name": "protocol", "protocol_context": "context"})
    refs = refs.rename(columns={"model": "reference_model", "value": "published"}).astype({"context": float})
    keyed = keyed.astype({"context": float})
    out = keyed.merge(refs, on=["reference_model", "method", "variant", "protocol", "context"])
    if out.empty:
        return pd.DataFrame(columns=columns)
    out["measured"] = [row[row["metric"]] if row["status"] == "ok" else None for _, row in out.iterrows()]
    out["measured"] = out["measured"].astype(float)
    out["delta"] = out["measured"] - out["published"]
    out["delta_pct"] = out["delta"] / out["published"] * 100
    out["within_tolerance"] = [None if pd.isna(d) else bool(abs(d) <= tolerance_pct) for d in out["delta_pct"]]
    return out[columns].reset_index(drop=True)
