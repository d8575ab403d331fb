"""GPU bench: quantbench's evaluation engine on one GPU, beside a plain batched loop and the bf16
matmul peak measured in the same run.

    python bench/gpu.py [--tokens 290000] [--shapes smollm2-135m llama3-8b] [--split] [--json out.json]

Models are built on the GPU with random weights in bf16 (speed does not depend on the values) in
the shapes of SmolLM2-135M and Llama-3-8B, and score a random token stream of WikiText-2's length.
quantbench runs as its evaluation job does (`TransformersBackend`, `scoring.score`, `batch_size:
auto`): the baseline cell records the distributions, a cell with KL compares with them.

% of peak = useful model FLOPs / s over the matmul peak; useful FLOPs are 2 x the body's linear
weights and 2 x layers x position x hidden of causal attention for each token fed, and 2 x the head
for each token scored.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workflow"))
from quantbench import scoring  # noqa: E402
from quantbench.backends.transformers import TransformersBackend  # noqa: E402
from quantbench.distributions import Distributions, Recorder  # noqa: E402
from quantbench.protocols import Protocol  # noqa: E402
from quantbench.scoring import score  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
PLAIN_BATCH = {"smollm2-135m": 64, "llama3-8b": 4}


def sync_time(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def matmul_peak() -> float:
    """bf16 8192^3 matmul, TFLOP/s: the best of 5 rounds of 50 (one round moved by 6% between runs)."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    s = min(sync_time(lambda: [a @ b for _ in range(50)])[1] for _ in range(5))
    return 50 * 2 * 8192**3 / s / 1e12


def build(shape: str):
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = torch.bfloat16
    return model.eval()


def model_flops(model, fed: int, scored: int, context: int) -> float:
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size
    body = sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    attention = 2 * cfg.num_hidden_layers * context * cfg.hidden_size  # causal: QK^T and PV over ~context/2
    return fed * (2 * body + attention) + scored * 2 * head


def plain_loop(model, ids: np.ndarray, context: int, batch: int):
    """Non-overlapping windows, full logits and the loss on the GPU: what a hand-written eval does."""
    x = torch.from_numpy(ids[: ids.size // context * context].astype(np.int64)).view(-1, context).cuda()
    nll, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            b = x[i:i + batch]
            logits = model(b, use_cache=False).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                                     reduction="sum")
            n += b[:, 1:].numel()
    return math.exp(float(nll) / n), x.numel(), n


def seed_loop(model, ids: np.ndarray, max_length: int = 2048, stride: int = 512):
    """The Hugging Face perplexity loop as users copy it (sliding, batch 1), on the GPU."""
    input_all = torch.from_numpy(ids.astype(np.int64))[None]
    nlls, fed, scored = [], 0, 0
    for i in range(0, input_all.size(1), stride):
        begin_loc = max(i + stride - max_length, 0)
        end_loc = min(i + stride, input_all.size(1))
        input_ids = input_all[:, begin_loc:end_loc].cuda()
        target_ids = input_ids.clone()
        target_ids[:, :-stride] = -100
        with torch.no_grad():
            nlls.append(model(input_ids, labels=target_ids).loss)
        fed += input_ids.numel()
        scored += int((target_ids[:, 1:] != -100).sum())
    return torch.exp(torch.stack(nlls).mean()).item(), fed, scored


def row(name: str, model, fed: int, scored: int, seconds: float, context: int, peak: float, **extra) -> dict:
    tflops = model_flops(model, fed, scored, context) / seconds / 1e12
    return {"path": name, "scored_tok_s": scored / seconds, "fed_tok_s": fed / seconds, "seconds": seconds,
            "tflops": tflops, "pct_peak": 100 * tflops / peak, **extra}


def bench_shape(shape: str, n_tokens: int, peak: float, workdir: Path) -> list[dict]:
    model = build(shape)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, n_tokens).astype(np.int32)
    context, rows = 2048, []

    plain_loop(model, ids, context, PLAIN_BATCH[shape])  # warm-up: one whole pass, as for quantbench's cells
    (ppl, fed, scored), s = sync_time(lambda: plain_loop(model, ids, context, PLAIN_BATCH[shape]))
    rows.append(row(f"plain batched loop, batch {PLAIN_BATCH[shape]}", model, fed, scored, s, context, peak, ppl=ppl))

    # The job finds the head in the model's safetensors; this directory holds just that tensor of it.
    save_file({"lm_head.weight": model.lm_head.weight.detach().contiguous()}, str(workdir / "model.safetensors"))
    protocol = Protocol("gptq", context, context)
    wins = protocol.windows(ids.size)
    for compile in (False, True):
        rows += engine_rows(model, ids, wins, protocol, peak, workdir, compile)
    if shape == "smollm2-135m":
        seed_ids = ids[:100_000]
        seed_loop(model, seed_ids[:4096])  # warm-up
        (ppl, fed, scored), s = sync_time(lambda: seed_loop(model, seed_ids))
        rows.append(row("the seed loop, sliding 2048/512, batch 1", model, fed, scored, s, context, peak, ppl=ppl))
        seed_s = s
        protocol = Protocol("sliding-seed", 2048, 512)
        wins = protocol.windows(seed_ids.size)
        for compile in (False, True):
            backend = TransformersBackend(model, compile=compile)
            score(backend, seed_ids, wins, protocol, "auto", compile=compile)  # warm-up: one whole pass
            result, s = sync_time(lambda b=backend, c=compile: score(b, seed_ids, wins, protocol, "auto", compile=c))
            rows.append(row(f"quantbench sliding-seed, {'eval.compile' if compile else 'eager'}", model,
                            result["eval_tokens_fed"], result["n_tokens"], s, context, peak, ppl=result["ppl"],
                            batch=result["batch_size"], ppl_rel_diff=abs(result["ppl"] / ppl - 1), speedup=seed_s / s))
    return rows


