"""What each library can take of a model, read before any job from the model's own files and the
library's own tables: a newcomer's model is refused naming the file, key and fix, instead of reaching
a job that fails inside the library with an error that tells nobody what to do.

Each check returns why the model cannot be taken, or None. They are deep (some build the model's
module tree on the meta device, or run llama.cpp's converter on its vocabulary), so they run once, in
the process that plans the run.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def vocab_size(cfg: dict) -> int | None:
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def token_ids(cfg: dict) -> str | None:
    """A special token id outside the vocabulary: embedding it reads past the table (GPTQModel's
    quantization then fails on an assertion, other libraries index garbage)."""
    size = vocab_size(cfg)
    if not isinstance(size, int):
        return None
    for key in TOKEN_KEYS:
        ids = cfg.get(key)
        for token in ids if isinstance(ids, list) else [ids]:
            if isinstance(token, int) and not 0 <= token < size:
                return (f"config.json's {key} is {token}, outside its vocabulary of {size} tokens (vocab_size): "
                        f"correct {key} (or vocab_size) in config.json")
    return None


def causal(cfg: dict) -> str | None:
    """Perplexity and KL need a model that predicts the next token from the ones before it: a class of
    transformers' causal-LM table (or the model's own code that says it is one)."""
    if cfg.get("is_encoder_decoder"):
        return (f"config.json says is_encoder_decoder: the model ({', '.join(cfg.get('architectures') or [])}) is a "
                "sequence-to-sequence model, not a causal language model; quantbench scores next-token prediction")
    archs = cfg.get("architectures") or []
    if "AutoModelForCausalLM" in (cfg.get("auto_map") or {}):
        return None
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if cfg.get("model_type") not in CONFIG_MAPPING_NAMES:
        return (f"transformers {__version__} does not know model_type {cfg.get('model_type')!r} (config.json): the "
                "model needs a newer transformers, or its own code (auto_map, with trust_remote_code: true)")
    causal_classes = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in (v if isinstance(v, tuple) else [v])}
    if not archs:
        if cfg.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return None
        return (f"config.json names no architectures, and transformers has no causal language model for model_type "
                f"{cfg.get('model_type')!r}")
    others = [a for a in archs if a not in causal_classes]
    if others:
        return (f"config.json's architectures is {others}: not a causal language model in transformers' table (an "
                "encoder or another task's head); quantbench scores next-token prediction, which needs a "
                "*ForCausalLM model")
    return None


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds, does not import
    return Path(spec.origin).parent / relative if spec and spec.origin else None


def gptqmodel_types() -> set[str] | None:
    """The model types GPTQModel's own table (gptqmodel/models/auto.py, MODEL_MAP) defines, read from its
    source: importing GPTQModel takes seconds. None where GPTQModel is not installed."""
    source = _package_file("gptqmodel", "models/auto.py")
    if source is None or not source.is_file():
        return None
    types = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                isinstance(t, ast.Name) and t.id == "MODEL_MAP" for t in node.targets):
            types |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == "MODEL_MAP"
                and isinstance(t.slice, ast.Constant) for t in node.targets):
            types |= {t.slice.value for t in node.targets}
    return types


def gptqmodel(hf_dir: str, cfg: dict) -> str | None:
    """GPTQModel quantizes and loads the model types of its table; any other it walks by a guessed module
    tree (its BaseQModel), which fails in ways that do not say why."""
    types = gptqmodel_types()
    model_type = str(cfg.get("model_type", "")).lower()
    if types is None or model_type in types:
        return None
    from importlib.metadata import version

    return (f"GPTQModel {version('gptqmodel')} has no definition for model_type {model_type!r} (config.json) in "
            "its table of supported models")


def hqq(hf_dir: str, cfg: dict) -> str | None:
    """hqq's AutoHQQHFModel finds the decoder blocks at model.model.layers (or model.layers), as Llama-style
    models hold them; it knows no other tree. The model's module tree is built on the meta device (no
    weights) to see where its blocks are."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .architecture import needs_own_code

    trust_remote_code = needs_own_code(cfg)  # refused before this unless the model's trust_remote_code says so
    config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return hqq_blocks(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code))


def hqq_blocks(model) -> str | None:
    """Why hqq cannot walk a loaded model's decoder blocks, or None."""
    import torch

    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None) if inner is not None else getattr(model, "layers", None)
    if isinstance(blocks, torch.nn.ModuleList):
        return None
    found = next((name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)), None)
    return (f"hqq's AutoHQQHFModel looks for the decoder blocks at model.model.layers; {type(model).__name__} holds "
            f"them at {found or 'no ModuleList'}")


def converter(hf_dir: str, converter_script: str, cache_dir: str | None = None) -> str | None:
    """What llama.cpp's converter says of the model's vocabulary and hyperparameters: it converts the
    vocabulary alone (`--vocab-only`: no tensors), which reads every config key its architecture needs, the
    tokenizer files its vocabulary type needs, and recognizes (or not) its pre-tokenizer. A model that
    passed is remembered in `cache_dir` by the hash of its small files and the converter's."""
    files = sorted(p for p in Path(hf_dir).iterdir() if p.is_file() and p.stat().st_size < 64 << 20)
    digest = hashlib.sha256()
    for path in [Path(converter_script), *files]:
        digest.update(path.name.encode() + path.read_bytes())
    passed = Path(cache_dir) / f"{digest.hexdigest()[:32]}.json" if cache_dir else None
    if passed and passed.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, converter_script, str(hf_dir), "--vocab-only", "--outfile",
                              str(Path(tmp) / "vocab.gguf")], capture_output=True, text=True)
    if run.returncode == 0:
        if passed:
            passed.parent.mkdir(parents=True, exist_ok=True)
            passed.write_text(json.dumps({"model": str(hf_dir), "converter": converter_script}))
        return None
    from .failures import error_line

    return _converter_error(run.stderr) or error_line(run.stderr)


def _converter_error(log: str) -> str | None:
    """The converter's own words for why, with what the user can do (its errors name keys, files and
    pre-tokenizer hashes, not fixes)."""
    lines = [line for line in log.splitlines() if line.strip()]
    for line in lines:
        if "pre-tokenizer was not recognized" in line.lower() or "BPE pre-tokenizer" in line:
            hashes = [x.split("chkhsh:", 1)[1].strip() for x in lines if "chkhsh:" in x]
            return ("its BPE pre-tokenizer is not one the pinned converter knows"
                    + (f" (chkhsh {hashes[0]})" if hashes else "") + "; use a model whose tokenizer llama.cpp "
                    "supports, or leave it out of the GGUF methods")
        if line.startswith("KeyError"):
            return (f"config.json lacks {line.removeprefix('KeyError:').strip()}, a key the converter reads for this "
                    "architecture (transformers 5 may no longer write it): add it to config.json")
        if line.startswith("FileNotFoundError"):
            return f"{line.split(':', 1)[1].strip()}: a file its vocabulary type needs is not in the model directory"
    return None
