"""Seals on plain files and directories: what they notice and what they let pass."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from quantbench import failures, seals


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "results" / "m" / "model"
    model.mkdir(parents=True)
    (model / "a.safetensors").write_bytes(b"a" * 1000)
    (model / "config.json").write_text("{}")
    gguf = tmp_path / "results" / "m" / "F16.gguf"
    gguf.write_bytes(b"GGUF" + b"x" * 1000)
    with seals.sealing("results/m/model", "results/m/F16.gguf"):
        pass
    return model, gguf


def test_sealed_artifacts_verify(artifacts):
    (artifacts[0] / ".snakemake_timestamp").touch()  # Snakemake's, not content
    seals.verify("results/m/model", "results/m/F16.gguf", None)
    assert seals.sweep(["results"]) == []


def test_a_truncated_file_is_moved_away_before_planning(artifacts):
    model, gguf = artifacts
    gguf.write_bytes(b"GGUF")
    (message,) = seals.sweep(["results"])
    assert "results/m/F16.gguf is damaged (F16.gguf: 4 bytes, sealed 1004)" in message
    assert not gguf.exists() and list(Path("results/damaged/results/m").glob("F16.gguf.*"))
    assert seals.damage("results/m/F16.gguf") == message  # the cell's row can say why it is gone
    seals.verify("results/m/model")


def test_new_bytes_of_the_same_size_are_caught_by_the_jobs_that_read_them(artifacts):
    model, _ = artifacts
    target = model / "a.safetensors"
    st = target.stat()
    target.write_bytes(b"b" * 1000)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert seals.sweep(["results"]) == []  # size and mtime unchanged: the cheap check cannot see it
    with pytest.raises(failures.Damaged, match="a.safetensors: sha256 differs from the seal"):
        seals.verify("results/m/model")
    assert not model.exists()


def test_an_extra_or_missing_file_is_damage(artifacts):
    model, _ = artifacts
    (model / "config.json").unlink()
    (model / "stray.bin").write_bytes(b"?")
    with pytest.raises(failures.Damaged, match="config.json: missing; stray.bin: not in the seal"):
        seals.verify("results/m/model")


def test_a_touch_with_the_same_content_only_moves_the_seal(artifacts):
    _, gguf = artifacts
    os.utime(gguf, ns=(0, 10**18))
    assert seals.sweep(["results"]) == []
    assert gguf.exists()
    seals.verify("results/m/F16.gguf")
    assert seals.sweep(["results"]) == []


def test_a_job_writing_an_artifact_has_no_seal_until_it_succeeds(artifacts):
    _, gguf = artifacts
    with pytest.raises(RuntimeError), seals.sealing("results/m/F16.gguf"):
        gguf.write_bytes(b"GG")  # half-written when the job dies
        assert seals.sweep(["results"]) == []  # another run's sweep leaves it alone
        raise RuntimeError("killed")
    assert not seals.seal_of(gguf).exists() and gguf.exists()