def baseline_cell(backend, ids, wins, protocol, workdir: Path, compile: bool):
    """The baseline cell as the job runs it: scored, the distributions recorded and saved (the head by
    reference to the checkpoint's tensor), then loaded as a cell with KL loads them."""
    recorder = Recorder(backend, sum(w.n_scored for w in wins))
    result, s = sync_time(lambda: score(backend, ids, wins, protocol, "auto", on_batch=recorder, compile=compile))
    distributions, assemble_s = sync_time(lambda: recorder.finish(str(workdir)))
    dist_file = workdir / "distributions.npz"
    distributions.save(dist_file)
    size = dist_file.stat().st_size
    baseline = Distributions.load(dist_file, str(workdir))
    dist_file.unlink()
    return result, s, assemble_s, baseline, size


def engine_rows(model, ids, wins, protocol, peak: float, workdir: Path, compile: bool) -> list[dict]:
    """quantbench's baseline cell and a cell with KL, eager or with `eval.compile`, each timed on its second
    whole pass; the first (kernels picked for each batch shape, and with compile the graphs compiled, as in
    any job) is timed apart."""
    backend = TransformersBackend(model, compile=compile)
    mode, context = "eval.compile" if compile else "eager", protocol.context
    first_s = baseline_cell(backend, ids, wins, protocol, workdir, compile)[1]
    torch.cuda.reset_peak_memory_stats()
    result, s, assemble_s, baseline, size = baseline_cell(backend, ids, wins, protocol, workdir, compile)
    fed, scored = result["eval_tokens_fed"], result["n_tokens"]
    flops = model_flops(model, fed, scored, context)
    rows = [row(f"quantbench gptq, baseline cell (records the distributions), {mode}", model, fed, scored, s, context,
                peak, ppl=result["ppl"], batch=result["batch_size"], first_pass_s=first_s,
                pct_peak_first_pass=100 * flops / first_s / 1e12 / peak, compiled_layers=backend.info()["compiled_layers"],
                peak_vram_gb=torch.cuda.max_memory_allocated() / 2**30, distributions_gb=size / 1e9,
                assemble_s=assemble_s, pct_peak_with_assembling=100 * flops / (s + assemble_s) / 1e12 / peak)]
    _, first_s = sync_time(lambda: score(backend, ids, wins, protocol, "auto", baseline=baseline, compile=compile))
    torch.cuda.reset_peak_memory_stats()
    result, s = sync_time(lambda: score(backend, ids, wins, protocol, "auto", baseline=baseline, compile=compile))
    rows.append(row(f"quantbench gptq, cell with KL, {mode}", model, fed, scored, s, context, peak, ppl=result["ppl"],
                    kl_mean=result["kl_mean"], batch=result["batch_size"], first_pass_s=first_s,
                    pct_peak_first_pass=100 * flops / first_s / 1e12 / peak,
                    peak_vram_gb=torch.cuda.max_memory_allocated() / 2**30))
    return rows


