"""GPTQ, AWQ, RTN, AutoRound, bitsandbytes, EETQ, HQQ, torchao, quanto and QLoRA cells on the tiny model, for real."""
from __future__ import annotations

import json
import math
import re
import shutil

import pandas as pd
import pytest
import torch
import yaml
from conftest import snakemake, write_config

from quantbench.backends import Skipped
from quantbench.backends.transformers import TransformersBackend
from quantbench.methods import GPTQ

pytestmark = pytest.mark.integration

VARIANTS = {
    "gptq": [{"name": "w4g128", "bits": 4, "group_size": 128}],
    "awq": [{"name": "w4g128", "bits": 4, "group_size": 128}],
    "rtn": [{"name": "w4g128", "bits": 4, "group_size": 128}],
    "autoround": [{"name": "w4g128", "bits": 4, "group_size": 128, "iters": 10}],
    "bnb": [{"name": "int8", "mode": "int8"}, {"name": "nf4", "mode": "nf4", "double_quant": True}],
    "eetq": ["int8"],
    "hqq": ["w4g64"],
    "torchao": ["int8", {"name": "int4-g64", "weights": "int4", "group_size": 64}, "float8"],
    "quanto": ["int4"],
    "qlora": [{"name": "r8", "r": 8, "alpha": 16, "steps": 12, "lr": 1e-3}],
}
PROMPTS = ["def main(", "The module"]


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory, tiny, odd_gguf):
    work = tmp_path_factory.mktemp("methods")
    methods = {m: {"variants": v, "models": ["tiny"]} for m, v in VARIANTS.items()}
    methods["awq"]["models"] = ["tiny", "odd"]  # odd's 320-wide MLP makes AWQ g128 fail: a forced failure
    cfg = write_config(work, {
        "models": {"tiny": {"source": "path", "path": str(tiny["hf"])},
                   "odd": {"source": "gguf", "path": str(odd_gguf)}},
        "methods": methods,
        "calibration": {"source": "eval-holdout", "n_samples": 8, "seq_len": 128},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128},
        "report": {"prompts": PROMPTS, "max_new_tokens": 8, "speed_repetitions": 2},
    })
    run = snakemake(work, config=cfg)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    df = pd.read_csv(work / "results" / "report" / "summary.csv").set_index(["model", "method", "variant"])
    return work, df.loc["tiny"], df.loc["odd"]


def test_a_failing_cell_is_recorded_while_the_others_finish(methods_run):
    _, _, odd = methods_run
    assert odd.loc[("baseline", "fp16"), "status"] == "ok"
    assert odd.loc[("awq", "w4g128"), "status"] == "failed"
    assert "in_features (320) to be divisible by group_size (128)" in odd.loc[("awq", "w4g128"), "error"]


def test_every_method_ran_and_cuda_only_variants_were_skipped_on_cpu(methods_run):
    _, df, _ = methods_run
    assert len(df) == 1 + 4 + 2 + 1 + 1 + 3 + 1 + 1
    for cell in (("eetq", "int8"), ("torchao", "float8")):
        assert df.loc[cell, "status"] == "skipped" and "need CUDA" in df.loc[cell, "error"], cell
    ok = df[df["status"] == "ok"]
    assert len(ok) == 12
    assert ok["ppl"].map(math.isfinite).all()
    base = df.loc[("baseline", "fp16"), "ppl"]
    for cell, row in ok.iterrows():
        assert abs(row["ppl"] - base) / base < 0.2, cell  # 4/8-bit on a tiny model: close to the baseline


