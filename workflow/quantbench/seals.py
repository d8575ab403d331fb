"""Seals: the size, mtime and sha256 of every file of an artifact, written by the job that made it
(`<artifact>.seal.json`), so that damage and change are noticed.

- A job that writes an artifact seals it on success (`sealing`); while it writes, the old seal is gone.
- A job that reads one verifies it whole first (`verify`). A damaged artifact is moved to
  results/damaged/ and the job fails naming it; the next run rebuilds it.
- Before Snakemake plans a run, `sweep` compares every sealed artifact's sizes and mtimes with its
  seal, reading only what changed. A truncated or rewritten artifact is moved away the same way, so
  its new mtime cannot make Snakemake rerun what was built from it (deleting good outputs, then
  failing on the damaged input): Snakemake rebuilds it when a job needs it again.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import failures, io, paths

SUFFIX = ".seal.json"
NOT_CONTENT = {".snakemake_timestamp", "__pycache__"}  # Snakemake's mark in directory outputs; Python's cache


def seal_of(artifact: str | os.PathLike) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + SUFFIX)


def _files(artifact: Path) -> dict[str, Path]:
    if artifact.is_dir():
        return {str(p.relative_to(artifact)): p for p in sorted(artifact.rglob("*"))
                if p.is_file() and not NOT_CONTENT.intersection(p.relative_to(artifact).parts)}
    return {artifact.name: artifact}


def _hashes(files: dict[str, Path]) -> dict[str, str]:
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL: shards in parallel
        return dict(zip(files, pool.map(io.sha256_file, files.values())))


@contextlib.contextmanager
def sealing(*artifacts: str | os.PathLike):
    """Seal `artifacts` when the block succeeds; no seal (old or new) while they are being written."""
    for artifact in artifacts:
        seal_of(artifact).unlink(missing_ok=True)
    yield
    for artifact in artifacts:
        files = _files(Path(artifact))
        hashes = _hashes(files)
        io.write_json(seal_of(artifact), {"files": {name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns,
                                                           "sha256": hashes[name]} for name, p in files.items()}})


def _differences(artifact: Path, sealed: dict, full: bool) -> list[str]:
    """How `artifact` differs from its seal. Without `full`, a file whose size and mtime are the
    sealed ones is taken as unchanged; the others are hashed."""
    files = _files(artifact)
    out = [f"{name}: missing" for name in sealed if name not in files]
    out += [f"{name}: not in the seal" for name in files if name not in sealed]
    common = {name: p for name, p in files.items() if name in sealed}
    sizes = {name: p.stat().st_size for name, p in common.items()}
    out += [f"{name}: {sizes[name]} bytes, sealed {sealed[name]['size']}"
            for name in common if sizes[name] != sealed[name]["size"]]
    to_hash = {name: p for name, p in common.items() if sizes[name] == sealed[name]["size"]
               and (full or p.stat().st_mtime_ns != sealed[name]["mtime_ns"])}
    out += [f"{name}: sha256 differs from the seal" for name, h in _hashes(to_hash).items()
            if h != sealed[name]["sha256"]]
    return out


def _quarantine(artifact: Path, why: str) -> str:
    """Move a damaged artifact to results/damaged/ and leave its seal saying so; return the message."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    relative = Path(artifact.name) if artifact.is_absolute() else artifact
    dest = Path(paths.DAMAGED) / relative.parent / f"{relative.name}.{stamp}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(artifact, dest)
    message = f"{artifact} is damaged ({why}); moved to {dest}: it is rebuilt by the next run"
    io.write_json(seal_of(artifact), {"damaged": message})
    return message


def verify(*artifacts: str | os.PathLike | None) -> None:
    """Read every sealed artifact whole and compare it with its seal; a damaged one is moved away and
    the job fails naming it (failures.Damaged: never a result). Artifacts made before seals pass."""
    for artifact in map(Path, filter(None, artifacts)):
        sealed = _read(artifact)
        if sealed is None:
            continue
        if problems := _differences(artifact, sealed, full=True):
            raise failures.Damaged(_quarantine(artifact, "; ".join(problems[:3])))


def damage(artifact: str | os.PathLike) -> str | None:
    """Why `artifact` was moved away as damaged, if it was."""
    seal = seal_of(artifact)
    if seal.is_file() and not Path(artifact).exists():
        with contextlib.suppress(ValueError):
            return io.read_json(seal).get("damaged")
    return None


def _read(artifact: Path) -> dict | None:
    seal = seal_of(artifact)
    if not (seal.is_file() and artifact.exists()):
        return None
    try:
        files = io.read_json(seal).get("files")
    except ValueError:
        files = None
    return files


def sweep(roots: list[str] = paths.SEALED) -> list[str]:
    """Check every sealed artifact under `roots` by size and mtime before Snakemake plans: damaged ones
    are moved away (so they are rebuilt first); unchanged content with a new mtime is resealed."""
    messages = []
    for seal in sorted(p for root in roots if Path(root).is_dir() for p in Path(root).rglob(f"*{SUFFIX}")):
        artifact = seal.with_name(seal.name.removesuffix(SUFFIX))
        if seal.is_relative_to(paths.DAMAGED) or (sealed := _read(artifact)) is None:
            continue
        if problems := _differences(artifact, sealed, full=False):
            messages.append(_quarantine(artifact, "; ".join(problems[:3])))
        else:  # a new mtime over the same content (touched, copied): the seal follows
            mtimes = {name: p.stat().st_mtime_ns for name, p in _files(artifact).items()}
            if any(mtimes[name] != entry["mtime_ns"] for name, entry in sealed.items()):
                io.write_json(seal, {"files": {name: entry | {"mtime_ns": mtimes[name]} for name, entry in sealed.items()}})
    for message in messages:
        print(f"quantbench: {message}", file=sys.stderr)
    return messages
