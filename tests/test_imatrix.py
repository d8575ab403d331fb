"""Importance matrices, as llama.cpp's users quantize: llama-imatrix computed once per model from the
calibration tokens (never scored ones), a k-quant and an i-quant quantized with it by llama-quantize of
the same source, evaluated beside the plain k-quant; the report marks them."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from conftest import share_tools, snakemake, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def imatrix_run(tmp_path_factory, tiny, converter):
    work = tmp_path_factory.mktemp("imatrix")
    share_tools(work, converter, programs=True)
    cfg = write_config(work, {
        "models": {"tiny": {"source": "path", "path": str(tiny["hf"])}},
        "methods": {"gguf": {"variants": ["Q4_K_M", "Q4_K_M-imatrix", {"name": "iq4", "type": "IQ4_XS", "imatrix": True}]}},
        "calibration": {"source": "eval-holdout", "n_samples": 4, "seq_len": 128},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128},
    })
    run = snakemake(work, config=cfg)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return work


def test_the_matrix_comes_from_the_calibration_tokens(imatrix_run):
    from gguf import GGUFReader

    gguf_dir = imatrix_run / "results" / "tiny" / "gguf"
    info = json.loads((gguf_dir / "imatrix.json").read_text())
    calib = json.loads((imatrix_run / "results" / "tiny" / "data" / "calib_tokens.json").read_text())
    assert info["calibration"]["source"] == "eval-holdout" and info["n_ctx"] == 128
    assert info["calibration_tokens_sha256"] == calib["tokens_sha256"]
    assert 3 <= info["chunks"] <= 4  # the 4 samples, decoded to text and read back by llama.cpp's tokenizer
    fields = GGUFReader(gguf_dir / "imatrix.gguf").fields
    assert int(fields["imatrix.chunk_count"].parts[-1][0]) == info["chunks"]
    # no scored token calibrated anything: every cell skips the held-out tokens
    for metrics in (imatrix_run / "results" / "tiny").glob("*/*/metrics.json"):
        assert json.loads(metrics.read_text())["protocol"]["skip_tokens"] == calib["n_tokens"]


def test_imatrix_cells_are_quantized_with_it_and_evaluated(imatrix_run):
    from gguf import GGUFReader

    cells = imatrix_run / "results" / "tiny" / "gguf"
    plain, weighted, iq4 = (cells / v / "model.gguf" for v in ("Q4_K_M", "Q4_K_M-imatrix", "iq4"))
    assert "quantize.imatrix.file" in GGUFReader(weighted).fields
    assert "quantize.imatrix.file" not in GGUFReader(plain).fields
    assert plain.read_bytes() != weighted.read_bytes()  # same type, other rounding
    assert "IQ4_XS" in {t.tensor_type.name for t in GGUFReader(iq4).tensors}
    df = pd.read_csv(imatrix_run / "results" / "report" / "summary.csv").set_index("variant")
    assert (df["status"] == "ok").all(), df["error"].to_dict()
    base = df.loc["fp16", "ppl"]
    for variant in ("Q4_K_M", "Q4_K_M-imatrix", "iq4"):
        assert abs(df.loc[variant, "ppl"] - base) / base < 0.2 and df.loc[variant, "kl_mean"] > 0, variant
    assert df.loc["iq4", "bits_per_weight"] < df.loc["Q4_K_M", "bits_per_weight"]
    assert json.loads(df.loc["iq4", "imatrix"])["chunks"] >= 3
    summary = (imatrix_run / "results" / "report" / "summary.md").read_text()
    assert re.search(r"\| iq4 \(imatrix\) +\|", summary), summary  # a name that does not say it is marked
    assert "**Importance matrix** (tiny: Q4_K_M-imatrix, iq4)" in summary
