"""A tiny real Llama model, made in the test session from text Python itself ships.

hidden_size 256 so llama.cpp's k-quants apply (rows divisible by 256), 2 layers, a
1024-token byte-fallback BPE tokenizer in Llama's style (converts to GGUF without
a pre-tokenizer hash), and a few hundred training steps so that its predictions,
and the damage quantization does to them, are not those of random weights.
"""
from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

MODULES = ["argparse", "collections", "csv", "functools", "itertools", "json", "pathlib", "re",
           "string", "textwrap", "unittest", "logging", "subprocess", "datetime", "decimal", "fractions"]


def corpus(modules: list[str] = MODULES) -> str:
    """Docstrings of standard-library modules: English prose with code, the same on every machine.
    Read in a fresh interpreter: a module's attributes include the submodules this process happens
    to have imported (importing gptqmodel adds email.feedparser), which would change the text."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tinymodel; "
            "sys.stdout.buffer.write(tinymodel._docstrings(sys.argv[2:]).encode())")
    here = str(Path(__file__).resolve().parent)
    return subprocess.run([sys.executable, "-I", "-c", code, here, *modules], capture_output=True, check=True).stdout.decode()


def _docstrings(modules: list[str]) -> str:
    docs = []
    for name in modules:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            if not attr.startswith("_"):
                doc = inspect.getdoc(getattr(module, attr))
                if doc and doc not in docs:
                    docs.append(doc)
    return "\n\n".join(docs)


def build_tokenizer(text: str, out: Path, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=[], show_progress=False)
    tok.train_from_iterator([text], trainer)
    # Byte-fallback pieces must be ordinary vocabulary entries, as in Llama's tokenizer.
    vocab = tok.get_vocab()
    missing = [b for b in byte_tokens if b not in vocab]
    model = tok.model
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(tok)]
    new_vocab = {t: i for t, i in sorted(vocab.items(), key=lambda kv: kv[1])}
    for b in missing:
        new_vocab[b] = len(new_vocab)
    tok.model = models.BPE(vocab=new_vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    del model
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


def _merges(tok):
    import json

    return json.loads(tok.to_str())["model"]["merges"]


def build(out: Path, steps: int = 200, seed: int = 0) -> Path:
    """Write a trained tiny LlamaForCausalLM + tokenizer to `out`; returns `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    text = corpus()
    tokenizer = build_tokenizer(text, out)
    ids = torch.tensor(tokenizer(text).input_ids)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, batch = 128, 8
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.to(torch.float16).save_pretrained(out)
    (out / "corpus.txt").write_text(text)
    return out


if __name__ == "__main__":
    build(Path(sys.argv[1]))
