"""GGUF as its users run it: a published GGUF evaluated as it is beside its base model (and one of
another model refused before scoring), AutoRound's GGUF export beside llama.cpp's own quantization of
the same type, a Modelfile beside every GGUF that Ollama can read, llama-bench's pp/tg speeds, and
greedy completions of the config's prompts through llama-cpp-python's `Llama`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import share_tools, snakemake, write_config

from quantbench import ollama, paths, sources

pytestmark = pytest.mark.integration

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PROMPTS = ["def main(", "The module"]


@pytest.fixture(scope="module")
def chat_model(tiny, tmp_path_factory) -> Path:
    """The tiny model as a chat model: the same weights, a ChatML template in its tokenizer config."""
    out = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny["hf"], out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHATML}))
    return out


@pytest.fixture(scope="module")
def other_vocab_gguf(other_vocab, converter) -> Path:
    out = other_vocab.parent / "other-vocab.Q8_0.gguf"
    subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(other_vocab), "--outtype", "q8_0",
                    "--outfile", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def users_run(tmp_path_factory, chat_model, tiny, tiny_gguf, other_vocab_gguf, converter):
    work = tmp_path_factory.mktemp("gguf-users")
    share_tools(work, converter)
    cfg = write_config(work, {
        "models": {"tiny": {"source": "path", "path": str(chat_model), "gguf_files": {
            "published-Q8_0": {"path": str(tiny_gguf)},  # converted straight to Q8_0, as a community file is
            "other-model": {"path": str(other_vocab_gguf)}}}},
        "methods": {"gguf": {"variants": ["Q8_0", {"type": "Q4_0"}]},
                    "autoround-gguf": {"variants": ["Q4_0", {"name": "Q4_0-i8", "type": "Q4_0", "iters": 8}]}},
        "calibration": {"source": "eval-holdout", "n_samples": 8, "seq_len": 128},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128, "max_windows": 8},
        "report": {"prompts": PROMPTS, "max_new_tokens": 12},
        "ollama": {"parameters": {"temperature": 0.2}},
    })
    run = snakemake(work, config=cfg)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return work


def _metrics(work: Path, method: str, variant: str) -> dict:
    return json.loads((work / paths.cell(paths.METRICS, "tiny", method, variant)).read_text())


def test_a_published_gguf_scores_as_its_own_cell_and_records_where_it_came_from(users_run, tiny_gguf):
    published, own = _metrics(users_run, "gguf-file", "published-Q8_0"), _metrics(users_run, "gguf", "Q8_0")
    assert published["status"] == "ok", published["error"]
    # the converter's Q8_0 of the fp16 weights is the quantizer's Q8_0 of the F16 GGUF: the same scores
    assert published["ppl"] == pytest.approx(own["ppl"], rel=1e-9)
    assert published["kl_mean"] == pytest.approx(own["kl_mean"], rel=1e-6, abs=1e-9)
    assert published["file_type"] == "Q8_0" and published["bits"] == 8
    assert published["source"] == {"path": str(tiny_gguf), "gguf_sha256": sources.io.sha256_file(tiny_gguf)}
    assert published["protocol"]["n_scored_tokens"] == own["protocol"]["n_scored_tokens"]


def test_a_gguf_of_another_model_is_refused_before_scoring_naming_both_sizes(users_run, other_vocab_gguf):
    other = _metrics(users_run, "gguf-file", "other-model")
    base = json.loads((users_run / "resources" / "models" / "tiny" / "hf" / "config.json").read_text())
    n_other = len(ollama.gguf_metadata(str(other_vocab_gguf))["tokens"])
    assert other["status"] == "failed" and other["ppl"] is None and n_other != base["vocab_size"]
    assert (f"not a quantization of model 'tiny': its vocabulary has {n_other} tokens, the model's "
            f"{base['vocab_size']}") in other["error"]
    assert "refused before scoring" in other["error"]
    df = pd.read_csv(users_run / "results" / "report" / "summary.csv").set_index("variant")
    assert df.loc["other-model", "status"] == "failed"  # a row with its reason, the report still whole


def test_autoround_exports_a_gguf_of_the_type_scored_beside_llama_cpps_own(users_run):
    own = _metrics(users_run, "gguf", "Q4_0")
    calibration = json.loads((users_run / "results" / "tiny" / "data" / "calib_tokens.json").read_text())
    for variant, iters in [("Q4_0", 0), ("Q4_0-i8", 8)]:
        m = _metrics(users_run, "autoround-gguf", variant)
        assert m["status"] == "ok", m["error"]
        assert m["params"] == {"type": "Q4_0", "iters": iters} and m["bits"] == 4
        assert m["backend"] == "llama.cpp" and m["file_type"] == "Q4_0"
        assert m["calibration"]["tokens_sha256"] == calibration["tokens_sha256"]  # the shared calibration tokens
        assert m["tensor_types"] == own["tensor_types"]  # llama.cpp's mix for Q4_0: the output head in Q6_K
        assert m["protocol"]["n_scored_tokens"] == own["protocol"]["n_scored_tokens"]
        # a 4-bit quantization of the same weights: neither lossless nor far from llama.cpp's own Q4_0
        assert 0 < m["kl_mean"] < 3 * own["kl_mean"] and m["top1_agree"] > 0.5
    summary = (users_run / "results" / "report" / "summary.md").read_text()
    section = summary.split("### One GGUF type, several quantizers")[1].split("\n#")[0]
    rows = [line for line in section.splitlines() if line.startswith("| tiny ") and line.split(" | ")[1].strip() == "Q4_0"]
    assert len(rows) == 3
    assert {r.split(" | ")[2].strip() for r in rows} == {"llama.cpp", "AutoRound, untuned", "AutoRound, 8 tuning steps a block"}
    kl = [_metrics(users_run, *cell)["kl_mean"] for cell in
          [("gguf", "Q4_0"), ("autoround-gguf", "Q4_0"), ("autoround-gguf", "Q4_0-i8")]]
    order = [r.split(" | ")[3].strip() for r in rows]  # variants, least KL first
    assert order == [v for _, v in sorted(zip(kl, ["Q4_0", "Q4_0", "Q4_0-i8"]))]


def test_every_gguf_cell_has_a_modelfile_ollama_can_read(users_run, tiny_gguf):
    for method, variant in [("gguf", "Q8_0"), ("gguf", "Q4_0"), ("gguf-file", "published-Q8_0"),
                            ("autoround-gguf", "Q4_0")]:
        modelfile = users_run / paths.cell(paths.MODELFILE, "tiny", method, variant)
        parsed = ollama.parse(modelfile)
        gguf = (modelfile.parent / parsed["FROM"]).resolve()
        assert gguf == (users_run / paths.cell(paths.GGUF_FILE, "tiny", method, variant)).resolve()
        meta = ollama.gguf_metadata(str(gguf))
        assert parsed["parameters"]["num_ctx"] == [str(min(meta["context_length"], ollama.DEFAULT_MAX_CTX))]
        assert parsed["parameters"]["temperature"] == ["0.2"]
        assert all(stop in meta["tokens"] for stop in parsed["parameters"].get("stop", []))
        if meta["chat_template"]:  # converted here from the chat model: its ChatML turns in Ollama's syntax
            assert method in ("gguf", "autoround-gguf") and "<|im_start|>" in meta["chat_template"]
            assert parsed["TEMPLATE"] == ollama.chat_family(meta["chat_template"]).template
            assert "{{ .Content }}<|im_end|>" in parsed["TEMPLATE"] and "{{- range .Messages }}" in parsed["TEMPLATE"]
        else:  # the published file came from the model without one: prompts go in as they are
            assert method == "gguf-file" and parsed["TEMPLATE"] == "{{ .Prompt }}"
            assert parsed["parameters"]["stop"] == [meta["eos"]] == ["</s>"]


def test_speeds_are_measured_as_llama_bench_does(users_run):
    for method, variant in [("gguf", "Q8_0"), ("gguf", "Q4_0"), ("gguf-file", "published-Q8_0")]:
        m = _metrics(users_run, method, variant)
        assert m["pp_tokens_per_s"] > 0 and m["tg_tokens_per_s"] > 0 and m["pp_tokens_per_s_stdev"] >= 0
        assert m["speed_test"] | {"threads": None} == {
            "n_prompt": 512, "n_gen": 128, "repetitions": 5, "threads": None, "n_batch": 2048, "n_ubatch": 512,
            "follows": "llama-bench"}
        assert m["speed_test"]["threads"] == m["threads"]


def test_completions_are_greedy_and_the_same_when_run_again(users_run):
    from quantbench.backends.llamacpp import LlamaCppBackend

    for method, variant, chat in [("gguf", "Q4_0", True), ("gguf-file", "published-Q8_0", False)]:
        m = _metrics(users_run, method, variant)
        assert [s["prompt"] for s in m["samples"]] == PROMPTS
        assert all(s["chat"] is chat and 0 < s["new_tokens"] <= 12 and s["completion"] for s in m["samples"])
        backend = LlamaCppBackend(str(users_run / paths.cell(paths.GGUF_FILE, "tiny", method, variant)), 128,
                                  m["threads"])
        try:
            again = backend.complete(PROMPTS, 12)
        finally:
            backend.close()
        assert again == m["samples"]


def test_the_report_shows_speeds_samples_and_where_each_gguf_is(users_run):
    summary = (users_run / "results" / "report" / "summary.md").read_text()
    assert "pp512 tok/s" in summary and "tg128 tok/s" in summary
    assert "## Run it" in summary and "ollama create tiny-published-q8_0 -f results/tiny/gguf-file/" in summary
    assert "## Samples" in summary and f"### tiny: “{PROMPTS[0]}”" in summary
    assert "| gguf-file published-Q8_0 |" in summary


def test_a_hub_gguf_offline_names_the_local_alternative(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = {"repo": "someone/model-GGUF", "revision": "0" * 40, "filename": "model-Q4_K_M.gguf"}
    with pytest.raises(RuntimeError, match="Offline, name a local copy instead: path: /dir/file.gguf"):
        sources.gguf_file(spec, tmp_path)