def test_packed_cells_score_alike_on_their_kernels_and_on_their_dequantized_float32_weights(methods_run, tmp_path):
    """On a CPU that computes no half type natively, a packed cell is scored on its exact dequantized weights in
    float32; elsewhere GPTQModel's kernels run in bfloat16. Whichever this machine took, the other is forced
    (QUANTBENCH_CPU_HALF) on a copy of the run, and both give the same numbers within bfloat16's rounding:
    bfloat16 keeps 8 significant bits, so each activation and logit of the kernel path is off by up to 2^-9 of
    itself, and the mean log-probability of thousands of tokens, an average of such errors, by far less than
    one such unit (|Δ ln ppl| ≤ 2^-9); KL from FP16 and top-1 agreement move by that noise alone."""
    work, df, _ = methods_run
    cells = [("gptq", "w4g128"), ("awq", "w4g128")]
    took_kernels = df.loc[cells[0], "compute_dtype"] != "float32"
    copy = tmp_path / "copy"
    shutil.copytree(work, copy, symlinks=True)
    targets = [f"results/tiny/{m}/{v}/metrics.json" for m, v in cells]
    run = snakemake(copy, "--forcerun", *targets, "--cores", "2", *targets, config=copy / "config.yaml",  # --cores ends the list
                    env={"QUANTBENCH_CPU_HALF": "none" if took_kernels else "bfloat16"})
    assert run.returncode == 0, run.stderr[-4000:]
    for cell, target in zip(cells, targets):
        ran, forced = df.loc[cell], json.loads((copy / target).read_text())
        kernel, exact = (ran, forced) if took_kernels else (forced, ran)
        assert kernel["compute_dtype"] == "bfloat16" and not kernel["kernel"].startswith("float32"), cell
        assert exact["compute_dtype"] == "float32" and exact["kernel"].startswith("float32 Linear (dequantized"), cell
        assert forced["cpu_half_decided_by"] == "QUANTBENCH_CPU_HALF"
        assert abs(math.log(kernel["ppl"] / exact["ppl"])) <= 2 ** -9, (cell, kernel["ppl"], exact["ppl"])
        assert abs(kernel["kl_mean"] - exact["kl_mean"]) <= 2 ** -9 + 0.02 * exact["kl_mean"], cell
        assert abs(kernel["top1_agree"] - exact["top1_agree"]) <= 0.01, cell


def test_dequantized_weights_are_the_checkpoints_own(methods_run):
    """The float32 weights of the dequantized path, rounded to float16, are GPTQModel's own float16
    dequantization bit for bit: scale x (q - zero) is exact in float32 and rounded once in float16."""
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    from quantbench import packed

    work, _, _ = methods_run
    for method in ("gptq", "awq"):
        checkpoint = str(work / "results" / "tiny" / method / "w4g128" / "model")
        own = GPTQModel.load(checkpoint, device="cpu", dtype=torch.float16,
                             backend=packed.backend(method, "torch", False)).model
        reference = {name: type(m).dequantize_weight(m) if method == "gptq" else _awq_weight(m)  # GPTQModel's, eager
                     for name, m in own.named_modules() if isinstance(m, BaseQuantLinear)}
        packed.dequantized(own)
        assert reference
        for name, weight in reference.items():
            mine = own.get_submodule(name).weight
            assert mine.dtype == torch.float32
            assert torch.equal(mine.t().half(), weight.half()), (method, name)


def _awq_weight(module):
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(module.qweight, module.qzeros, module.scales.half(), module.bits, module.group_size)


def test_load_time_cells_count_the_bits_their_weights_hold(methods_run, tiny):
    """Bits per weight of a cell quantized in memory: the bytes of its weights as loaded (packed data,
    scales, tensor subclasses by what they hold) over the parameters. On the tiny model the unquantized
    embeddings and head (2 x 1280 x 256 float32 weights) dominate, so compare the quantized layers alone."""
    _, df, _ = methods_run
    config = json.loads((tiny["hf"] / "config.json").read_text())
    h, ffn, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    linear = layers * (h * (h + kv * 2 + h) + 3 * h * ffn)
    fp32 = (2 * vocab * h + (2 * layers + 1) * h) * 4  # embeddings, head and norms stay float32 on the CPU
    for cell, low, high in [(("hqq", "w4g64"), 4.5, 5.5),  # 4 bits + a scale and a zero point a group of 64
                            (("quanto", "int4"), 4.2, 5.0), (("torchao", "int8"), 8.0, 8.6),
                            (("torchao", "int4-g64"), 8.2, 8.8),  # int4 values held in int8 bytes, and scales
                            (("bnb", "nf4"), 4.0, 4.6)]:
        held = df.loc[cell, "bits_per_weight"] * df.loc[cell, "n_params"] / 8 - fp32
        assert low < held * 8 / linear < high, (cell, held * 8 / linear)


