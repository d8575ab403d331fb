"""Session fixtures: a tiny real model, llama.cpp's converter, and a way to run the workflow."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "workflow"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "bench"))

import tinymodel  # noqa: E402

from quantbench import llamacpp  # noqa: E402

HELD_OUT_MODULES = ["email", "http", "html", "urllib", "zipfile", "tarfile", "shutil", "tempfile",
                    "os", "io", "enum", "typing", "dataclasses", "contextlib", "inspect", "ast"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """A trained tiny Llama (HF dir), a held-out evaluation text, and the same model as a Q8_0 GGUF."""
    root = tmp_path_factory.mktemp("tiny")
    model = tinymodel.build(root / "model")
    text = root / "eval.txt"
    text.write_text(tinymodel.corpus(HELD_OUT_MODULES))  # text the model never saw in training
    return {"hf": model, "text": text, "root": root}


@pytest.fixture(scope="session")
def converter(tmp_path_factory) -> Path:
    """llama.cpp's converter, fetched once per session from the pinned sdist."""
    tools = tmp_path_factory.mktemp("tools") / f"llama.cpp-{llamacpp.LLAMA_CPP_PYTHON_PIN}"
    return llamacpp.fetch_converter(tools).parent


@pytest.fixture(scope="session")
def tiny_gguf(tiny, converter) -> Path:
    out = tiny["root"] / "tiny.Q8_0.gguf"
    subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(tiny["hf"]),
                    "--outtype", "q8_0", "--outfile", str(out)], check=True, capture_output=True)
    return out


def write_config(workdir: Path, config: dict) -> Path:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, config: Path | None = None, env: dict | None = None,
              timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run the real workflow in `workdir` (results/ and resources/ land there)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--cores", "2", "--resources", "gpu=1", *args]
    if config is not None:
        cmd += ["--configfile", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def share_tools(workdir: Path, converter: Path, programs: bool = False) -> None:
    """Reuse the session's converter instead of fetching it again for every workflow run, and with
    `programs` the one build of llama.cpp's programs instead of building them again."""
    tools = workdir / "resources" / "tools"
    tools.mkdir(parents=True, exist_ok=True)
    if not (tools / converter.name).exists():
        shutil.copytree(converter, tools / converter.name)
    if programs:
        import upstream

        upstream.tool("llama-imatrix")
        (tools / upstream.TOOLS.name).symlink_to(upstream.TOOLS)


@pytest.fixture(scope="session")
def odd_gguf(tiny, converter) -> Path:
    """A one-layer model whose MLP is 320 wide: AWQ with group 128 cannot quantize it (a real failure),
    shipped as a GGUF so that no config check can see its shape before the job runs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = tiny["root"] / "odd"
    tokenizer = AutoTokenizer.from_pretrained(tiny["hf"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=320, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    out = tiny["root"] / "odd.Q8_0.gguf"
    subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(hf),
                    "--outtype", "q8_0", "--outfile", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def other_vocab(tiny) -> Path:
    """Another model (HF dir): a tokenizer of 512 merges plus the byte pieces, not the tiny model's
    vocabulary, and random one-layer weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = tiny["root"] / "other-vocab"
    tokenizer = tinymodel.build_tokenizer(tinymodel.corpus(), hf, vocab_size=512)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(hf)
    return hf
