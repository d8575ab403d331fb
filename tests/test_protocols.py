"""Each protocol gives exactly the numbers of the code it claims to follow, on the tiny model:
the Hugging Face loop and the GPTQ repository's eval loop transcribed here as oracles, and
llama.cpp's own llama-perplexity built from the pinned sources."""
from __future__ import annotations

import json
import math
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import share_tools, snakemake, write_config

from quantbench import textdata
from quantbench.backends.transformers import TransformersBackend
from quantbench.distributions import Distributions, Recorder
from quantbench.methods import BASELINE, BNB
from quantbench.protocols import Protocol, Window
from quantbench.scoring import score

pytestmark = pytest.mark.integration


def test_each_token_is_scored_once_by_sliding_and_gptq():
    n = 1000
    for proto in [Protocol("sliding", 256, 96), Protocol("gptq", 128, 128)]:
        targets = [w.end - k for w in proto.windows(n) for k in range(1, w.n_scored + 1)]
        assert len(targets) == len(set(targets)), proto.name
    sliding = {w.end - k for w in Protocol("sliding", 256, 96).windows(n) for k in range(1, w.n_scored + 1)}
    assert sliding == set(range(1, n))


def test_sliding_seed_keeps_the_loops_quirks():
    wins = Protocol("sliding-seed", 256, 96).windows(1000)
    assert wins[-1].end == 1000 and wins[-1].n_scored == 96 and 1000 - wins[-2].end < 96  # scored twice
    assert wins[0] == Window(0, 96, 95)


def test_llamacpp_scores_the_second_half_after_a_bos():
    wins = Protocol("llamacpp", 512, 512).windows(2000, add_bos=True)
    assert [(w.start, w.end, w.n_scored, w.bos) for w in wins] == [(i * 512, (i + 1) * 512, 255, True) for i in range(3)]


@pytest.fixture(scope="module")
def stream(tiny, tmp_path_factory):
    """The held-out text, tokenized by quantbench, and the model in fp32 as the oracles load it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("stream")
    described = textdata.describe_text({"text_file": str(tiny["text"])}, str(out))
    textdata.tokenize(described, out / "ids.npy", out / "meta.json", hf_dir=str(tiny["hf"]))
    ids = np.load(out / "ids.npy")
    encodings = AutoTokenizer.from_pretrained(tiny["hf"])(tiny["text"].read_text(), return_tensors="pt")
    assert np.array_equal(encodings.input_ids[0].numpy(), ids)
    model = AutoModelForCausalLM.from_pretrained(tiny["hf"], dtype=torch.float32).eval()
    scorer = TransformersBackend.load(BASELINE, {}, str(tiny["hf"]), threads=2)
    return ids, encodings, model, scorer


def _ppl(scorer, ids, protocol, batch_size=1):
    return score(scorer, ids, protocol.windows(ids.size), protocol, batch_size)["ppl"]


def _distributions(backend, ids, wins, protocol, model_dir=None) -> Distributions:
    """The baseline's distributions, recorded as its evaluation job records them."""
    recorder = Recorder(backend, sum(w.n_scored for w in wins))
    score(backend, ids, wins, protocol, on_batch=recorder)
    return recorder.finish(model_dir)


def test_sliding_seed_equals_the_hugging_face_loop(stream):
    ids, encodings, model, scorer = stream
    max_length, stride = 256, 96
    assert encodings.input_ids.size(1) % stride not in (0, 1)  # the last window is shorter: the quirk shows
    # The loop as users copy it (see the issue text), verbatim but for the model's device.
    nlls = []
    for i in range(0, encodings.input_ids.size(1), stride):
        begin_loc = max(i + stride - max_length, 0)
        end_loc = min(i + stride, encodings.input_ids.size(1))
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-stride] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            nlls.append(outputs.loss)
    oracle = torch.exp(torch.stack(nlls).mean()).item()
    ours = _ppl(scorer, ids, Protocol("sliding-seed", max_length, stride), batch_size=4)
    assert ours == pytest.approx(oracle, rel=1e-5)


def test_sliding_equals_the_corrected_recipe(stream):
    ids, encodings, model, scorer = stream
    max_length, stride = 256, 96
    seq_len = encodings.input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        counted = int((target_ids[:, 1:] != -100).sum())  # labels the shifted loss averages over
        nll_sum, n_tokens = nll_sum + loss.item() * counted, n_tokens + counted
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    assert n_tokens == seq_len - 1
    ours = _ppl(scorer, ids, Protocol("sliding", max_length, stride))
    assert ours == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-5)


