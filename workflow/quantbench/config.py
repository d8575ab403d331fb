"""Config validation and the matrix of cells.

The JSON schema checks shapes; `check()` adds what a schema cannot say (which
variants a method supports, what a model's architecture allows) and names the
offending key. Both run when the Snakefile is parsed, before any job.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import protocols

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"

BASELINE = "baseline"  # method name of each model's unquantized reference cell
BASELINE_VARIANT = "fp16"

# llama.cpp quantization types offered by `gguf` (name -> bits used for sorting and checks).
GGUF_TYPES = {
    "Q2_K": 2, "Q3_K_S": 3, "Q3_K_M": 3, "Q3_K_L": 3, "Q4_0": 4, "Q4_1": 4,
    "Q4_K_S": 4, "Q4_K_M": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K_S": 5, "Q5_K_M": 5,
    "Q6_K": 6, "Q8_0": 8, "F16": 16, "BF16": 16,
}
K_QUANT_BLOCK = 256  # k-quants need rows divisible by this, or llama.cpp falls back silently

# Method parameters: default, and the values each method supports.
GROUPS = {-1, 32, 64, 128}
PARAMS = {
    "gptq": {"bits": (4, {2, 3, 4, 8}), "group_size": (128, GROUPS), "desc_act": (False, {False, True}),
             "sym": (True, {False, True}), "damp": (0.01, "fraction")},
    "awq": {"bits": (4, {4}), "group_size": (128, {64, 128}), "zero_point": (True, {False, True})},
    "rtn": {"bits": (4, {2, 3, 4, 8}), "group_size": (128, GROUPS), "sym": (True, {False, True})},
    "bnb": {"mode": ("nf4", {"int8", "nf4", "fp4"}), "threshold": (6.0, "positive"),
            "double_quant": (False, {False, True}), "compute_dtype": ("float32", {"float16", "bfloat16", "float32"})},
    "eetq": {},
}
BNB_BITS = {"int8": 8, "nf4": 4, "fp4": 4}
KERNEL_METHODS = ("gptq", "awq", "rtn")  # GPTQModel checkpoints: `methods.<m>.kernel` picks how they are evaluated
KERNELS = ("auto", "torch", "triton", "marlin", "exllama_v2")  # the schema's enum for `kernel`


class ConfigError(ValueError):
    """A config problem, with the dotted key that causes it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    variant: str
    params: dict = field(default_factory=dict, compare=False, hash=False)
    bits: float | None = None

    @property
    def dir(self) -> str:
        return f"results/{self.model}/{self.method}/{self.variant}"

    @property
    def metrics(self) -> str:
        return f"{self.dir}/metrics.json"

    def record(self) -> dict:
        """The cell's identity as written into its metrics.json."""
        return {"model": self.model, "method": self.method, "variant": self.variant, "bits": self.bits,
                "group_size": self.params.get("group_size"), "params": self.params}


def validate(config: dict) -> dict:
    """Schema (with defaults filled in) plus cross-field checks; returns config."""
    from snakemake.utils import validate as schema_validate

    schema_validate(config, str(SCHEMA), set_default=True)
    check(config)
    return config


def check(config: dict) -> None:
    models = config["models"]
    for name, model in models.items():
        if model["source"] == "path":
            hf_dir = Path(model["path"]).expanduser()
            if not (hf_dir / "config.json").is_file():
                raise ConfigError(f"models.{name}.path", f"{hf_dir} holds no config.json (need a Hugging Face model directory)")
        if model["source"] == "gguf" and "path" in model and not Path(model["path"]).expanduser().is_file():
            raise ConfigError(f"models.{name}.path", f"GGUF file {model['path']} does not exist")
    for method, spec in config["methods"].items():
        if "kernel" in spec and method not in KERNEL_METHODS:
            raise ConfigError(f"methods.{method}.kernel", f"only {', '.join(KERNEL_METHODS)} checkpoints have a GPTQModel kernel")
        for i, model in enumerate(spec.get("models", [])):
            if model not in models:
                raise ConfigError(f"methods.{method}.models[{i}]", f"unknown model '{model}'; models are {sorted(models)}")
        names = set()
        for i, variant in enumerate(spec["variants"]):
            name = variant_name(variant)
            key = f"methods.{method}.variants[{i}]"
            if name in names:
                raise ConfigError(key, f"variant '{name}' is listed twice")
            names.add(name)
            CHECKS[method](key, variant)
        for model in spec.get("models") or models:
            _check_architecture(config, method, model)
    calibration = config.get("calibration", {})
    if calibration.get("source") == "text_file":
        if "text_file" not in calibration:
            raise ConfigError("calibration.text_file", "calibration.source is text_file but no text_file is given")
        if not Path(calibration["text_file"]).expanduser().is_file():
            raise ConfigError("calibration.text_file", f"{calibration['text_file']} does not exist")
    text = config["eval"]["text"]
    if "text_file" in text and not Path(text["text_file"]).expanduser().is_file():
        raise ConfigError("eval.text.text_file", f"{text['text_file']} does not exist")
    _check_eval(config["eval"])
    _check_references(config.get("report", {}).get("references", []))


def _check_references(paths: list[str]) -> None:
    from . import published

    for i, path in enumerate(paths):
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"report.references[{i}]", f"{path} does not exist")
        try:
            published.load([path])
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"report.references[{i}]", str(exc)) from exc


