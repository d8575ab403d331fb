"""Faults a long run meets, on the tiny model: a job killed by the machine is retried, not recorded."""
from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
from conftest import snakemake, write_config

pytestmark = pytest.mark.integration

# Loaded by every Python process of the run (PYTHONPATH): the first GPTQModel quantization child
# is killed as the out-of-memory killer kills, with SIGKILL; later ones run.
KILL_ONCE = """\
import os, signal, sys
marker = os.environ.get("QUANTBENCH_TEST_KILL_ONCE")
if marker and "quantbench.packed" in sys.orig_argv and not os.path.exists(marker):
    open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_quantization_is_retried_not_recorded(tmp_path, tiny):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_ONCE)
    marker = tmp_path / "killed-once"
    cfg = write_config(tmp_path, {
        "models": {"tiny": {"source": "path", "path": str(tiny["hf"])}},
        "methods": {"rtn": {"variants": ["w4g128"]}},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128, "max_windows": 4},
    })
    env = {"PYTHONPATH": str(hook), "QUANTBENCH_TEST_KILL_ONCE": str(marker)}
    run = snakemake(tmp_path, "--retries", "1", config=cfg, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert marker.exists()  # the first attempt was killed
    assert "Trying to restart job" in run.stdout + run.stderr
    info = json.loads((tmp_path / "results" / "tiny" / "rtn" / "w4g128" / "quantize.json").read_text())
    assert info["status"] == "ok"
    df = pd.read_csv(tmp_path / "results" / "report" / "summary.csv").set_index("method")
    assert df.loc["rtn", "status"] == "ok"


def test_a_kill_without_retries_fails_the_run_and_leaves_no_result(tmp_path, tiny):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_ONCE)
    cfg = write_config(tmp_path, {
        "models": {"tiny": {"source": "path", "path": str(tiny["hf"])}},
        "methods": {"rtn": {"variants": ["w4g128"]}},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128, "max_windows": 4},
    })
    env = {"PYTHONPATH": str(tmp_path / "hook"), "QUANTBENCH_TEST_KILL_ONCE": str(tmp_path / "killed-once")}
    run = snakemake(tmp_path, "--retries", "0", config=cfg, env=env)
    assert run.returncode != 0
    assert "killed by SIGKILL" in (tmp_path / "results" / "logs" / "quantize" / "tiny" / "rtn" / "w4g128.log").read_text()
    assert not (tmp_path / "results" / "tiny" / "rtn" / "w4g128" / "quantize.json").exists()  # not a result
    run = snakemake(tmp_path, config=cfg, env=env)  # the same command again: the cell runs now
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert json.loads((tmp_path / "results" / "tiny" / "rtn" / "w4g128" / "quantize.json").read_text())["status"] == "ok"


def test_damaged_distributions_are_named_and_recomputed(tmp_path, tiny, tiny_gguf, converter):
    from conftest import share_tools

    share_tools(tmp_path, converter)
    cfg = write_config(tmp_path, {
        "models": {"tiny": {"source": "path", "path": str(tiny["hf"])}},
        "methods": {"gguf": {"variants": ["Q8_0"]}, "bnb": {"variants": ["int8"]}},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128, "max_windows": 4},
    })
    assert snakemake(tmp_path, config=cfg).returncode == 0
    summary = tmp_path / "results" / "report" / "summary.csv"
    before = pd.read_csv(summary).set_index("method")
    dist = tmp_path / "results" / "tiny" / "baseline" / "fp16" / "distributions.npz"
    dist.write_bytes(dist.read_bytes()[: dist.stat().st_size // 2])  # a half-written copy
    run = snakemake(tmp_path, config=cfg)
    assert run.returncode != 0
    logs = "".join(p.read_text() for p in (tmp_path / "results" / "logs" / "evaluate" / "tiny").rglob("*.log"))
    assert "results/tiny/baseline/fp16/distributions.npz is damaged" in logs  # named, not a bare BadZipFile
    for path in (tmp_path / "results" / "tiny").glob("*/*/metrics.json"):  # no row says 'failed' because of it
        assert json.loads(path.read_text())["status"] == "ok", path
    run = snakemake(tmp_path, config=cfg)  # the same command again recomputes the baseline and its cells
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    after = pd.read_csv(summary).set_index("method")
    assert (after["status"] == "ok").all()
    assert after["kl_mean"].to_dict() == pytest.approx(before["kl_mean"].to_dict())


def test_a_conversion_llama_cpp_cannot_do_is_a_row_in_a_written_report(tmp_path, tiny, converter):
    """A model whose vocabulary and config convert (so it passes the check before any job) but holds a tensor
    llama.cpp's converter cannot map: its GGUF cells fail at conversion, a shared job. They are rows saying
    so, the other cells finish, the report is written (replacing the last one, which is no longer current)
    and the run still fails. (What the converter would refuse for a reason the model's files show is refused
    before any job: tests/test_newcomer_models.py.)"""
    import torch
    from conftest import share_tools
    from safetensors.torch import load_file, save_file

    share_tools(tmp_path, converter)
    model = tmp_path / "extra"
    shutil.copytree(tiny["hf"], model)
    weights = load_file(model / "model.safetensors")
    save_file(weights | {"model.extra_adapter.weight": torch.zeros(4, 4, dtype=torch.float16)},
              model / "model.safetensors", metadata={"format": "pt"})
    spec = {"models": {"extra": {"source": "path", "path": str(model)}},
            "methods": {"bnb": {"variants": ["int8"]}},
            "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128, "max_windows": 4}}
    assert snakemake(tmp_path, config=write_config(tmp_path, spec)).returncode == 0
    summary = tmp_path / "results" / "report" / "summary.csv"
    assert len(pd.read_csv(summary)) == 2

    spec["methods"]["gguf"] = {"variants": ["Q8_0", "Q4_0"]}
    cfg = write_config(tmp_path, spec)
    run = snakemake(tmp_path, config=cfg)
    assert run.returncode != 0  # something failed, and the exit code says so
    df = pd.read_csv(summary).set_index(["method", "variant"])
    assert len(df) == 4
    assert df.loc[("baseline", "fp16"), "status"] == "ok" and df.loc[("bnb", "int8"), "status"] == "ok"
    for variant in ("Q8_0", "Q4_0"):
        row = df.loc[("gguf", variant)]
        assert row["status"] == "failed" and row["failed_step"] == "convert", row.to_dict()
        assert "model.extra_adapter.weight" in row["error"]
    md = (summary.parent / "summary.md").read_text()
    assert re.search(r"\*\*extra gguf Q8_0\*\* failed: convert: .*model.extra_adapter.weight", md)
    # That report does not pass for a finished one: the same command tries the failed cells again.
    assert "convert_gguf" in snakemake(tmp_path, "-n", config=cfg).stdout


def test_new_weights_at_the_same_path_are_noticed(tmp_path, tiny):
    """A local model's files are fingerprinted (name, size, modification time): new weights written at
    the same path rerun the model's jobs; an untouched model reruns nothing."""
    import os
    import re
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny["hf"], model)
    cfg = write_config(tmp_path, {
        "models": {"tiny": {"source": "path", "path": str(model)}},
        "methods": {"bnb": {"variants": ["int8"]}},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128, "max_windows": 2},
    })
    assert snakemake(tmp_path, config=cfg).returncode == 0
    assert "Nothing to be done" in snakemake(tmp_path, "-n", config=cfg).stdout
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # new weights (here the same bytes) written at the same path
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    run = snakemake(tmp_path, "-n", config=cfg)
    jobs = set(re.findall(r"^(?:local)?rule (\w+):", run.stdout, flags=re.MULTILINE))
    assert {"download_model", "evaluate_baseline", "evaluate_load_time", "report"} <= jobs, run.stdout[-2000:]


