"""The CUDA paths through the real workflow on a GPU: GPTQ, AWQ, RTN and AutoRound quantized and evaluated
on the GPU, AutoRound's GGUF export written there; the FP16 baseline, bitsandbytes int8 / nf4 / fp4, EETQ,
HQQ, torchao (float8 included) and quanto evaluated there; a QLoRA cell trained there. Skipped where
torch sees no CUDA device (CI has none); on a GPU machine: pytest tests/test_cuda.py"""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import snakemake, write_config
from transformers.utils import is_kernels_available

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CHECKPOINTS = ["gptq", "awq", "rtn", "autoround"]
BNB = [{"name": "int8", "mode": "int8"},
       {"name": "nf4", "mode": "nf4", "double_quant": True, "compute_dtype": "float16"},
       {"name": "fp4", "mode": "fp4", "compute_dtype": "float16"}]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, tiny):
    work = tmp_path_factory.mktemp("cuda")
    cfg = write_config(work, {
        "models": {"tiny": {"source": "path", "path": str(tiny["hf"])}},
        "methods": {"bnb": {"variants": BNB}, "eetq": {"variants": ["int8"]}, "hqq": {"variants": ["w4g64"]},
                    "torchao": {"variants": ["int8", {"name": "int4-g64", "weights": "int4", "group_size": 64},
                                             "float8"]},
                    "quanto": {"variants": ["int4"]}, "autoround-gguf": {"variants": ["Q4_K_M"]},
                    "qlora": {"variants": [{"name": "r8", "r": 8, "steps": 12, "lr": 1e-3}]},
                    **{m: {"variants": [{"name": "w4g128", "bits": 4, "group_size": 128}], "kernel": "triton"}
                       for m in CHECKPOINTS}},  # triton: auto would JIT-compile Marlin, minutes the first time
        "calibration": {"source": "eval-holdout", "n_samples": 8, "seq_len": 128},
        "eval": {"text": {"text_file": str(tiny["text"])}, "protocol": "gptq", "context": 128},
    })
    run = snakemake(work, config=cfg)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    df = pd.read_csv(work / "results" / "report" / "summary.csv").set_index(["method", "variant"])
    print(df[["status", "ppl", "kl_mean", "top1_agree", "weight_memory_mb", "peak_vram_mb", "eval_tokens_per_s",
              "quantize_s", "quantize_peak_vram_mb", "quantize_device", "device", "kernel", "error"]].to_string())
    return df


def test_every_cell_but_eetq_runs_on_the_gpu(cuda_run):
    gpu = torch.cuda.get_device_name()
    cells = cuda_run.drop(index=("eetq", "int8"))
    assert (cells["status"] == "ok").all(), cells["error"].to_dict()
    exported = cells.loc[("autoround-gguf", "Q4_K_M")]  # AutoRound's GGUF export on the GPU; llama.cpp scores it
    assert exported["quantize_device"] == gpu and exported["file_type"] == "Q4_K_M"
    cells = cells.drop(index=("autoround-gguf", "Q4_K_M"))
    assert (cells["device"] == gpu).all()
    assert (cells.loc["torchao", "compute_dtype"] == "bfloat16").all()  # what its int8 and float8 kernels need
    assert (cells["peak_vram_mb"] > 0).all()
    assert cells.loc[("baseline", "fp16"), "compute_dtype"] == "float16"  # the tiny checkpoint is fp32
    base = cells.loc[("baseline", "fp16"), "ppl"]
    for cell, row in cells.drop(index=("baseline", "fp16")).iterrows():
        assert math.isfinite(row["ppl"]) and abs(row["ppl"] - base) / base < 0.2, cell
        assert row["kl_mean"] > 0, cell  # quantized weights change the distributions
    checkpoints = cells.loc[CHECKPOINTS]
    assert (checkpoints["quantize_peak_vram_mb"] > 0).all() and (checkpoints["quantize_device"] == gpu).all()
    assert checkpoints["kernel"].str.contains("Triton").all(), checkpoints["kernel"].to_dict()
    memory = cells["weight_memory_mb"]
    assert memory[("bnb", "nf4")] < memory[("bnb", "int8")] < memory[("baseline", "fp16")]
    for cell in [("hqq", "w4g64"), ("quanto", "int4"), ("torchao", "int8"), ("torchao", "float8")]:
        assert memory[cell] < memory[("baseline", "fp16")], cell
    qlora = cells.loc[("qlora", "r8")]
    assert qlora["train_peak_vram_mb"] > 0 and qlora["train_loss_last"] < qlora["train_loss_first"]
    assert memory[("bnb", "fp4")] == pytest.approx(memory[("bnb", "nf4")], rel=0.1)


def test_eetq_runs_or_names_what_it_lacks(cuda_run):
    eetq = cuda_run.loc[("eetq", "int8")]
    if not is_kernels_available():  # the same test as the EETQ path
        assert eetq["status"] == "failed"
        assert "`kernels` package" in eetq["error"]
    else:  # its kernel comes from the Hub, or from KERNELS_CACHE offline
        assert eetq["status"] == "ok", eetq["error"]
        assert eetq["device"] == torch.cuda.get_device_name() and math.isfinite(eetq["ppl"])


