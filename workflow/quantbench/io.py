"""Small helpers shared by every stage: atomic writes, hashing, JSON, versions."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary sibling of `final`; rename it onto `final` only on success.

    A job that dies half-way leaves `<name>.tmp-<pid>` behind, never a file that
    Snakemake or the report could take for a finished output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data) -> str:  # bytes or any contiguous buffer
    return hashlib.sha256(data).hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, pinned_by: str) -> str:
    """The file's sha256, which must be the pinned one: a download that differs is refused before use."""
    digest = sha256_file(path)
    if digest != expected:
        raise ValueError(f"{Path(path).name} has sha256 {digest}, not {expected} as {pinned_by} pins it: "
                         "refusing to use it")
    return digest


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions(*packages: str) -> dict:
    out = {"python": platform.python_version(), "quantbench": _version("quantbench")}
    for name in packages:
        out[name] = _version(name)
    return out


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
