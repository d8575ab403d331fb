"""Every cell's metrics.json -> results/report/: summary.csv (tidy, every metric), summary.md and a
self-contained report.html (tables, plots, published references, the tables users start from,
a selection guide), and the plots as PNG files."""
from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import guide, io, plots, published
from .config import BASELINE

COLUMNS = [  # the CSV's leading columns; every other metric follows
    "model", "method", "variant", "status", "bits", "ppl", "ppl_stderr", "delta_ppl_pct", "kl_mean", "kl_p99",
    "top1_agree", "size_bytes", "size_ratio", "bits_per_weight", "weight_memory_mb", "eval_tokens_per_s",
    "peak_rss_mb", "peak_vram_mb", "quantize_s", "device", "compute_dtype", "error",
]
MAIN = {  # the main table: column -> heading
    "model": "model", "method": "method", "variant": "variant", "status": "status", "bits_per_weight": "bpw",
    "size_MB": "size MB", "size_ratio": "size / FP16", "ppl": "ppl", "ppl_stderr": "± stderr",
    "delta_ppl_pct": "ΔPPL %", "kl_mean": "KL mean", "kl_p99": "KL p99", "top1_agree": "top-1 agree",
    "eval_tokens_per_s": "tokens/s", "peak_MB": "peak memory MB", "quantize_s": "quantize s", "device": "device",
}


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)   # paragraphs; `code` and **bold** as in Markdown
    table: pd.DataFrame | None = None
    images: list[Path] = field(default_factory=list)
    level: int = 2


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
        record = {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in record.items()}
        rows.append(record)
    df = pd.json_normalize(rows, max_level=0)
    for column in COLUMNS:  # a matrix whose cells all failed still has every column
        if column not in df.columns:
            df[column] = None
    return df


def _share(types: dict | None) -> str | None:
    """{'Q5_0': 78e6, 'Q8_0': 30e6} -> 'Q5_0 72%, Q8_0 28%': what a GGUF really stores."""
    if not types:
        return None
    total = sum(types.values())
    return ", ".join(f"{t} {n / total:.0%}" for t, n in types.items() if n / total >= 0.005)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """ΔPPL % and size ratio against each model's FP16 baseline; sorted by model, then bits per weight."""
    numeric = [c for c in COLUMNS if c not in ("model", "method", "variant", "status", "device", "compute_dtype", "error")]
    df = df.copy()
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    base = df[(df["method"] == BASELINE) & (df["status"] == "ok")].set_index("model")
    df["delta_ppl_pct"] = (df["ppl"] - df["model"].map(base["ppl"])) / df["model"].map(base["ppl"]) * 100
    df["size_ratio"] = df["size_bytes"] / df["model"].map(base["size_bytes"])
    df = df.sort_values(["model", "bits_per_weight"], ascending=[True, False], na_position="last")
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]].reset_index(drop=True)


def sections(df: pd.DataFrame, models: dict, figures: dict[str, Path], matches: pd.DataFrame, n_references: int,
             claims: dict, tolerance_pct: float, budget_pct: float) -> list[Section]:
    main = df.assign(method=df["method"].replace({BASELINE: "FP16 (baseline)"}), size_MB=df["size_bytes"] / 1e6,
                     peak_MB=df["peak_vram_mb"].fillna(df["peak_rss_mb"]))
    main = main[list(MAIN)].rename(columns=MAIN)
    out = [Section("Results", _protocol_note(df) + _calibration_note(df) + _status_notes(df) + [
        f"**{name}**: {spec['note']}" for name, spec in models.items() if spec.get("note")], main)]
    out.append(Section("Plots", ["Quality against bits per weight, with the Pareto front (no other cell is both "
                                 "smaller and better); size and evaluation speed of every cell."],
                       images=[figures[k] for k in ("quality", "size", "speed")]))
    if matches.empty:
        text = [f"None of the {n_references} published numbers in the reference files matches a cell of this run "
                "(same model, method, variant, protocol and context). The presets in `workflow/presets/` "
                "reproduce them on a machine that reaches the Hugging Face Hub."]
    else:
        within = matches["within_tolerance"].eq(True).sum()
        text = [f"{len(matches)} published numbers match cells of this run; {within} are reproduced within "
                f"±{tolerance_pct:g}% (`report.tolerance_pct`)."]
    out.append(Section("Published references", text, None if matches.empty else matches))
    out.append(Section("The tables users start from", [
        "Each claim of the usual guides beside what this run measured, with a verdict. How a word is read: "
        f"ΔPPL bounds {_bands(claims['quality_bands'], '≤ ', '%')}; speed vs FP16 on the same device "
        f"{_bands(claims['speed_bands'], '≥ ', 'x')}; sizes and memory agree within "
        f"{claims['size_tolerance']:.0%} (`workflow/references/claims.yaml`)."]))
    out.append(Section("Precision, bytes per parameter, and a 7B model", [
        "Measured bits per weight extrapolated to 7 B parameters. Memory = those weights plus the rest of "
        "the measured peak (runtime, activations, logits) as it was on this machine."],
        guide.precision_table(df, claims), level=3))
    out.append(Section("GGUF levels", [], guide.gguf_table(df, claims), level=3))
    out.append(Section("Method families", [], guide.method_table(df, claims), level=3))
    out.append(Section("Selection guide", [
        f"The best measured cell for each scenario, among cells within ΔPPL ≤ {budget_pct:g}% of FP16 "
        "(`report.quality_budget_pct`), and how it compares with the usual advice."],
        pd.DataFrame(guide.selection_guide(df, budget_pct))))
    return out


