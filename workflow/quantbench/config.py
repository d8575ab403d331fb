"""Config validation and the matrix of cells.

The JSON schema checks shapes; `check()` adds what a schema cannot say (which parameters a
method takes, what a model's architecture allows, which files exist) and names the offending
key. Both run when the Snakefile is parsed, before any job. What a method accepts comes from
the method table (methods.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import paths, protocols
from .methods import BASELINE, BASELINE_VARIANT, METHODS, Method, variant_name

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


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
        return paths.cell(paths.CELL, self.model, self.method, self.variant)

    @property
    def metrics(self) -> str:
        return paths.cell(paths.METRICS, self.model, self.method, self.variant)

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
    for name, spec in config["methods"].items():
        method = METHODS[name]
        if "kernel" in spec and spec["kernel"] not in method.kernels:
            takes = [m.name for m in METHODS.values() if m.kernels]
            raise ConfigError(f"methods.{name}.kernel", f"only {', '.join(takes)} checkpoints have a GPTQModel kernel")
        for i, model in enumerate(spec.get("models", [])):
            if model not in models:
                raise ConfigError(f"methods.{name}.models[{i}]", f"unknown model '{model}'; models are {sorted(models)}")
        seen = set()
        for i, variant in enumerate(spec["variants"]):
            key = f"methods.{name}.variants[{i}]"
            if variant_name(variant) in seen:
                raise ConfigError(key, f"variant '{variant_name(variant)}' is listed twice")
            seen.add(variant_name(variant))
            _check_variant(method, key, variant)
        if method.architecture:
            for model in spec.get("models") or models:
                _check_architecture(config["models"][model], model, method, spec["variants"])
    calibration = config.get("calibration", {})
    if calibration.get("source") == "text_file":
        if "text_file" not in calibration:
            raise ConfigError("calibration.text_file", "calibration.source is text_file but no text_file is given")
        if not Path(calibration["text_file"]).expanduser().is_file():
            raise ConfigError("calibration.text_file", f"{calibration['text_file']} does not exist")
    text = config["eval"]["text"]
    if "text_file" in text and not Path(text["text_file"]).expanduser().is_file():
        raise ConfigError("eval.text.text_file", f"{text['text_file']} does not exist")
    try:
        config["eval"] = protocols.resolve(config["eval"])  # every job sees the same filled-in numbers
    except protocols.SpecError as exc:
        raise ConfigError(f"eval.{exc.key}", str(exc)) from exc
    _check_references(config.get("report", {}).get("references", []))


def _check_variant(method: Method, key: str, variant) -> None:
    given = {} if isinstance(variant, str) else {k: v for k, v in variant.items() if k != "name"}
    for name in given:
        if name not in method.params:
            raise ConfigError(f"{key}.{name}", f"{method.name} has no parameter '{name}'; it takes {sorted(method.params)}")
    for name, value in method.variant_params(variant).items():
        param = method.params[name]
        if not param.accepts(value):
            where = f"{key}.{name}" if name in given else key
            raise ConfigError(where, f"{method.name} does not support {name}={value!r}; use {param.describe()}")


def _check_architecture(spec: dict, model: str, method: Method, variants: list) -> None:
    """What can be known before download: a local model's config.json."""
    if spec["source"] != "path":
        return  # checked again by the job itself once the model is downloaded
    hf_config = json.loads((Path(spec["path"]).expanduser() / "config.json").read_text())
    widths = {k: hf_config[k] for k in ("hidden_size", "intermediate_size") if hf_config.get(k)}
    problem = method.architecture(model, widths, variants)
    if problem:
        raise ConfigError(*problem)


def _check_references(refs: list[str]) -> None:
    from . import published

    for i, path in enumerate(refs):
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"report.references[{i}]", f"{path} does not exist")
        try:
            published.load([path])
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"report.references[{i}]", str(exc)) from exc


def cells(config: dict) -> list[Cell]:
    """Every cell of the matrix: one baseline per model, then models x methods x variants."""
    out = [Cell(m, BASELINE.name, BASELINE_VARIANT, bits=16) for m in config["models"]]
    for name, spec in config["methods"].items():
        method = METHODS[name]
        for model in spec.get("models") or config["models"]:
            for variant in spec["variants"]:
                params = method.variant_params(variant)
                out.append(Cell(model, name, variant_name(variant), params, bits=method.bits(params)))
    return out


def find_cell(config: dict, model: str, method: str, variant: str) -> Cell:
    for cell in cells(config):
        if (cell.model, cell.method, cell.variant) == (model, method, variant):
            return cell
    raise KeyError(f"no cell {model}/{method}/{variant} in the config")