def test_methods_the_usual_tables_do_not_name_are_compared_and_guided(methods_run):
    work, df, _ = methods_run
    summary = (work / "results" / "report" / "summary.md").read_text()
    families = summary.split("### Method families")[1].split("\n## ")[0]
    for method in ("hqq", "torchao", "quanto", "autoround"):
        line = next(line for line in families.splitlines() if re.match(rf"\|\s*tiny\s*\|\s*{method}\s*\|", line))
        cells = df.loc[method][df.loc[method]["status"] == "ok"]
        four = cells[cells["bits"] == 4]  # the family's representative: its 4-bit cell of least ΔPPL
        rep = (four if not four.empty else cells)["delta_ppl_pct"].min()
        assert "measured; the usual tables make no claim" in line and f"{rep:+.2f}" in line, line
    assert "qlora" not in families  # a fine-tuned model is no inference method
    guide = summary.split("## Selection guide")[1].split("\n## ")[0]
    quality = next(line for line in guide.splitlines() if "| Quality first" in line and "| tiny" in line)
    inference = df[(df["status"] == "ok") & (df.index.get_level_values("method") != "baseline")].drop("qlora", level=0)
    best = inference["kl_mean"].idxmin()
    assert f"tiny {best[0]} {best[1]}" in quality  # every inference method is a candidate


def test_a_qlora_cell_trains_its_adapters_and_is_scored_with_them(methods_run, tiny):
    work, df, _ = methods_run
    row = df.loc[("qlora", "r8")]
    config = json.loads((tiny["hf"] / "config.json").read_text())
    h, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    # r = 8 on every linear layer of each block (all-linear: q, k, v, o, gate, up, down; not the head)
    per_layer = 8 * ((h + h) * 2 + (h + kv) * 2 + (h + ffn) * 3)
    assert row["trainable_params"] == layers * per_layer
    losses = json.loads(row["train_losses"])
    # the first sample's loss before the first step and after the last; and its second pass (step 9) lower too
    assert len(losses) == 12 and row["train_loss_last"] < row["train_loss_first"], losses
    assert sum(losses[8:12]) < sum(losses[0:4]), losses  # 8 samples a pass: steps 9-12 see steps 1-4's again
    assert row["train_s_per_step"] > 0 and row["train_peak_rss_mb"] > 0
    assert math.isfinite(row["ppl"]) and row["kl_mean"] > 0 and row["bits"] == 4
    summary = (work / "results" / "report" / "summary.md").read_text()
    section = summary.split("## Fine-tuning (QLoRA)")[1].split("\n## ")[0]
    assert "| r8 " in section and f"{layers * per_layer:,}" in section and f"{row['train_loss_last']:.3f}" in section


def test_every_cell_that_ran_generates_and_has_its_speeds(methods_run):
    _, df, _ = methods_run
    ok = df[df["status"] == "ok"]
    assert (ok["pp_tokens_per_s"] > 0).all() and (ok["tg_tokens_per_s"] > 0).all(), ok[["pp_tokens_per_s", "error"]]
    for (method, _), row in ok.iterrows():
        test = json.loads(row["speed_test"])
        assert (test["n_prompt"], test["n_gen"], test["batch"], test["repetitions"]) == (512, 128, 1, 2)
        samples = json.loads(row["samples"])
        assert [s["prompt"] for s in samples] == PROMPTS
        assert all(s["chat"] is False and 0 < s["new_tokens"] <= 8 for s in samples), (method, samples)