def _sha(path):
    from quantbench import io

    return io.sha256_file(path)


def test_a_truncated_f16_gguf_is_moved_away_and_nothing_good_is_deleted(tmp_path, tiny, converter):
    """The damaged F16 is moved to results/damaged/ before Snakemake plans: the k-quants made from the
    good one stay (a truncation's new mtime used to rerun them, deleting them, and fail); a job that
    needs the F16 again converts it anew."""
    from conftest import share_tools

    share_tools(tmp_path, converter)
    spec = {"models": {"tiny": {"source": "path", "path": str(tiny["hf"])}},
            "methods": {"gguf": {"variants": ["Q8_0", "Q4_0"]}},
            "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128, "max_windows": 4}}
    cfg = write_config(tmp_path, spec)
    assert snakemake(tmp_path, config=cfg).returncode == 0
    f16 = tmp_path / "results" / "tiny" / "gguf" / "F16.gguf"
    quants = [tmp_path / "results" / "tiny" / "gguf" / v / "model.gguf" for v in ("Q8_0", "Q4_0")]
    good = [_sha(p) for p in quants]

    f16.write_bytes(f16.read_bytes()[: f16.stat().st_size // 2])  # a half-written copy
    run = snakemake(tmp_path, config=cfg)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "results/tiny/gguf/F16.gguf is damaged (F16.gguf:" in run.stderr
    assert "Nothing to be done" in run.stdout + run.stderr
    (moved,) = (tmp_path / "results" / "damaged" / "results" / "tiny" / "gguf").glob("F16.gguf.*")  # kept to inspect
    assert not f16.exists() and [_sha(p) for p in quants] == good

    spec["methods"]["gguf"]["variants"].append("Q5_0")
    run = snakemake(tmp_path, config=write_config(tmp_path, spec))  # a new type needs the F16: converted anew
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert _sha(f16) != _sha(moved) and f16.stat().st_size > moved.stat().st_size
    assert (pd.read_csv(tmp_path / "results" / "report" / "summary.csv")["status"] == "ok").all()


def test_a_damaged_file_inside_a_checkpoint_is_named_and_rebuilt(tmp_path, tiny):
    """Same size, same mtime, other bytes: only the seal's sha256 sees it. The evaluation that reads the
    checkpoint refuses it, naming the file; the same command rebuilds it."""
    import os

    cfg = write_config(tmp_path, {
        "models": {"tiny": {"source": "path", "path": str(tiny["hf"])}},
        "methods": {"rtn": {"variants": ["w4g128"]}},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128, "max_windows": 4},
    })
    assert snakemake(tmp_path, config=cfg).returncode == 0
    cell = tmp_path / "results" / "tiny" / "rtn" / "w4g128"
    ppl = json.loads((cell / "metrics.json").read_text())["ppl"]
    weights = cell / "model" / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(data)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    run = snakemake(tmp_path, "--forcerun", "evaluate_packed", config=cfg)  # evaluated again: reads the checkpoint
    assert run.returncode != 0
    log = (tmp_path / "results" / "logs" / "evaluate" / "tiny" / "rtn" / "w4g128.log").read_text()
    assert "results/tiny/rtn/w4g128/model is damaged (model.safetensors: sha256 differs from the seal)" in log
    row = pd.read_csv(tmp_path / "results" / "report" / "summary.csv").set_index("method").loc["rtn"]
    assert row["status"] == "failed" and "model.safetensors: sha256 differs" in row["error"]
    run = snakemake(tmp_path, config=cfg)  # the same command again: quantized anew, evaluated
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert json.loads((cell / "metrics.json").read_text())["ppl"] == pytest.approx(ppl)


def test_a_cell_whose_log_probabilities_are_not_finite_is_a_failed_row(tmp_path, tiny):
    """A kernel that computes NaN (as torchao int8 did in float16 on a GPU) gives a failed row naming it,
    never an "ok" row without a perplexity."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny["hf"], broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    cfg = write_config(tmp_path, {
        "models": {"nan": {"source": "path", "path": str(broken)}},
        "methods": {"bnb": {"variants": ["int8"]}},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128, "max_windows": 2},
        "report": {"speed_repetitions": 2, "max_new_tokens": 2}})
    snakemake(tmp_path, config=cfg)
    df = pd.read_csv(tmp_path / "results" / "report" / "summary.csv").set_index(["method", "variant"])
    for cell in (("baseline", "fp16"), ("bnb", "int8")):
        assert df.loc[cell, "status"] == "failed", df.loc[cell].to_dict()
        assert "its perplexity is nan: the model's log-probabilities are not finite" in df.loc[cell, "error"]
