"""Configs a user could write by mistake (tests/bad_configs/*.yaml), each refused by the real workflow
before any job, with the key that is wrong and why. Each file says what it expects in its first two
lines (`# refused: KEY`, `# says: TEXT`); `$FIXTURES` stands for model directories and files made here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, snakemake

CASES = sorted((REPO / "tests" / "bad_configs").glob("*.yaml"))
CONFIGS = {  # config.json of local models, each named as its architecture names things
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
              "max_position_embeddings": 512},
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 96, "n_inner": None,
             "n_positions": 1024},
    "opt": {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": 768, "ffn_dim": 3000,
            "max_position_embeddings": 2048},
    "remote": {"architectures": ["MyForCausalLM"], "hidden_size": 64, "auto_map": {"AutoModelForCausalLM": "my.MyLM"}},
    "bert": {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 64, "max_position_embeddings": 512},
    "olmo": {"architectures": ["OlmoForCausalLM"], "model_type": "olmo", "hidden_size": 64, "intermediate_size": 128,
             "max_position_embeddings": 512},
    "badpad": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
               "max_position_embeddings": 512, "vocab_size": 1000, "pad_token_id": 1000},
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fixtures")
    for name, config in CONFIGS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "text.txt").write_text("Some text to score.\n" * 50)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / "empty.txt").write_text("\n")
    (root / "short.txt").write_text("A short text.\n\n\n")
    (root / "fake.gguf").write_bytes(b"PK\x03\x04 not a GGUF file")
    (root / "real.gguf").write_bytes(b"GGUF" + bytes(60))
    (root / "bad-refs.csv").write_text("model,method,value\nx,gguf,1\n")
    return root


def test_the_suite_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_refused_before_any_job_naming_the_key(case, fixtures, tmp_path):
    head = case.read_text().splitlines()[:2]
    key, says = (line.split(": ", 1)[1] for line in head)
    config = tmp_path / case.name
    config.write_text(case.read_text().replace("$FIXTURES", str(fixtures)))
    run = snakemake(tmp_path, config=config)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-2000:]
    assert f"config key '{key}'" in out, out[-2000:]
    assert says in out, out[-2000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()  # no job ran