def test_the_baseline_completes_as_a_plain_argmax_loop_does(methods_run, tiny):
    """transformers' generate, greedy, equals picking the most likely token again and again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, df, _ = methods_run
    samples = json.loads(df.loc[("baseline", "fp16"), "samples"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["hf"])
    model = AutoModelForCausalLM.from_pretrained(tiny["hf"], dtype=torch.float32).eval()
    for sample in samples:
        ids = tokenizer(sample["prompt"], return_tensors="pt").input_ids
        with torch.inference_mode():
            for _ in range(sample["new_tokens"]):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        prompt_len = tokenizer(sample["prompt"], return_tensors="pt").input_ids.shape[1]
        assert tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True) == sample["completion"]


# vLLM 0.33.0's loaders, vllm/model_executor/layers/quantization/auto_gptq.py (AutoGPTQConfig.from_config:
# get_from_keys bits, group_size, desc_act, sym) and auto_awq.py (AutoAWQConfig.from_config: w_bit|bits,
# q_group_size|group_size, zero_point): the keys a checkpoint's quantization_config must carry to be served.
VLLM_0_33_REQUIRES = {"gptq": [("bits",), ("group_size",), ("desc_act",), ("sym",)],
                      "awq": [("w_bit", "bits"), ("q_group_size", "group_size"), ("zero_point",)]}


def test_checkpoints_carry_what_vllm_reads_and_the_report_says_who_serves_them(methods_run):
    work, df, _ = methods_run
    for method in ("gptq", "awq", "rtn", "autoround"):
        qc = json.loads((work / "results" / "tiny" / method / "w4g128" / "model" / "config.json").read_text())[
            "quantization_config"]
        required = VLLM_0_33_REQUIRES["awq" if method == "awq" else "gptq"]
        assert all(any(name in qc for name in names) for names in required), (method, qc)
        row = df.loc[(method, "w4g128")]
        assert json.loads(row["quantization_config"]) == qc
        # GPTQ/RTN/AutoRound here are symmetric 4-bit (sym defaults to true): vLLM's gptq loader takes them
        assert row["vllm_quantization"] == ("awq" if method == "awq" else "gptq"), row["vllm_note"]
    summary = (work / "results" / "report" / "summary.md").read_text()
    assert "## Run it" in summary and "--quantization awq (or awq_marlin; vLLM 0.33.0" in summary


def test_checkpoints_are_real_and_reload_in_transformers(methods_run):
    from transformers import AutoModelForCausalLM

    work, df, _ = methods_run
    for method, fmt in [("gptq", "gptq"), ("awq", "gemm"), ("rtn", "gptq")]:
        ckpt = work / "results" / "tiny" / method / "w4g128" / "model"
        qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        assert (qc["bits"], qc["group_size"], qc["format"]) == (4, 128, fmt)
        if method == "awq":
            assert qc["quant_method"] == "awq" and qc["zero_point"] is True
        model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu")
        assert "Linear" in type(model.model.layers[0].mlp.down_proj).__name__
        row = df.loc[(method, "w4g128")]
        kernel = "AwqTorchLinear" if method == "awq" else "TorchLinear"  # kernel: auto, on a CPU
        assert row["kernel"] == (kernel if row["compute_dtype"] != "float32" else f"float32 Linear (dequantized {kernel})")
        assert 4 < row["bits_per_weight"] < 16  # packed 4-bit + scales; embeddings and head stay fp16
        assert row["size_bytes"] < df.loc[("baseline", "fp16"), "size_bytes"]
    ckpt = work / "results" / "tiny" / "autoround" / "w4g128" / "model"  # auto-round's export in GPTQ's format
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["provider"], qc["bits"], qc["group_size"], qc["iters"]) == (
        "gptq", "auto-round", 4, 128, 10)
    assert df.loc[("autoround", "w4g128"), "kernel"] in ("TorchLinear", "float32 Linear (dequantized TorchLinear)")
    # the same packing as RTN's checkpoint: packed 4-bit weights, a scale and a zero point per group
    assert abs(df.loc[("autoround", "w4g128"), "bits_per_weight"] - df.loc[("rtn", "w4g128"), "bits_per_weight"]) < 0.1


def test_calibration_is_recorded_and_never_scored(methods_run):
    work, _, _ = methods_run
    cells = {p.parent.parent.name: json.loads(p.read_text()) for p in (work / "results" / "tiny").glob("*/*/metrics.json")}
    assert {c["protocol"]["skip_tokens"] for c in cells.values()} == {8 * 128}
    info = json.loads((work / "results" / "tiny" / "gptq" / "w4g128" / "quantize.json").read_text())
    assert info["calibration"]["source"] == "eval-holdout" and info["calibration"]["n_tokens"] == 1024
    assert info["quantize_s"] > 0
    summary = (work / "results" / "report" / "summary.md").read_text()
    assert "`eval-holdout`, 8 × 128 tokens" in summary and "no cell scores them" in summary


def test_the_report_says_why_cells_did_not_run(methods_run):
    work, _, _ = methods_run
    summary = (work / "results" / "report" / "summary.md").read_text()
    assert "**tiny eetq int8** skipped:" in summary
    assert "**odd awq w4g128** failed:" in summary


def test_bnb_reports_its_in_memory_footprint(methods_run):
    _, df, _ = methods_run
    base = df.loc[("baseline", "fp16"), "weight_memory_mb"]
    assert df.loc[("bnb", "nf4"), "weight_memory_mb"] < df.loc[("bnb", "int8"), "weight_memory_mb"] < base
    assert df.loc[("bnb", "nf4"), "bits_per_weight"] < df.loc[("bnb", "int8"), "bits_per_weight"]
    assert math.isnan(df.loc[("bnb", "nf4"), "size_bytes"])  # nothing is written to disk


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_a_gpu_kernel_is_skipped_on_a_cpu(tmp_path):
    with pytest.raises(Skipped, match="triton kernel needs CUDA"):
        TransformersBackend.load(GPTQ, {}, str(tmp_path), threads=1, kernel="triton")


@pytest.fixture(scope="module")
def bnb_checkpoints(tiny, other_vocab, tmp_path_factory) -> dict:
    """Saved bitsandbytes nf4 checkpoints (as a Hub repo would publish them): the tiny model's, and another
    model's with another vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out = {}
    for name, hf in (("tiny-nf4", tiny["hf"]), ("other-nf4", other_vocab)):
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(hf, quantization_config=config, device_map="cpu",
                                                     dtype=torch.float32)
        out[name] = tmp_path_factory.mktemp("published") / name
        model.save_pretrained(out[name])
        AutoTokenizer.from_pretrained(hf).save_pretrained(out[name])
    return out


