"""Calibration tokens for GPTQ and AWQ: one spec, the same tokens in every cell.

- eval-holdout: the first n_samples x seq_len tokens of the evaluation stream, which
  evaluation then never scores (the offline default);
- text_file / wikitext2-train / c4: random seq_len windows drawn with `seed`, as the
  GPTQ repository's data loaders draw them.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np

from . import io

HOLDOUT = "eval-holdout"


def holdout_tokens(spec: dict | None) -> int:
    """Leading evaluation tokens reserved for calibration (never scored)."""
    if not spec or spec["source"] != HOLDOUT:
        return 0
    return spec["n_samples"] * spec["seq_len"]


def build(spec: dict, hf_dir: str, eval_ids: str, out_ids: str, out_meta: str) -> None:
    n, length = spec["n_samples"], spec["seq_len"]
    if spec["source"] == HOLDOUT:
        stream = np.load(eval_ids)
        if stream.size < n * length:
            raise ValueError(f"calibration: eval-holdout needs {n * length} tokens, the stream has {stream.size}")
        samples = stream[: n * length].reshape(n, length)
        origin = {"tokens": f"eval stream [0, {n * length})"}
    else:
        stream = _tokenize(_text(spec), hf_dir)
        if stream.size <= length:
            raise ValueError(f"calibration: the {spec['source']} text has {stream.size} tokens, need > {length}")
        rng = random.Random(spec["seed"])
        starts = [rng.randint(0, stream.size - length - 1) for _ in range(n)]
        samples = np.stack([stream[s:s + length] for s in starts])
        origin = {"starts": starts}
    samples = samples.astype(np.int32)
    with io.atomic_path(out_ids) as tmp, open(tmp, "wb") as f:
        np.save(f, samples)
    io.write_json(out_meta, {**spec, **origin, "n_tokens": int(samples.size),
                             "tokens_sha256": hashlib.sha256(samples.tobytes()).hexdigest()})


def _text(spec: dict) -> str:
    if spec["source"] == "text_file":
        return Path(spec["text_file"]).expanduser().read_text(encoding="utf-8")
    from datasets import load_dataset  # needs the Hub: the papers' calibration sets

    if spec["source"] == "wikitext2-train":
        return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"])
    data = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    return "\n\n".join(data.select(range(min(len(data), 20000)))["text"])


def _tokenize(text: str, hf_dir: str) -> np.ndarray:
    from . import sources

    return np.asarray(sources.tokenizer(hf_dir)(text).input_ids, dtype=np.int32)