def _check_eval(spec: dict) -> None:
    """Protocol-dependent defaults and limits (filled in, so every job sees the same numbers)."""
    name = spec["protocol"]
    spec.setdefault("context", protocols.DEFAULT_CONTEXT[name])
    if name in protocols.SLIDING:
        spec.setdefault("stride", protocols.DEFAULT_STRIDE)
        if spec["stride"] > spec["context"]:
            raise ConfigError("eval.stride", f"stride {spec['stride']} is longer than the window ({spec['context']})")
    elif "stride" in spec:
        raise ConfigError("eval.stride", f"only the sliding protocols take a stride; {name} steps by whole windows")
    if name == "llamacpp" and spec["context"] % 2:
        raise ConfigError("eval.context", "the llamacpp protocol scores the second half of each window: use an even context")


def _check_gguf_variant(key: str, variant) -> None:
    gguf_type = variant if isinstance(variant, str) else variant.get("type", variant["name"])
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(key, f"'{gguf_type}' is not a llama.cpp quantization type; known: {', '.join(GGUF_TYPES)}")
    if isinstance(variant, dict) and set(variant) - {"name", "type"}:
        raise ConfigError(key, f"unknown gguf variant keys {sorted(set(variant) - {'name', 'type'})}")


def _check_params(method: str):
    def check(key: str, variant) -> None:
        given = {} if isinstance(variant, str) else {k: v for k, v in variant.items() if k != "name"}
        for name, value in given.items():
            if name not in PARAMS[method]:
                raise ConfigError(f"{key}.{name}", f"{method} has no parameter '{name}'; it takes {sorted(PARAMS[method])}")
            allowed = PARAMS[method][name][1]
            ok = (0 < value < 1 if allowed == "fraction" else value > 0 if allowed == "positive"
                  else type(value) is type(next(iter(allowed))) and value in allowed)
            if not ok:
                shown = {"fraction": "a number in (0, 1)", "positive": "a positive number"}.get(allowed, sorted(allowed))
                raise ConfigError(f"{key}.{name}", f"{method} does not support {name}={value!r}; use {shown}")
    return check


CHECKS = {"gguf": _check_gguf_variant, **{m: _check_params(m) for m in PARAMS}}


def method_params(method: str, variant) -> dict:
    """A variant's parameters with the method's defaults filled in."""
    if method == "gguf":
        return {"type": gguf_type(variant)}
    given = {} if isinstance(variant, str) else {k: v for k, v in variant.items() if k != "name"}
    return {name: given.get(name, default) for name, (default, _) in PARAMS[method].items()}


def _bits(method: str, params: dict):
    if method == "gguf":
        return GGUF_TYPES.get(params["type"])
    if method == "bnb":
        return BNB_BITS[params["mode"]]
    return 8 if method == "eetq" else params["bits"]


def _check_architecture(config: dict, method: str, model: str) -> None:
    """What can be known before download: a local model's config.json."""
    spec = config["models"][model]
    if spec["source"] != "path":
        return  # checked again by the job itself once the model is downloaded
    hf_config = json.loads((Path(spec["path"]).expanduser() / "config.json").read_text())
    if method == "gguf":
        # A k-quant block spans 256 weights of a row; llama.cpp quietly falls back to a legacy type for
        # rows of another length. Where no matrix fits, the cell would not be the k-quant it is named.
        widths = [hf_config.get("hidden_size"), hf_config.get("intermediate_size")]
        k_quants = [variant_name(v) for v in config["methods"][method]["variants"] if "_K" in gguf_type(v)]
        if k_quants and all(w and w % K_QUANT_BLOCK for w in widths):
            raise ConfigError(
                "methods.gguf.variants",
                f"{k_quants} need rows divisible by {K_QUANT_BLOCK}, but model '{model}' has hidden_size "
                f"{widths[0]} and intermediate_size {widths[1]}: llama.cpp would store every matrix in a fallback "
                "type. Use Q4_0/Q5_0/Q8_0, or restrict methods.gguf.models",
            )
    if method == "awq":  # AWQ packs whole groups along each input row
        widths = {hf_config.get("hidden_size"), hf_config.get("intermediate_size")} - {None}
        for i, variant in enumerate(config["methods"][method]["variants"]):
            group = method_params(method, variant)["group_size"]
            if any(w % group for w in widths):
                raise ConfigError(f"methods.awq.variants[{i}].group_size",
                                  f"AWQ needs every input width divisible by the group size; model '{model}' has "
                                  f"widths {sorted(widths)}, not multiples of {group}")


def variant_name(variant) -> str:
    return variant if isinstance(variant, str) else variant["name"]


def gguf_type(variant) -> str:
    return variant if isinstance(variant, str) else variant.get("type", variant["name"])


def cells(config: dict) -> list[Cell]:
    """Every cell of the matrix: one baseline per model, then models x methods x variants."""
    out = [Cell(m, BASELINE, BASELINE_VARIANT, bits=16) for m in config["models"]]
    for method, spec in config["methods"].items():
        for model in spec.get("models") or config["models"]:
            for variant in spec["variants"]:
                params = method_params(method, variant)
                out.append(Cell(model, method, variant_name(variant), params, bits=_bits(method, params)))
    return out


def find_cell(config: dict, model: str, method: str, variant: str) -> Cell:
    for cell in cells(config):
        if (cell.model, cell.method, cell.variant) == (model, method, variant):
            return cell
    raise KeyError(f"no cell {model}/{method}/{variant} in the config")
