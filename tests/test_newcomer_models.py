"""A newcomer's own model, of an architecture other than Llama, meets llama.cpp's converter before any job:
what the converter would fail on (a config key transformers 5 no longer writes, a tokenizer file its
vocabulary type needs, a pre-tokenizer it does not know) is refused naming the key or file, for real,
with the pinned converter on tiny random models built here. (What needs only config.json is in
tests/bad_configs/.)"""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import share_tools, snakemake, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny) -> dict:
    """Tiny random GPT-2 and ERNIE 4.5 models with the tiny model's tokenizer (a tokenizer.json, no
    tokenizer.model), saved as transformers 5 saves them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("zoo")
    shapes = {"gpt2": {"n_embd": 64, "n_layer": 1, "n_head": 2, "n_positions": 256},
              "ernie4_5": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}}
    out = {}
    for model_type, shape in shapes.items():
        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, vocab_size=1280, bos_token_id=1, eos_token_id=2, **shape)
        out[model_type] = root / model_type
        AutoModelForCausalLM.from_config(config).save_pretrained(out[model_type])
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny["hf"] / name, out[model_type] / name)
    return out


def refused(tmp_path, converter, model_dir, tiny) -> str:
    """The dry run's output for a matrix of the model's GGUF cells; it must refuse before any job."""
    share_tools(tmp_path, converter)
    cfg = write_config(tmp_path, {"models": {"m": {"source": "path", "path": str(model_dir)}},
                                  "methods": {"gguf": {"variants": ["Q8_0"]}},
                                  "eval": {"text": {"text_file": str(tiny["text"])}, "context": 128}})
    run = snakemake(tmp_path, "-n", config=cfg)
    assert run.returncode != 0, run.stdout[-2000:]
    assert not (tmp_path / "results").exists()
    out = run.stdout + run.stderr
    assert "config key 'methods.gguf.models'" in out and "cannot convert model 'm'" in out, out[-3000:]
    return out


def test_a_config_key_the_converter_reads_then_an_unknown_pre_tokenizer(zoo, converter, tiny, tmp_path):
    config = json.loads((zoo["gpt2"] / "config.json").read_text())
    assert "n_ctx" not in config  # transformers 5 writes n_positions alone
    out = refused(tmp_path / "a", converter, zoo["gpt2"], tiny)
    assert "config.json lacks 'n_ctx'" in out, out[-2000:]
    (zoo["gpt2"] / "config.json").write_text(json.dumps(config | {"n_ctx": 256}))  # as the message says
    out = refused(tmp_path / "b", converter, zoo["gpt2"], tiny)
    assert "its BPE pre-tokenizer is not one the pinned converter knows (chkhsh " in out


def test_a_tokenizer_file_the_vocabulary_type_needs(zoo, converter, tiny, tmp_path):
    out = refused(tmp_path, converter, zoo["ernie4_5"], tiny)
    assert "tokenizer.model: a file its vocabulary type needs is not in the model directory" in out


def test_a_model_that_converts_passes_and_is_remembered(converter, tiny, tmp_path):
    from quantbench import paths

    share_tools(tmp_path, converter)
    cfg = write_config(tmp_path, {"models": {"m": {"source": "path", "path": str(tiny["hf"])}},
                                  "methods": {"gguf": {"variants": ["Q8_0"]}},
                                  "eval": {"text": {"text_file": str(tiny["text"])}, "context": 128}})
    run = snakemake(tmp_path, "-n", config=cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list((tmp_path / paths.CONVERTER_CHECKED).glob("*.json"))) == 1
