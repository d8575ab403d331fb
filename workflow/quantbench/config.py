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

from . import architecture, paths, protocols
from .methods import BASELINE, BASELINE_VARIANT, METHODS, PUBLISHED_BY, Family, Method, VariantError, variant_name

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
    def metrics(self) -> str:
        return paths.cell(paths.METRICS, self.model, self.method, self.variant)

    @property
    def calibrated(self) -> bool:
        return METHODS[self.method].calibrated_by(self.params)

    def record(self) -> dict:
        """The cell's identity as written into its metrics.json."""
        return {"model": self.model, "method": self.method, "variant": self.variant, "bits": self.bits,
                "group_size": self.params.get("group_size"), "params": self.params}


def check_files(files: list) -> None:
    """Each config file read as YAML again, strictly (see `read`)."""
    for file in files:
        read(file)


def read(file) -> dict:
    """A config file read strictly: a syntax error with its line, a key given twice (which YAML readers
    silently collapse to the last) refused with both lines."""
    import yaml

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(str(key), f"{loader.name}, line {line}: '{key}' is given twice (first on line "
                                  f"{lines[key]}); YAML would keep only the last")
            lines[key] = line
        return loader.construct_mapping(node, deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    with open(file, encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=Strict)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise ConfigError("(file)", f"{file}, line {mark.line + 1}, column {mark.column + 1}: {exc.problem}") from exc


def load(file) -> dict:
    """A config file, read strictly and validated, as `quantbench check-config` does it."""
    return validate(read(file))


def validate(config: dict, deep: bool = True) -> dict:
    """Schema (with defaults filled in) plus cross-field checks; returns config. `deep` adds what the
    libraries say of each local model (support.py): seconds of work, done once by the planning process."""
    from snakemake.utils import validate as schema_validate

    check_schema(config)
    schema_validate(config, str(SCHEMA), set_default=True)  # fills in the schema's defaults
    check(config, deep)
    return config


def check_gpus(config: dict, allowed: int | None) -> None:
    """A model's `gpus` within the run's `--resources gpu=N`: Snakemake would quietly lower a job's
    request to N, and the model would load on fewer GPUs than it was given."""
    for name, model in config["models"].items():
        if allowed is not None and model["gpus"] > allowed:
            raise ConfigError(f"models.{name}.gpus", f"{model['gpus']} GPUs, and this run allows {allowed} "
                                                     f"(--resources gpu={allowed}): give --resources gpu={model['gpus']}")


def _dotted(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def check_schema(config: dict) -> None:
    """The schema's verdict as a ConfigError naming the key; where a value may take one of several
    forms (oneOf), why each form refuses it."""
    import jsonschema
    import yaml

    validator = jsonschema.Draft202012Validator(yaml.safe_load(SCHEMA.read_text()))
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return
    key = _dotted(error.absolute_path) or "(top level)"
    message = error.message
    if error.validator in ("oneOf", "anyOf"):  # say why each form refuses it, not the whole value again
        reasons = dict.fromkeys(e.message for e in error.context)
        message = "it takes none of the forms it may take: " + "; or ".join(reasons)
    raise ConfigError(key, message)


def check(config: dict, deep: bool = True) -> None:
    models = config["models"]
    _check_names(models)
    local = {name: _check_model(name, model, deep) for name, model in models.items()}  # their config.json, if local
    for name, spec in config["methods"].items():
        method = METHODS[name]
        if "kernel" in spec and spec["kernel"] not in method.kernels:
            takes = [m.name for m in METHODS.values() if m.kernels]
            raise ConfigError(f"methods.{name}.kernel", f"only {', '.join(takes)} checkpoints have a GPTQModel kernel")
        for i, model in enumerate(spec.get("models", [])):
            if model not in models:
                raise ConfigError(f"methods.{name}.models[{i}]", f"unknown model '{model}'; models are {sorted(models)}")
            if model in spec["models"][:i]:
                raise ConfigError(f"methods.{name}.models[{i}]", f"model '{model}' is listed twice")
        seen = set()
        for i, variant in enumerate(spec["variants"]):
            key = f"methods.{name}.variants[{i}]"
            _check_variant(method, key, variant)
            try:
                variant = spec["variants"][i] = method.named(variant)
            except VariantError as exc:
                raise ConfigError(key, str(exc)) from exc
            if variant_name(variant) in seen:
                raise ConfigError(key, f"variant '{variant_name(variant)}' is listed twice")
            seen.add(variant_name(variant))
        for model in spec.get("models") or models:
            problem = method.architecture and local[model] and method.architecture(
                model, architecture.widths(local[model]), spec["variants"])
            if problem:
                raise ConfigError(*problem)
    for name, spec in config["methods"].items():
        for model in (spec.get("models") or models) if deep and METHODS[name].supports else []:
            problem = local[model] and METHODS[name].supports(models[model]["path"], local[model])
            if problem:
                raise ConfigError(f"methods.{name}.models", f"model '{model}': {problem}; list the other models in "
                                                            f"methods.{name}.models")
    for name, spec in config["methods"].items():  # the methods that write GGUF files of the HF model
        if METHODS[name].family in (Family.GGUF, Family.GGUF_EXPORT):
            _check_convertible(name, spec.get("models") or models, local, models, deep)
    gguf_models = config["methods"].get("gguf", {}).get("models")
    if config["eval"].get("tokens") == "gguf" and gguf_models:
        left_out = [m for m in models if m not in gguf_models]
        if left_out:
            raise ConfigError("eval.tokens", f"tokens: gguf tokenizes every model with llama.cpp from its converted "
                              f"GGUF, but methods.gguf.models leaves out {left_out}: add them there or use tokens: hf")
    calibration = config.get("calibration", {})
    if calibration.get("source") == "text_file":
        if "text_file" not in calibration:
            raise ConfigError("calibration.text_file", "calibration.source is text_file but no text_file is given")
        _check_text_file("calibration.text_file", calibration["text_file"])
    text = config["eval"]["text"]
    if {"dataset", "text_file"} <= set(text):
        raise ConfigError("eval.text", "the evaluation text is a dataset or a text_file, not both")
    if "text_file" in text:
        _check_text_file("eval.text.text_file", text["text_file"])
    try:
        config["eval"] = protocols.resolve(config["eval"])  # every job sees the same filled-in numbers
    except protocols.SpecError as exc:
        raise ConfigError(f"eval.{exc.key}", str(exc)) from exc
    if config["eval"].get("tasks"):
        from . import tasks

        config["eval"]["tasks"] = [tasks.task_record(t) for t in config["eval"]["tasks"]]  # local paths absolute
        problem = tasks.check(config["eval"]["tasks"], paths.TASKS_FETCHED)
        if problem:
            raise ConfigError(*problem)
    for name, hf_config in local.items():
        problem = hf_config and architecture.too_long(hf_config, config["eval"]["context"], f"model '{name}'")
        if problem:
            raise ConfigError("eval.context", problem)
    if "text_file" in text:
        _check_text_length(config)
    _check_references(config.get("report", {}).get("references", []))


def _check_names(models: dict) -> None:
    """A model's name is a folder under results/ and a part of job names: none may write into the workflow's
    own folders, end in a dot (Windows and SMB shares drop it; names then collide), or differ from another
    only in case (one folder on macOS and Windows file systems)."""
    seen = {}
    for name in models:
        if name in paths.RESULTS_FOLDERS:
            raise ConfigError(f"models.{name}", f"'{name}' is a folder of the workflow's own under {paths.RESULTS}/ "
                                                f"({', '.join(paths.RESULTS_FOLDERS)}): rename the model")
        if name.endswith("."):
            raise ConfigError(f"models.{name}", "a name ending in '.' is not kept by every file system (Windows, SMB "
                                                "shares drop the dot): rename the model")
        if name.lower() in seen:
            raise ConfigError(f"models.{name}", f"'{name}' and '{seen[name.lower()]}' differ only in case: one folder "
                                                "on case-insensitive file systems (macOS, Windows); rename one")
        seen[name.lower()] = name


def _check_model(name: str, model: dict, deep: bool = True) -> dict | None:
    """What can be known of a model before it is downloaded: its local files. Returns a local Hugging
    Face model's config.json, for the checks that need its shape."""
    key = f"models.{name}"
    if model["source"] == "gguf":
        _check_gguf_file(key, model)
    for only_gguf in ("filename", "sha256", "wheel"):
        if only_gguf in model and model["source"] != "gguf":
            raise ConfigError(f"{key}.{only_gguf}", f"only a gguf source takes {only_gguf} (this one is "
                                                    f"{model['source']})")
    for file, spec in model.get("gguf_files", {}).items():
        _check_gguf_file(f"{key}.gguf_files.{file}", spec)
    for name, spec in model.get("checkpoints", {}).items():
        if {"path", "repo"} <= set(spec):
            raise ConfigError(f"{key}.checkpoints.{name}", "a checkpoint is a path or a Hub repo, not both")
        if "path" in spec and not (Path(spec["path"]).expanduser() / "config.json").is_file():
            raise ConfigError(f"{key}.checkpoints.{name}.path", f"{spec['path']} holds no config.json (need a "
                                                               "Hugging Face checkpoint directory)")
    if model["source"] != "path":
        return None
    hf_dir = Path(model["path"]).expanduser()
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{key}.path", f"{hf_dir} holds no config.json (need a Hugging Face model directory)")
    try:
        hf_config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}.path", f"{hf_dir / 'config.json'} is not valid JSON: {exc}") from exc
    if architecture.needs_own_code(hf_config) and not model.get("trust_remote_code"):
        raise ConfigError(f"{key}.trust_remote_code", f"{hf_dir / 'config.json'} has auto_map: the model runs its own "
                          "code; set trust_remote_code: true only if you trust it")
    from . import support

    for problem in (support.token_ids(hf_config), deep and support.causal(hf_config)):
        if problem:
            raise ConfigError(f"{key}.path", f"{hf_dir}: {problem}")
    return hf_config


def _check_gguf_file(key: str, spec: dict) -> None:
    """A GGUF file named one way (a path, a wheel member or a Hub file), and what can be known of it before
    it is fetched."""
    ways = [w for w in ("path", "wheel", "repo") if w in spec]
    if len(ways) > 1:
        raise ConfigError(key, f"a GGUF file is a path, a wheel member or a Hub repo's file, not {' and '.join(ways)}")
    if "wheel" in spec:
        from .sources import cached_wheel, missing_member

        wheel = cached_wheel(Path(paths.DOWNLOAD_CACHE) / "wheels", spec["wheel"])  # once a run fetched it
        problem = wheel and missing_member(wheel, spec["wheel"]["member"])
        if problem:
            raise ConfigError(f"{key}.wheel.member", problem)
    if "path" in spec:
        path = Path(spec["path"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}.path", f"GGUF file {spec['path']} does not exist")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ConfigError(f"{key}.path", f"{spec['path']} is not a GGUF file (it does not start with 'GGUF')")


def _check_convertible(method: str, gguf_models: list[str], local: dict, models: dict, deep: bool) -> None:
    """Once an earlier run (or setup) fetched llama.cpp's converter, its registry says which local models
    it can convert: what the pinned llama.cpp can load and evaluate, whoever writes the GGUF (AutoRound's
    export has its own copy of the conversion code). `deep`: the converter converts each one's vocabulary,
    which reads the config keys and tokenizer files the whole conversion needs."""
    converter = Path(paths.CONVERTER)
    if not converter.is_file():
        return
    from . import support
    from .llamacpp import LLAMA_CPP_PYTHON_PIN, converter_architectures

    known = converter_architectures(converter)
    for name in gguf_models:
        unknown = [a for a in (local[name] or {}).get("architectures") or [] if a not in known]
        problem = f"it does not know {', '.join(unknown)}" if unknown else None
        if not problem and deep and local[name]:
            problem = support.converter(models[name]["path"], str(converter), paths.CONVERTER_CHECKED)
        if problem:
            raise ConfigError(f"methods.{method}.models", f"llama.cpp's converter (llama-cpp-python "
                              f"{LLAMA_CPP_PYTHON_PIN}) cannot convert model '{name}': {problem}; list the other "
                              f"models in methods.{method}.models")


def _check_text_length(config: dict) -> None:
    """A text too short for one window after the calibration holdout, whatever the tokenizer: a token
    covers at least one byte, so a file of n bytes gives at most n + 1 tokens (with a BOS)."""
    from .calibration import holdout_tokens

    spec, path = config["eval"], config["eval"]["text"]["text_file"]
    skip = holdout_tokens(config.get("calibration")) if any(c.calibrated for c in cells(config)) else 0
    window = {"llamacpp": 2 * spec["context"], "gptq": spec["context"]}.get(spec["protocol"], 2)
    n_bytes = Path(path).expanduser().stat().st_size
    if n_bytes + 1 < skip + window:
        raise ConfigError("eval.text.text_file", f"{path} has {n_bytes} bytes, so at most {n_bytes + 1} tokens: fewer "
                          f"than the {skip + window} needed ({skip} held out for calibration, then {window} for one "
                          f"{spec['protocol']} window)")


def _check_text_file(key: str, path: str) -> None:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(key, f"{path} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(key, f"{path} is not UTF-8 text ({exc})") from exc
    if not text.strip():
        raise ConfigError(key, f"{path} is empty")


def _check_variant(method: Method, key: str, variant) -> None:
    given = {} if isinstance(variant, str) else {k: v for k, v in variant.items() if k != "name"}
    for name in given:
        if name not in method.params:
            raise ConfigError(f"{key}.{name}", f"{method.name} has no parameter '{name}'; it takes {sorted(method.params)}")
    try:
        params = method.variant_params(variant)
    except VariantError as exc:
        raise ConfigError(key + exc.key, str(exc)) from exc
    for name, value in params.items():
        param = method.params[name]
        if not param.accepts(value):
            where = f"{key}.{name}" if name in given else key
            raise ConfigError(where, f"{method.name} does not support {name}={value!r}; use {param.describe()}")
    problem = method.consistent(params)
    if problem:
        name, why = problem
        raise ConfigError(f"{key}.{name}" if name in given else key, why)


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
    """Every cell of the matrix: one baseline per model, models x methods x variants, then the models'
    published artifacts."""
    out = [Cell(m, BASELINE.name, BASELINE_VARIANT, bits=16) for m in config["models"]]
    for name, spec in config["methods"].items():
        method = METHODS[name]
        for model in spec.get("models") or config["models"]:
            for variant in spec["variants"]:
                params = method.variant_params(variant)
                out.append(Cell(model, name, variant_name(variant), params, bits=method.bits(params)))
    for model, model_spec in config["models"].items():  # the artifacts published for it, as they are
        for key, method in PUBLISHED_BY.items():
            out += [Cell(model, method.name, name, spec) for name, spec in model_spec.get(key, {}).items()]
    return out

