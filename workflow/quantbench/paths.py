"""Where everything lives: the one home of the workflow's paths and log names.

Each path is a pattern with Snakemake wildcards ({model}, {method}, {variant}); rules use the
patterns, Python fills them with `.format(...)`. Relative to the workflow's working directory.
"""
from __future__ import annotations

from .llamacpp import LLAMA_CPP_PYTHON_PIN

RESULTS = "results"
RESOURCES = "resources"

# Shared inputs, fetched once
MODEL_DIR = f"{RESOURCES}/models/{{model}}/hf"          # every model as a Hugging Face directory
DOWNLOAD_CACHE = f"{RESOURCES}/cache"


def text_cache(dataset: str, resources: str = RESOURCES) -> str:
    """A dataset's cached test rows (resources/ may be another root: an import, a test)."""
    return f"{resources}/data/{dataset}/test_rows.json"


TEXT_CACHE = text_cache("{dataset}")
TASK_DATA = f"{RESOURCES}/cache/task-data"        # the Hub's lm-eval task data, as `datasets` caches it
TASKS_FETCHED = f"{TASK_DATA}/fetched.json"         # which tasks were fetched into it
TOOLS = f"{RESOURCES}/tools"
CONVERTER = f"{TOOLS}/llama.cpp-{LLAMA_CPP_PYTHON_PIN}/convert_hf_to_gguf.py"  # llama.cpp's, from the pinned sdist
# llama.cpp's own programs (llamacpp.TOOLS), built once from the same sdist's source by setup or the workflow
LLAMA_TOOLS = f"{TOOLS}/llama.cpp-{LLAMA_CPP_PYTHON_PIN}-bin"
LLAMA_TOOL = f"{LLAMA_TOOLS}/{{tool}}"

# Once per model
EVAL_TOKENS = f"{RESULTS}/{{model}}/data/eval_tokens.npy"
EVAL_TOKENS_META = f"{RESULTS}/{{model}}/data/eval_tokens.json"
CALIB_TOKENS = f"{RESULTS}/{{model}}/data/calib_tokens.npy"
CALIB_TOKENS_META = f"{RESULTS}/{{model}}/data/calib_tokens.json"
F16_GGUF = f"{RESULTS}/{{model}}/gguf/F16.gguf"
IMATRIX = f"{RESULTS}/{{model}}/gguf/imatrix.gguf"  # llama-imatrix's, from the calibration tokens
IMATRIX_INFO = f"{RESULTS}/{{model}}/gguf/imatrix.json"
IMATRIX_TEXT = f"{RESULTS}/{{model}}/gguf/imatrix-calibration.txt"  # the calibration tokens as the text it read

# One directory per cell: its artifact, what quantizing it recorded, its metrics
CELL = f"{RESULTS}/{{model}}/{{method}}/{{variant}}"
GGUF_FILE = f"{CELL}/model.gguf"
MODELFILE = f"{CELL}/Modelfile"  # beside the GGUF: `ollama create NAME -f` it
PACKED_DIR = f"{CELL}/model"
QUANTIZE_INFO = f"{CELL}/quantize.json"
METRICS = f"{CELL}/metrics.json"
# The baseline's next-token distributions, stored once per model; every other cell's KL reads them.
DISTRIBUTIONS = f"{RESULTS}/{{model}}/baseline/fp16/distributions.npz"

# Artifacts carry seals (seals.py); damaged ones are moved here, never deleted
SEALED = [RESULTS, f"{RESOURCES}/models", TOOLS]
DAMAGED = f"{RESULTS}/damaged"

# Where the workflow checks a model's vocabulary converts, once per model files (support.converter)
CONVERTER_CHECKED = ".snakemake/quantbench/converter-checked"

REPORT_DIR = f"{RESULTS}/report"
REPORT_DONE = f"{REPORT_DIR}/.complete"  # written by the report rule only, last

# Logs and benchmarks: results/{logs,benchmarks}/<step>/<what the job is for>.{log,tsv}
PER_MODEL = "{model}"
PER_CELL = "{model}/{method}/{variant}"


def log(step: str, key: str = "") -> str:
    return f"{RESULTS}/logs/{step}/{key or step}.log"


def benchmark(step: str, key: str = "") -> str:
    return f"{RESULTS}/benchmarks/{step}/{key or step}.tsv"


# The folders of results/ that are the workflow's own, not a model's: no model may be named like one
RESULTS_FOLDERS = tuple(p.removeprefix(f"{RESULTS}/").split("/")[0] for p in (REPORT_DIR, DAMAGED, log("s"),
                                                                               benchmark("s")))


def cell(pattern: str, model: str, method: str, variant: str) -> str:
    return pattern.format(model=model, method=method, variant=variant)


def cell_name(metrics: str) -> str:
    """'{method}/{variant}' of a cell's metrics pattern (its label in `snakemake --report`)."""
    return metrics.removeprefix(f"{RESULTS}/{{model}}/").removesuffix("/metrics.json")


def baseline(pattern: str) -> str:
    """A per-cell pattern for the baseline cell of {model}."""
    return pattern.replace("{method}", "baseline").replace("{variant}", "fp16")
