"""Evaluation text: WikiText rows, the offline cache, and the windows every backend scores."""
from __future__ import annotations

import hashlib
import json

import pytest
from conftest import REPO

from quantbench import io, textdata
from quantbench.protocols import Protocol

SHARED_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-v1"

RAW = " \n = Robert Boulter = \n \n Robert Boulter is an English actor . \n \n"


def test_rows_from_raw_match_the_datasets_rows():
    assert textdata.rows_from_raw(RAW) == ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n", ""]


def test_import_from_raw_fills_the_cache_and_joins_rows_like_gptq(tmp_path):
    src = tmp_path / "copy"
    src.mkdir()
    (src / "wiki.test.raw").write_text(RAW)
    cached = textdata.import_wikitext(str(src), str(tmp_path / "resources"))
    assert cached == textdata.cache_file(str(tmp_path / "resources"))
    described = textdata.describe_text({"dataset": "wikitext-2-raw-v1"}, str(tmp_path / "resources"))
    assert textdata.load_text(described) == "\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English actor . \n\n\n"
    textdata.preflight({"dataset": "wikitext-2-raw-v1"}, str(tmp_path / "resources"))  # cached: no network


def test_import_refuses_a_rows_file_that_is_not_the_test_split(tmp_path):
    (tmp_path / "test_rows.json").write_text(json.dumps(["not wikitext"]))
    with pytest.raises(ValueError, match="not the datasets test split"):
        textdata.import_wikitext(str(tmp_path), str(tmp_path / "resources"))


def test_no_cache_and_no_network_says_how_to_provide_the_text(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(textdata.TextUnavailable) as err:
        textdata.preflight({"dataset": "wikitext-2-raw-v1"}, str(tmp_path))
    assert "quantbench import-wikitext DIR" in str(err.value)
    assert "eval.text.text_file" in str(err.value)


@pytest.mark.parametrize("protocol, n_windows, n_scored", [("gptq", 4, 99), ("llamacpp", 4, 49)])
def test_windows_tile_the_stream(protocol, n_windows, n_scored):
    wins = Protocol(protocol, 100, 100).windows(450)
    assert len(wins) == n_windows
    assert [(w.start, w.end) for w in wins] == [(0, 100), (100, 200), (200, 300), (300, 400)]
    assert {w.n_scored for w in wins} == {n_scored}
    assert len(Protocol(protocol, 100, 100, max_windows=2).windows(450)) == 2
    assert Protocol(protocol, 100, 100, skip=120).windows(450)[0].start == 120  # calibration tokens: never scored


def test_too_short_a_text_is_an_error():
    with pytest.raises(ValueError, match="fewer than one gptq window"):
        Protocol("gptq", 100, 100).windows(50)
    with pytest.raises(ValueError, match="needs at least 200 tokens"):  # as llama-perplexity refuses it
        Protocol("llamacpp", 100, 100).windows(199)


def test_llamacpp_reads_wikitext_as_the_raw_file(tmp_path):
    src = tmp_path / "copy"
    src.mkdir()
    (src / "wiki.test.raw").write_text(RAW)
    textdata.import_wikitext(str(src), str(tmp_path / "resources"))
    described = textdata.describe_text({"dataset": "wikitext-2-raw-v1"}, str(tmp_path / "resources"), "llamacpp")
    assert textdata.load_text(described) == RAW.removesuffix("\n")  # llama-perplexity drops one trailing newline


@pytest.mark.skipif(not SHARED_WIKITEXT.is_dir(), reason="needs the WikiText-2 copy beside the repository")
def test_the_raw_form_of_the_real_test_split_is_wiki_test_raw_byte_for_byte(tmp_path):
    textdata.import_wikitext(str(SHARED_WIKITEXT), str(tmp_path))
    described = textdata.describe_text({"dataset": "wikitext-2-raw-v1"}, str(tmp_path), "llamacpp")
    raw = (textdata.load_text(described) + "\n").encode("utf-8")
    assert hashlib.sha256(raw).hexdigest() == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    joined = textdata.load_text(textdata.describe_text({"dataset": "wikitext-2-raw-v1"}, str(tmp_path)))
    assert len(joined) == 1_294_336  # the GPTQ/AWQ form: rows joined by blank lines


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    final = tmp_path / "metrics.json"
    with pytest.raises(RuntimeError):
        with io.atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    io.write_json(final, {"ok": 1})
    io.write_json(final, {"ok": 2})
    assert io.read_json(final) == {"ok": 2} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