def _bands(bands: dict, sign: str, unit: str) -> str:
    return ", ".join(f"'{word}' {sign}{bound:g}{unit}" for word, bound in bands.items() if bound != float("inf"))


def _protocol_note(df: pd.DataFrame) -> list[str]:
    first = df.iloc[0]
    stride = f", stride {first['protocol_stride']:g}" if pd.notna(first.get("protocol_stride")) else ""
    return [
        f"Protocol `{first.get('protocol_name')}` ({first.get('protocol_follows')}): context "
        f"{first.get('protocol_context')}{stride}, {first.get('protocol_n_windows')} windows, "
        f"{first.get('protocol_n_scored_tokens')} scored tokens (max_windows={first.get('protocol_max_windows')}; "
        f"0 means the whole text), tokenizer {first.get('protocol_tokenizer')}, text sha256 "
        f"`{str(first.get('protocol_text_sha256'))[:16]}…`.",
        "ΔPPL % = (ppl − ppl_FP16) / ppl_FP16 × 100; size / FP16 = size on disk over the FP16 checkpoint's. "
        "KL mean, KL p99: KL(FP16 ‖ cell) of the next-token distributions over the scored tokens (nats); "
        "top-1 agree: share of scored positions whose most likely token is FP16's. bpw: bits per weight "
        "(GGUF: from its tensor types; checkpoints: bytes of the stored tensors; bitsandbytes: in-memory "
        "footprint). The FP16 baseline runs in the dtype of its compute_dtype column in summary.csv (fp32 on a CPU).",
    ]


def _calibration_note(df: pd.DataFrame) -> list[str]:
    if "calibration" not in df.columns or df["calibration"].isna().all():
        return []
    spec = json.loads(df["calibration"].dropna().iloc[0])
    line = (f"**Calibration** (GPTQ, AWQ): `{spec['source']}`, {spec['n_samples']} × {spec['seq_len']} tokens, "
            f"seed {spec['seed']}, the same tokens for every cell (sha256 `{spec['tokens_sha256'][:16]}…`).")
    if spec["source"] == "eval-holdout":
        line += (f" They are the first {spec['n_tokens']} tokens of the evaluation stream, the offline default; "
                 "no cell scores them, so every row is scored on the tokens after them.")
    return [line]


def _status_notes(df: pd.DataFrame) -> list[str]:
    return [f"**{r.model} {r.method} {r.variant}** {r.status}: {r.error}" for r in df[df["status"] != "ok"].itertuples()]


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(parts: list[Section]) -> str:
    lines = ["# quantbench report", ""]
    for s in parts:
        lines += ["#" * s.level + " " + s.title, ""]
        for paragraph in s.text:
            lines += [paragraph, ""]
        for image in s.images:
            lines += [f"![{image.stem}]({image.name})", ""]
        if s.table is not None:
            if s.table.empty:
                lines += ["(no measured cell to show)", ""]
            else:
                shown = s.table.map(_cell)
                if "status" in shown.columns:
                    shown["status"] = [v if v == "ok" else f"**{v}**" for v in shown["status"]]
                lines += [shown.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 12.5px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; } td:nth-child(-n+3) { text-align: left; }
code { background: #f4f4f4; padding: 0 3px; } img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.badge { border-radius: 3px; padding: 0 6px; color: #fff; font-weight: 600; font-size: 11px; }
.ok { background: #2e7d32; } .failed { background: #c62828; } .skipped { background: #9e9e9e; }
.agrees { color: #2e7d32; } .disagrees { color: #c62828; font-weight: 600; }
"""


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _html_table(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = []
    for _, row in table.iterrows():
        cells = []
        for column, value in row.items():
            text = html.escape(_cell(value))
            if column == "status":
                text = f'<span class="badge {text}">{text}</span>'
            elif isinstance(value, str) and value.split(":")[0] in ("agrees", "disagrees"):
                text = f'<span class="{value.split(":")[0]}">{text}</span>'
            cells.append(f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def to_html(parts: list[Section]) -> str:
    """One file, no network: styles inline, plots embedded as data URIs."""
    body = ["<h1>quantbench report</h1>"]
    for s in parts:
        body.append(f"<h{s.level}>{html.escape(s.title)}</h{s.level}>")
        body += [f"<p>{_inline(p)}</p>" for p in s.text]
        for image in s.images:
            data = base64.b64encode(image.read_bytes()).decode()
            body.append(f'<img alt="{html.escape(image.stem)}" src="data:image/png;base64,{data}">')
        if s.table is not None:
            body.append(_html_table(s.table) if not s.table.empty else "<p>(no measured cell to show)</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>quantbench report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def build(metrics_files: list[str], models: dict, out_dir: str, references: list[str], tolerance_pct: float,
          budget_pct: float) -> pd.DataFrame:
    df = summarize(load(metrics_files))
    refs = published.load(references)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plots.draw(df, out)
    matches = published.match(df, refs, models, tolerance_pct)
    parts = sections(df, models, figures, matches, len(refs), guide.load_claims(), tolerance_pct, budget_pct)
    with io.atomic_path(out / "summary.csv") as tmp:
        df.to_csv(tmp, index=False)
    with io.atomic_path(out / "summary.md") as tmp:
        tmp.write_text(markdown(parts), encoding="utf-8")
    with io.atomic_path(out / "report.html") as tmp:
        tmp.write_text(to_html(parts), encoding="utf-8")
    return df