def test_scoring_on_the_gpu_equals_the_cpu_and_its_kl_is_exact(tiny, tmp_path):
    """The device path: perplexity in fp32 equals the CPU's; a bf16 cell's KL from the fp32 baseline's
    stored distributions, computed a chunk at a time on the GPU with float32 terms, equals the KL
    of both models' full distributions in double; `auto` takes the most windows it may try at once."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from quantbench import textdata
    from quantbench.backends.transformers import TransformersBackend
    from quantbench.distributions import Distributions, Recorder
    from quantbench.protocols import Protocol
    from quantbench.scoring import AUTO_FIRST_TOKENS, score

    described = textdata.describe_text({"text_file": str(tiny["text"])}, str(tmp_path))
    textdata.tokenize(described, tmp_path / "ids.npy", tmp_path / "meta.json", hf_dir=str(tiny["hf"]))
    ids = np.load(tmp_path / "ids.npy")
    protocol = Protocol("gptq", 128, 128)
    wins = protocol.windows(ids.size)

    def load(dtype, device):
        return TransformersBackend(AutoModelForCausalLM.from_pretrained(tiny["hf"], dtype=dtype).to(device))

    cpu, gpu, half = load(torch.float32, "cpu"), load(torch.float32, "cuda"), load(torch.bfloat16, "cuda")
    recorder = Recorder(gpu, sum(w.n_scored for w in wins))
    base = score(gpu, ids, wins, protocol, "auto", on_batch=recorder)
    assert base["batch_size"] == min(len(wins), AUTO_FIRST_TOKENS // protocol.context) > 8
    assert base["ppl"] == pytest.approx(score(cpu, ids, wins, protocol, 8)["ppl"], rel=1e-5)
    recorder.finish(str(tiny["hf"])).save(tmp_path / "d.npz")
    got = score(half, ids, wins, protocol, "auto", baseline=Distributions.load(tmp_path / "d.npz", str(tiny["hf"])))

    def exact_kl():
        """KL(fp32 || bf16) of both models' full distributions at every scored position, in double."""
        kl = []
        with torch.inference_mode():
            for w in wins:
                window = torch.from_numpy(ids[w.start:w.end].astype(np.int64))[None].cuda()
                p = torch.log_softmax(gpu.model(window).logits[0, :-1].double(), -1)
                q = torch.log_softmax(half.model(window).logits[0, :-1].double(), -1)
                kl.append((p.exp() * (p - q)).sum(-1))
        return torch.cat(kl)

    kl = exact_kl()
    assert kl.mean().item() > 1e-5  # bf16 moves the distributions: the comparison is not vacuous
    assert got["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-3)
    assert got["kl_max"] == pytest.approx(kl.max().item(), rel=1e-2)

    # eval.compile: compiled decoder layers and fused chunk scoring. In fp32 the eager numbers; in bf16 those of a
    # slightly other computation (fused kernels keep float32 intermediates where eager rounds to bf16), whose KL
    # is again exact against its own full distributions.
    fp32, bf16 = (TransformersBackend(b.model, compile=True) for b in (gpu, half))
    assert fp32.info()["compiled_layers"] == bf16.info()["compiled_layers"] == gpu.model.config.num_hidden_layers
    base_c = score(fp32, ids, wins, protocol, "auto", compile=True)
    got_c = score(bf16, ids, wins, protocol, "auto", baseline=Distributions.load(tmp_path / "d.npz", str(tiny["hf"])),
                  compile=True)
    with bf16.scoring_layers():  # half.model's layers compiled: the KL of the model the compiled cell ran
        kl_c = exact_kl()
    print(f"compiled vs eager: fp32 ppl {base_c['ppl'] / base['ppl'] - 1:.3g}, bf16 ppl {got_c['ppl'] / got['ppl'] - 1:.3g}, "
          f"bf16 KL {got_c['kl_mean']:.4g} (exact {kl_c.mean().item():.4g}) against eager {got['kl_mean']:.4g}")
    assert base_c["ppl"] == pytest.approx(base["ppl"], rel=1e-5)
    assert got_c["ppl"] == pytest.approx(got["ppl"], rel=1e-3)
    assert got_c["kl_mean"] == pytest.approx(kl_c.mean().item(), rel=1e-3)


def test_the_baseline_recorder_keeps_every_batch_in_order():
    """Batches of varying rows go to the host through two alternating page-locked staging buffers, which grow
    when a batch outgrows them, while the GPU goes on: every row lands where it belongs."""
    from types import SimpleNamespace

    import numpy as np

    from quantbench.backends import Head
    from quantbench.distributions import Recorder

    head = Head(torch.randn(50, 8, device="cuda", dtype=torch.bfloat16))
    sizes = [3, 5, 5, 5, 7, 2, 7, 1]
    recorder = Recorder(SimpleNamespace(model=None, head=head), sum(sizes))
    batches = []
    for i, n in enumerate(sizes):
        hidden = torch.randn(n, 8, device="cuda", dtype=torch.bfloat16)
        batches.append(hidden.cpu())
        torch.cuda._sleep(1_000_000)  # the GPU busy before the batch's copy can start, as the next forward keeps it
        recorder(np.full(n, i), np.zeros(n), SimpleNamespace(hidden=hidden))
        del hidden  # freed here, still being copied: record_stream keeps it
    for copy in recorder.copies:
        copy.result()
    assert torch.equal(recorder.hidden, torch.cat(batches))