def test_gptq_equals_the_gptq_repository_eval_loop(stream):
    ids, encodings, model, scorer = stream
    seqlen = 128
    testenc = encodings.input_ids
    # GPTQ repository, llama.py llama_eval (and datautils.get_wikitext2), without the layer-by-layer offload.
    nsamples = testenc.numel() // seqlen
    nlls = []
    for i in range(nsamples):
        batch = testenc[:, (i * seqlen):((i + 1) * seqlen)]
        with torch.no_grad():
            lm_logits = model(batch).logits
        shift_logits = lm_logits[:, :-1, :].contiguous()
        shift_labels = batch[:, 1:]
        loss = torch.nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        nlls.append(loss.float() * seqlen)
    oracle = torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()
    assert _ppl(scorer, ids, Protocol("gptq", seqlen, seqlen), batch_size=3) == pytest.approx(oracle, rel=1e-5)


def test_kl_against_the_stored_distributions_is_exact(stream, tiny, tmp_path):
    ids, _, model, base = stream
    protocol = Protocol("gptq", 128, 128, max_windows=8)
    wins = protocol.windows(ids.size)
    inline = _distributions(base, ids, wins, protocol)  # the head kept in the file
    assert inline.head.shape == (model.config.vocab_size, model.config.hidden_size)
    _distributions(base, ids, wins, protocol, tiny["hf"]).save(tmp_path / "distributions.npz")
    ref = Distributions.load(tmp_path / "distributions.npz", tiny["hf"])
    assert ref.head_ref[0] and ref.hidden.shape == (8 * 127, model.config.hidden_size)  # the head: the checkpoint's
    assert np.array_equal(ref.head, inline.head)
    same = score(base, ids, wins, protocol, baseline=ref)
    assert same["kl_mean"] == pytest.approx(0, abs=1e-6) and same["top1_agree"] == 1 and same["delta_p_rms"] < 1e-6

    nf4 = TransformersBackend.load(BNB, {"mode": "nf4", "double_quant": False, "compute_dtype": "float32"},
                                           str(tiny["hf"]), threads=2)
    got = score(nf4, ids, wins, protocol, baseline=ref)
    # KL, top-1 and Δp computed directly from both models' full distributions, as llama.cpp defines them.
    p, q = [], []
    for w in wins:
        window = torch.from_numpy(ids[w.start:w.end].astype(np.int64))[None]
        with torch.no_grad():
            p.append(torch.log_softmax(model(window).logits[0, :-1].double(), -1))
            q.append(torch.log_softmax(nf4.model(window).logits[0, :-1].double(), -1))
    p, q = torch.cat(p), torch.cat(q)
    kl = (p.exp() * (p - q)).sum(-1)
    targets = torch.from_numpy(np.concatenate([ids[w.start + 1:w.end] for w in wins]).astype(np.int64))[:, None]
    delta_p = q.gather(-1, targets).exp() - p.gather(-1, targets).exp()
    assert kl.mean().item() > 1e-4  # nf4 moves the distribution: the comparison is not vacuous
    assert got["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert got["kl_p99"] == pytest.approx(kl.quantile(0.99).item(), rel=1e-3)
    assert got["top1_agree"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).double().mean().item(), abs=1e-3)
    assert got["top1_agree"] < 1
    assert got["delta_p_mean"] == pytest.approx(delta_p.mean().item(), rel=1e-4, abs=1e-7)

    # eval.compile compiles the layers of a model with plain weights only, never a quantized one's kernels
    from quantbench.backends.transformers import compiled_layers
    layers, compiled = compiled_layers(model)
    assert layers is model.model.layers and len(compiled) == model.config.num_hidden_layers
    assert compiled_layers(nf4.model) is None
    assert TransformersBackend(model, compile=True).info()["compiled_layers"] == 0  # on a CPU: eager


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_head_reproduces_a_half_precision_model_and_nothing_else(stream, tiny, dtype, tmp_path):
    """Logits are made from the head inputs by the backend's Head: in fp16/bf16 they must give the
    model's own log-probabilities, and the distributions are stored in that dtype (2 bytes a value)."""
    from transformers import AutoModelForCausalLM

    ids, _, _, _ = stream
    protocol = Protocol("gptq", 128, 128, max_windows=4)
    wins = protocol.windows(ids.size)
    half = TransformersBackend(AutoModelForCausalLM.from_pretrained(tiny["hf"], dtype=dtype))
    _distributions(half, ids, wins, protocol, tiny["hf"]).save(tmp_path / "d.npz")
    ref = Distributions.load(tmp_path / "d.npz", tiny["hf"])
    assert str(ref.dtype) == str(dtype).removeprefix("torch.") and ref.hidden.itemsize == ref.head.itemsize == 2
    same = score(half, ids, wins, protocol, baseline=ref)
    assert same["kl_mean"] == pytest.approx(0, abs=1e-6) and same["top1_agree"] == 1

    wrong = TransformersBackend(AutoModelForCausalLM.from_pretrained(tiny["hf"], dtype=dtype))
    wrong.head.scale *= 1.05  # as if the forward applied a logit scale that Head missed
    with pytest.raises(ValueError, match="cannot be recomputed"):
        score(wrong, ids, wins, protocol)