def bench_split(shape: str, n_tokens: int, workdir: Path) -> dict:
    """The model saved, then loaded as the evaluation job loads it, on one GPU and spread over two
    (`models.<m>.gpus: 2`): the same perplexity both ways."""
    from quantbench.methods import BASELINE

    build(shape).save_pretrained(workdir / shape)
    torch.cuda.empty_cache()
    ids = np.random.default_rng(0).integers(0, SHAPES[shape]["vocab_size"], n_tokens).astype(np.int32)
    protocol = Protocol("gptq", 2048, 2048)
    wins = protocol.windows(ids.size)
    def on(gpus: int) -> dict:
        backend = TransformersBackend.load(BASELINE, {}, str(workdir / shape), threads=8, gpus=gpus)
        result, s = sync_time(lambda: score(backend, ids, wins, protocol, "auto"))
        return {"ppl": result["ppl"], "scored_tok_s": result["n_tokens"] / s, "batch": result["batch_size"],
                "devices": sorted({str(p.device) for p in backend.model.parameters()}),
                "peak_vram_gb": backend.peak_vram_mb() / 1024}

    out = {}
    for gpus in (1, 2):
        out[gpus] = on(gpus)
        torch.cuda.empty_cache()
        print(f"{shape} on {gpus} GPU(s): {out[gpus]}", flush=True)
    out["ppl_rel_diff"] = abs(out[2]["ppl"] / out[1]["ppl"] - 1)
    print(f"ppl relative difference, 2 GPUs vs 1: {out['ppl_rel_diff']:.3g}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=290_000)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--split", action="store_true", help="also: llama3-8b on one GPU and across two")
    parser.add_argument("--auto-first-tokens", type=int, default=scoring.AUTO_FIRST_TOKENS,
                        help="tokens a batch that `batch_size: auto` tries first")
    parser.add_argument("--json")
    a = parser.parse_args()
    scoring.AUTO_FIRST_TOKENS = a.auto_first_tokens
    peak = matmul_peak()
    import transformers

    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d"), "matmul_peak_tflops": peak, "auto_first_tokens": a.auto_first_tokens,
           "shapes": {}}
    print(f"{out['gpu']}, torch {out['torch']}, transformers {out['transformers']}, "
          f"bf16 8192^3 matmul {peak:.0f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shapes:
            out["shapes"][shape] = bench_shape(shape, a.tokens, peak, Path(tmp))
            torch.cuda.empty_cache()  # the shape's model is gone with bench_shape's frame
            print(f"\n{shape}\n| path | scored tok/s | % of peak | ppl | notes |\n|---|---|---|---|---|")
            for r in out["shapes"][shape]:
                notes = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                                  if k not in ("path", "scored_tok_s", "pct_peak", "ppl", "fed_tok_s", "tflops"))
                print(f"| {r['path']} | {r['scored_tok_s']:,.0f} | {r['pct_peak']:.1f} | {r['ppl']:.6g} | {notes} |",
                      flush=True)
        if a.split:
            out["split"] = bench_split("llama3-8b", 100_000, Path(tmp))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
