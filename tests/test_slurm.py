"""The tiny-model workflow submitted to a real one-node Slurm cluster (tests/slurm/cluster.sh):
every job goes through sbatch, GPU-tagged rules get a GPU, and a failed job fails the run while
the finished cells stay and the report shows the failed cells as rows."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, share_tools, snakemake, write_config

pytestmark = pytest.mark.integration

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
# evaluate_gguf takes no GPU here: llama.cpp is a CPU build on this machine
GPU_RULES = {"evaluate_baseline", "evaluate_packed", "evaluate_load_time", "evaluate_finetune", "quantize_packed"}
# The profile as a user runs it, plus what this cluster needs: no accounting database (status from
# squeue, no account), its partition, and thread counts that fit the machine (at most 2 CPUs).
SLURM = ["--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"), "--slurm-status-command", "squeue",
         "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "5", "--seconds-between-status-checks", "3",
         "--default-resources", "slurm_partition=quantbench", "--max-threads", str(min(2, os.cpu_count() or 1)),
         "--latency-wait", "5"]


@pytest.fixture(scope="module")
def slurm():
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        reason = f"a Slurm cluster needs root and Debian's slurm-wlm and munge (missing: {missing or 'root'})"
        if os.environ.get("QUANTBENCH_REQUIRE_SLURM"):
            pytest.fail(reason)
        pytest.skip(reason)
    # Not under pytest's tmp dirs: those are private to root, and munged runs as user munge.
    state = Path(tempfile.mkdtemp(prefix="quantbench-slurm-"))
    state.chmod(0o755)
    try:
        for timeout in (120, 60):  # the second start checks that start is idempotent
            start = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True,
                                   timeout=timeout)
            assert start.returncode == 0, start.stdout + start.stderr
        yield {"SLURM_CONF": str(state / "slurm.conf")}, state
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], check=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def jobs_of(state, workdir) -> dict[int, dict]:
    """The scheduler's record (job completion log, then scontrol) of every job run from workdir."""
    jobs = {}
    for line in (state / "log" / "jobcomp.log").read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("WorkDir") == str(workdir):
            shown = subprocess.run(["scontrol", "show", "job", fields["JobId"]], capture_output=True, text=True,
                                   env={**os.environ, "SLURM_CONF": str(state / "slurm.conf")}).stdout
            rule = re.search(r"Comment=rule_(\w+?)(?:_wildcards_\S*)?\s", shown)
            jobs[int(fields["JobId"])] = {"state": fields["JobState"], "rule": rule and rule.group(1),
                                          "gpu": "gres/gpu" in shown or "gres:gpu" in shown, "record": line,
                                          "shown": shown}
    return jobs


def test_the_workflow_runs_through_sbatch_with_gpus_for_gpu_rules(slurm, tmp_path, tiny, converter):
    env, state = slurm
    share_tools(tmp_path, converter)
    cfg = write_config(tmp_path, {
        "models": {"tiny": {"source": "path", "path": str(tiny["hf"]), "gpus": 2}},
        "methods": {"gguf": {"variants": ["Q4_K_M", "Q8_0"]}},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128},
    })
    run = snakemake(tmp_path, *SLURM, "--resources", "gpu=2", config=cfg, env=env, timeout=1500)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    df = pd.read_csv(tmp_path / "results" / "report" / "summary.csv")
    assert len(df) == 3 and set(df["status"]) == {"ok"}
    jobs = jobs_of(state, tmp_path)
    print("\n".join(f"{j['rule']} gpu={j['gpu']} {j['record']}" for j in jobs.values()))  # for the log
    rules = sorted(j["rule"] for j in jobs.values())
    assert rules == sorted(["download_model", "tokenize_eval_text", "convert_gguf", "quantize_gguf", "quantize_gguf",
                            "ollama_modelfile", "ollama_modelfile", "evaluate_baseline", "evaluate_gguf",
                            "evaluate_gguf", "report"])
    assert all(j["state"] == "COMPLETED" for j in jobs.values())
    assert all(j["gpu"] == (j["rule"] in GPU_RULES) for j in jobs.values()), jobs
    (baseline,) = (j for j in jobs.values() if j["rule"] == "evaluate_baseline")
    assert re.search(r"gres[/:]gpu[:=]2\b", baseline["shown"]), baseline["shown"]  # the model's gpus


def test_a_failed_job_fails_the_run_and_keeps_finished_cells(slurm, tmp_path, tiny, converter):
    env, state = slurm
    share_tools(tmp_path, converter)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))  # a GGUF by its magic bytes, so the config is valid; the download job fails
    cfg = write_config(tmp_path, {
        "models": {"tiny": {"source": "path", "path": str(tiny["hf"])},
                   "broken": {"source": "gguf", "path": str(broken)}},
        "methods": {"gguf": {"variants": ["Q8_0"]}},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128},
    })
    run = snakemake(tmp_path, *SLURM, "--retries", "0", config=cfg, env=env, timeout=1500)
    assert run.returncode != 0
    for cell in ("baseline/fp16", "gguf/Q8_0"):
        assert (tmp_path / "results" / "tiny" / cell / "metrics.json").is_file(), cell
    df = pd.read_csv(tmp_path / "results" / "report" / "summary.csv").set_index(["model", "method"])
    assert (df.loc["tiny", "status"] == "ok").all()  # the report is written all the same, every cell a row
    assert (df.loc["broken", "status"] == "failed").all() and (df.loc["broken", "failed_step"] == "download").all()
    failed = [j for j in jobs_of(state, tmp_path).values() if j["state"] != "COMPLETED"]
    assert [j["rule"] for j in failed] == ["download_model"], failed