def test_chunks_of_rows_change_no_number(stream, monkeypatch):
    """Logits are normalized and compared a chunk of rows at a time (memory bounded for any
    vocabulary): chunks of 7 rows give the numbers of chunks of 64."""
    from quantbench import backends

    ids, _, _, base = stream
    protocol = Protocol("gptq", 128, 128, max_windows=4)
    wins = protocol.windows(ids.size)
    ref = _distributions(base, ids, wins, protocol)
    want = score(base, ids, wins, protocol, 2, baseline=ref)
    monkeypatch.setattr(backends, "CPU_CHUNK_ROWS", 7)
    got = score(base, ids, wins, protocol, 2, baseline=ref)
    for key in ("ppl", "kl_mean", "kl_max", "top1_agree", "delta_p_rms"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key  # the head matmul rounds by its shape


class _FitsThreeWindows:
    """A GPU that runs out of memory above three windows a batch."""
    windows_per_batch, device = None, "cuda"

    def __init__(self, backend):
        self.backend, self.batches = backend, []

    def logits(self, ids, n_scored):
        self.batches.append(len(ids))
        if len(ids) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.backend.logits(ids, n_scored)


def test_auto_batch_size_halves_until_a_batch_fits(stream):
    ids, _, _, base = stream
    protocol = Protocol("gptq", 128, 128, max_windows=8)
    wins = protocol.windows(ids.size)
    gpu = _FitsThreeWindows(base)
    got = score(gpu, ids, wins, protocol, "auto")
    assert gpu.batches == [8, 4, 2, 2, 2, 2] and got["batch_size"] == 2  # tried all, then halves, then keeps 2
    assert got["ppl"] == pytest.approx(score(base, ids, wins, protocol, 1)["ppl"], rel=1e-9)
    with pytest.raises(torch.OutOfMemoryError):  # a fixed batch size is the user's: never changed
        score(_FitsThreeWindows(base), ids, wins, protocol, 4)


def test_distributions_of_other_tokens_are_refused(stream):
    ids, _, _, base = stream
    protocol = Protocol("gptq", 128, 128, max_windows=2)
    ref = _distributions(base, ids, protocol.windows(ids.size), protocol)
    shifted = Protocol("gptq", 128, 128, max_windows=2, skip=1)
    with pytest.raises(ValueError, match="scored other tokens"):
        score(base, ids, shifted.windows(ids.size), shifted, baseline=ref)


@pytest.fixture(scope="session")
def llama_perplexity():
    """llama.cpp's llama-perplexity, of the workflow's build of llama.cpp's programs."""
    import upstream

    return upstream.tool("llama-perplexity")


def test_llamacpp_protocol_equals_llama_perplexity(tmp_path, tiny, tiny_gguf, converter, llama_perplexity):
    share_tools(tmp_path, converter)
    text = tmp_path / "eval.txt"
    text.write_bytes(tiny["text"].read_bytes() + b"\r\nlast line\n")  # llama.cpp keeps \r, drops the final \n
    cfg = write_config(tmp_path, {
        "models": {"tiny": {"source": "gguf", "path": str(tiny_gguf)}},
        "methods": {"gguf": {"variants": ["Q4_K_M"]}},
        "eval": {"text": {"text_file": str(text)}, "protocol": "llamacpp", "context": 128, "tokens": "gguf"},
    })
    run = snakemake(tmp_path, config=cfg)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    metrics = json.loads((tmp_path / "results" / "tiny" / "gguf" / "Q4_K_M" / "metrics.json").read_text())
    assert metrics["protocol"]["tokenizer"]["kind"] == "gguf"
    tool = subprocess.run([str(llama_perplexity), "-m", str(tmp_path / "results" / "tiny" / "gguf" / "Q4_K_M" / "model.gguf"),
                           "-f", str(text), "-c", "128", "-t", "2"], capture_output=True, text=True, check=True)
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", tool.stdout + tool.stderr)
    assert final, tool.stderr[-3000:]
    assert f"{metrics['ppl']:.4f}" == final.group(1)
    assert f"{metrics['ppl_stderr']:.5f}" == final.group(2)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", tool.stderr)
    assert int(chunks.group(1)) == metrics["protocol"]["n_windows"]
    df = pd.read_csv(tmp_path / "results" / "report" / "summary.csv").set_index("method")
    assert df.loc["gguf", "kl_mean"] > 0 and 0 < df.loc["gguf", "top1_agree"] < 1
