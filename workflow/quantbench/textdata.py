"""The evaluation text and its one token stream per model.

WikiText-2 (raw, test split) comes through `datasets` and is cached under
resources/; once the cache holds it, no network is touched. `text_file` reads a
local file as is.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import io, paths

WIKITEXT = "wikitext-2-raw-v1"
WIKITEXT_ROWS_SHA256 = "5c8877eeabb3b8afc09f8ec35194fdac8c55acaa25de738d27000876d7c73e4c"


class TextUnavailable(RuntimeError):
    pass


def cache_file(resources: str, dataset: str = WIKITEXT) -> Path:
    return Path(paths.text_cache(dataset, resources))


def describe_text(spec: dict, resources: str, protocol: str = "gptq") -> dict:
    """Where the evaluation text lives (the dataset's cache file, or the user's file) and the form
    its protocol reads it in: llama-perplexity reads a file as is but for one trailing newline
    (wiki.test.raw for the dataset); the GPTQ/AWQ code and the Hugging Face recipe join the
    dataset's test rows by blank lines."""
    llamacpp = protocol == "llamacpp"
    if "text_file" in spec:
        return {"kind": "text_file", "form": "llama-perplexity -f" if llamacpp else "as is",
                "path": str(Path(spec["text_file"]).expanduser().resolve())}
    return {"kind": "dataset", "dataset": spec["dataset"], "split": "test",
            "form": "llama-perplexity -f wiki.test.raw" if llamacpp else "rows joined by blank lines",
            "path": str(cache_file(resources, spec["dataset"]))}


def preflight(spec: dict, resources: str, timeout: float = 5.0) -> None:
    """Fail at once, before any job, when the text is neither cached nor downloadable."""
    described = describe_text(spec, resources)
    if Path(described["path"]).is_file():
        return
    if described["kind"] == "text_file":
        raise TextUnavailable(f"eval.text.text_file: {described['path']} does not exist")
    from .sources import hub_unreachable

    reason = hub_unreachable(timeout)
    if reason:
        raise TextUnavailable(_missing_message(Path(described["path"]), reason))


def _missing_message(cached: Path, reason: str) -> str:
    return (
        f"WikiText-2 is not in the cache ({cached}) and cannot be downloaded ({reason}). "
        f"Offline, fill the cache from a local copy: `python -m quantbench import-wikitext DIR` where DIR "
        f"holds test_rows.json (the test split's rows as a JSON list) or wiki.test.raw; "
        f"or set eval.text.text_file to any text file."
    )


def fetch_wikitext(cached: str | Path) -> None:
    cached = Path(cached)
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", WIKITEXT, split="test")["text"]
    except Exception as exc:
        raise TextUnavailable(_missing_message(cached, f"{type(exc).__name__}: {exc}")) from exc
    write_rows(cached, list(rows))


def write_rows(cached: Path, rows: list[str]) -> None:
    with io.atomic_path(cached) as tmp:
        tmp.write_text(json.dumps(rows, ensure_ascii=False))


def import_wikitext(src_dir: str, resources: str) -> Path:
    """Fill the cache from a local copy of the test split: test_rows.json, or wiki.test.raw."""
    src = Path(src_dir)
    cached = cache_file(resources)
    if (src / "test_rows.json").is_file():
        digest = io.sha256_file(src / "test_rows.json")
        if digest != WIKITEXT_ROWS_SHA256:
            raise ValueError(f"{src / 'test_rows.json'} has sha256 {digest}, not the datasets test split's")
        rows = json.loads((src / "test_rows.json").read_text())
    elif (src / "wiki.test.raw").is_file():
        rows = rows_from_raw((src / "wiki.test.raw").read_text(encoding="utf-8"))
    else:
        raise FileNotFoundError(f"{src} holds neither test_rows.json nor wiki.test.raw")
    write_rows(cached, rows)
    return cached


def rows_from_raw(raw: str) -> list[str]:
    """The datasets rows of a wikitext *.raw file: a line keeps its newline; a blank line (" ") is ''."""
    return [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]


def load_text(described: dict) -> str:
    """The text in the form its protocol reads it (see describe_text); newlines never translated."""
    if described["kind"] == "text_file":
        with open(described["path"], encoding="utf-8", newline="") as f:
            text = f.read()
    else:
        rows = json.loads(Path(described["path"]).read_text())
        if not described["form"].endswith("wiki.test.raw"):
            return "\n\n".join(rows)
        text = "".join(row or " \n" for row in rows)  # inverse of rows_from_raw: wiki.test.raw, byte for byte
    if described["form"].startswith("llama-perplexity"):
        text = text.removesuffix("\n")  # as llama.cpp's -f does (common/arg.cpp)
    return text


def tokenize(described: dict, out_ids: str, out_meta: str, hf_dir: str | None = None, gguf_file: str | None = None) -> None:
    """Tokenize the text once per model, with its HF tokenizer or (gguf_file) llama.cpp's tokenizer
    from the GGUF vocabulary, as llama-perplexity does; every backend scores these ids."""
    text = load_text(described)
    if gguf_file:
        from . import llamacpp

        ids, tokenizer = llamacpp.tokenize(gguf_file, text)
    else:
        ids, tokenizer = _hf_tokenize(hf_dir, text)
    ids = np.asarray(ids, dtype=np.int32)
    with io.atomic_path(out_ids) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, ids)
    io.write_json(out_meta, {
        "text": {k: v for k, v in described.items() if k != "path"} | {"file": Path(described["path"]).name},
        "text_sha256": io.sha256_text(text),
        "text_chars": len(text),
        "n_tokens": int(ids.size),
        "tokenizer": tokenizer | {"first_id": int(ids[0])},
    })


def _hf_tokenize(hf_dir: str, text: str) -> tuple[list[int], dict]:
    from . import sources

    tokenizer = sources.tokenizer(hf_dir)
    bos = tokenizer.bos_token_id
    return tokenizer(text).input_ids, {
        "kind": "hf",
        "class": type(tokenizer).__name__,
        "source": Path(hf_dir).name,
        "vocab_size": len(tokenizer),
        "add_bos": bos is not None and tokenizer("x").input_ids[:1] == [bos],
        "bos_token_id": bos,
    }