@pytest.fixture(scope="module")
def published_run(methods_run, bnb_checkpoints, tmp_path_factory):
    """The same matrix with published checkpoints added: a copy of its own GPTQ checkpoint elsewhere, and the
    saved bitsandbytes ones. Only the new cells run."""
    work, _, _ = methods_run
    copy = tmp_path_factory.mktemp("copied") / "tiny-gptq"
    shutil.copytree(work / "results" / "tiny" / "gptq" / "w4g128" / "model", copy,
                    ignore=shutil.ignore_patterns("*.seal.json"))
    config = yaml.safe_load((work / "config.yaml").read_text())
    config["models"]["tiny"]["checkpoints"] = {"copied-gptq": {"path": str(copy)}, **{
        name: {"path": str(path)} for name, path in bnb_checkpoints.items()}}
    run = snakemake(work, config=write_config(work, config))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "quantize_packed" not in run.stdout  # nothing quantized again
    df = pd.read_csv(work / "results" / "report" / "summary.csv").set_index(["model", "method", "variant"])
    return work, df.loc["tiny"]


def test_a_published_gptq_checkpoint_scores_as_its_own_cell(published_run):
    _, df = published_run
    copied, own = df.loc[("checkpoint", "copied-gptq")], df.loc[("gptq", "w4g128")]
    assert copied["status"] == "ok", copied["error"]
    assert copied["ppl"] == own["ppl"] and copied["kl_mean"] == own["kl_mean"]
    assert copied["bits_per_weight"] == own["bits_per_weight"] and copied["vllm_quantization"] == "gptq"
    assert json.loads(copied["quantization_config"]) == json.loads(own["quantization_config"])


def test_a_saved_bitsandbytes_checkpoint_scores_as_quantizing_at_load_does(published_run):
    _, df = published_run
    saved, at_load = df.loc[("checkpoint", "tiny-nf4")], df.loc[("bnb", "nf4")]
    assert saved["status"] == "ok", saved["error"]
    assert saved["ppl"] == pytest.approx(at_load["ppl"], rel=1e-6)
    assert json.loads(saved["quantization_config"])["quant_method"] == "bitsandbytes"
    assert pd.isna(saved["vllm_quantization"]) and "no GPTQ or AWQ" in saved["vllm_note"]


def test_a_checkpoint_of_another_model_is_refused_before_scoring(published_run, other_vocab):
    work, df = published_run
    other = df.loc[("checkpoint", "other-nf4")]
    n_other = json.loads((other_vocab / "config.json").read_text())["vocab_size"]
    n_tiny = json.loads((work / "resources" / "models" / "tiny" / "hf" / "config.json").read_text())["vocab_size"]
    assert other["status"] == "failed" and pd.isna(other["ppl"])
    assert f"its vocabulary has {n_other} tokens, the model's {n_tiny}; refused before scoring" in other["error"]
    summary = (work / "results" / "report" / "summary.md").read_text()
    assert "**Published: tiny checkpoint copied-gptq**, taken as it is from" in summary
