"""The transformers backend: the baseline, packed checkpoints loaded back by GPTQModel, and the
load-time methods (bitsandbytes, EETQ), each loaded as its method's module says."""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .. import architecture, io
from ..methods import Family
from . import N_GEN, N_PROMPT, REPETITIONS, Head, HeadLogits, Skipped, rates, speed_record

HEAD_CHECK_ROWS = 128  # positions the head check compares: full-vocabulary fp32 rows, so a bounded few


class _HeadInput(torch.nn.Module):
    """Stands in for the output head during a forward: keeps its input, returns a one-wide stand-in
    for the logits (what the forward does to them next costs nothing)."""

    hidden = None

    def forward(self, hidden):
        self.hidden = hidden
        return hidden[..., :1]


class TransformersBackend:
    """A Hugging Face causal LM; only the scored suffix goes through the output head."""

    windows_per_batch = None

    def __init__(self, model, backend: str = "transformers", kernel: str | None = None, model_dir: str | None = None,
                 training: dict | None = None, compile: bool = False):
        self.model = model.eval()
        self.training = training or {}  # what training its adapters recorded (QLoRA)
        self.model_dir = model_dir  # where it was loaded from, and its tokenizer if it has one
        self.kernel = kernel
        self.device = "cuda" if next(model.parameters()).is_cuda else "cpu"
        self.dtype = model.dtype
        self.backend = backend
        self.weight_bytes = weight_bytes(model)
        self.head = Head.of(model)
        self.head_checked = False
        self.compiled = compiled_layers(model) if compile and self.device == "cuda" else None

    @classmethod
    def load(cls, method, params: dict, model_dir: str, threads: int, kernel: str = "auto",
             trust_remote_code: bool = False, gpus: int = 1, calib: str | None = None,
             compile: bool = False) -> TransformersBackend:
        """A cell of `method` (a methods.Method) from a Hugging Face directory: the model itself (baseline),
        a packed checkpoint evaluated by `kernel`, or the model quantized while loading; with `gpus` > 1,
        spread across the first `gpus` GPUs; with `compile`, the baseline's decoder layers compiled for
        scoring where that is safe (`compiled_layers`)."""
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        cuda = torch.cuda.is_available()
        if (why := method.cuda_only(params)) and not cuda:
            raise Skipped(f"{why}, and this machine has none")
        module = importlib.import_module(f"quantbench.{method.module}") if method.module else None
        if method.family is Family.PACKED:
            model, used = module.load(method.name, model_dir, kernel, trust_remote_code)
            return cls(model, backend=f"gptqmodel-{method.name}", kernel=used, model_dir=model_dir)
        # fp16 on a GPU (bf16 where the checkpoint is bf16, or the method's kernels need it); fp32 on the
        # CPU, where half matmuls are slow.
        dtype = torch.float32
        if cuda:
            stored = architecture.stored_dtype(io.read_json(Path(model_dir) / "config.json"))
            dtype = torch.bfloat16 if stored == "bfloat16" else torch.float16
            dtype = getattr(torch, method.cuda_dtype) if method.cuda_dtype else dtype
        if method.family is Family.PREQUANTIZED:
            model, used = module.load(model_dir, kernel, trust_remote_code, "cuda" if cuda else "cpu", dtype)
            return cls(model, backend=f"{'gptqmodel' if used else 'transformers'}-{method.name}", kernel=used,
                       model_dir=model_dir)
        if cuda and gpus > 1:
            placement = {"device_map": "auto", "max_memory": spread_over(gpus)}
        else:
            placement = {"device_map": "cuda" if cuda else "cpu"}

        def load(quantization_config=None):
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                                        quantization_config=quantization_config, **placement)

        device, training = "cuda" if cuda else "cpu", None
        if method.family is Family.LOAD_TIME:
            module.require()
            model = module.quantize(params, device, load)
        elif method.family is Family.FINETUNE:
            module.require()
            model, training = module.train(params, calib, device, dtype, load)
        else:
            model = load()
        baseline = method.family is Family.BASELINE  # a quantized model's layers run its own kernels, eager
        return cls(model, backend="transformers" if baseline else f"transformers-{method.name}",
                   model_dir=model_dir, training=training, compile=compile and baseline)

    def info(self) -> dict:
        devices = {p.device for p in self.model.parameters()}
        return {**self.training,
            "backend": self.backend,
            "device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
            "n_devices": len(devices),
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "kernel": self.kernel,
            "weight_memory_mb": self.weight_bytes / 2**20,
            "compiled_layers": len(self.compiled[1]) if self.compiled else 0,
        }

    def logits(self, ids: np.ndarray, n_scored: int) -> HeadLogits:
        """The head inputs at the scored positions, on the model's device: the forward runs with the
        output head taken out, so full-vocabulary logits are never made for the whole batch."""
        with torch.no_grad():  # not inference_mode: quanto's matmuls are autograd functions it refuses
            batch = torch.from_numpy(ids).to(self.device)
            if not self.head_checked:
                self.check_head(batch[:1], min(n_scored, HEAD_CHECK_ROWS))
            real, capture = self.model.get_output_embeddings(), _HeadInput()
            self.model.set_output_embeddings(capture)
            try:  # the last n_scored + 1 positions; the very last predicts nothing
                with self.scoring_layers():
                    self.model(input_ids=batch, logits_to_keep=n_scored + 1, use_cache=False)
            finally:
                self.model.set_output_embeddings(real)
            hidden = capture.hidden[:, :-1]
            return HeadLogits(hidden.reshape(-1, hidden.shape[-1]), self.head)

    def check_head(self, window, n_scored: int) -> None:
        """The head applied to the captured inputs must give the model's own log-probabilities at the
        last n_scored positions of `window`: a forward that does more to its logits than Head knows of
        is refused, never scored. The two may round differently in the compute dtype, by up to
        eps * max|logit| of a row; twice that is allowed."""
        with self.scoring_layers():
            logits = self.model(input_ids=window, logits_to_keep=n_scored + 1, use_cache=False).logits[0, :-1]
        want = torch.log_softmax(logits.float(), -1)  # on the input's device, when accelerate spreads the model
        self.head_checked = True
        logits = self.logits(window.cpu().numpy(), n_scored).rows(slice(None)).float()
        got = torch.log_softmax(logits, -1)
        want = want.to(got.device)
        error = (got - want).abs().amax(-1)
        if (error > 1e-3 + 1e-4 * want.abs().amax(-1) + 2 * torch.finfo(self.dtype).eps * logits.abs().amax(-1)).any():
            self.head_checked = False
            raise ValueError(f"the model's output head cannot be recomputed from its inputs and weights: "
                             f"log-probabilities differ by up to {float(error.max()):.3g} ({self.dtype} logits)")

    @contextmanager
    def scoring_layers(self):
        """The compiled decoder layers in place for a scoring forward; generation, the speed test and
        lm-eval run the model as its users do, eager."""
        if not self.compiled:
            yield
            return
        layers, compiled = self.compiled
        eager = list(layers)
        for i, layer in enumerate(compiled):
            layers[i] = layer
        try:
            yield
        finally:
            for i, layer in enumerate(eager):
                layers[i] = layer

    def speed(self, repetitions: int = REPETITIONS) -> dict:
        """Prefill (pp512) and decode (tg128) tokens/s at batch 1 with the model's KV cache, measured as
        llama-bench measures llama.cpp's: random tokens, a warm-up, then runs from an empty cache."""
        from transformers import DynamicCache

        rng = np.random.default_rng(0)
        state = {}

        def step(ids) -> None:
            self.model(input_ids=torch.as_tensor(ids, device=self.input_device).reshape(1, -1),
                       past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
            if self.device == "cuda":
                torch.cuda.synchronize()

        def reset() -> None:
            state["cache"] = DynamicCache(config=self.model.config)

        def prefill(warm_up: bool) -> None:
            step(rng.integers(self.n_vocab, size=N_PROMPT))

        def decode(warm_up: bool) -> None:
            for _ in range(1 if warm_up else N_GEN):
                step(rng.integers(self.n_vocab, size=1))

        with torch.no_grad():
            reset()
            pp = rates(prefill, reset, N_PROMPT, repetitions)
            reset()
            tg = rates(decode, reset, N_GEN, repetitions)
        return speed_record(pp, tg, threads=torch.get_num_threads(), batch=1)

    def complete(self, prompts: list[str], max_new_tokens: int, model_dir: str) -> list[dict]:
        """One greedy completion of each prompt with transformers' generate, as its users run it: a user
        message through the chat template of the model's tokenizer (in model_dir), where it has one."""
        from ..sources import tokenizer as load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        chat = bool(getattr(tokenizer, "chat_template", None))
        configured = self.model.generation_config.eos_token_id
        eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
        out = []
        with torch.no_grad():
            for prompt in prompts:
                if chat:
                    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                        add_generation_prompt=True, return_tensors="pt")
                    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
                else:
                    ids = tokenizer(prompt, return_tensors="pt").input_ids
                new = self.model.generate(input_ids=ids.to(self.input_device), max_new_tokens=max_new_tokens,
                                          do_sample=False, attention_mask=torch.ones_like(ids).to(self.input_device),
                                          pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)[0, ids.shape[1]:]
                stopped = new.numel() > 0 and int(new[-1]) in eos
                new = new[:-1] if stopped else new
                out.append({"prompt": prompt, "chat": chat, "completion": tokenizer.decode(new, skip_special_tokens=True),
                            "new_tokens": new.numel(), "finish_reason": "stop" if stopped else "length"})
        return out

    @property
    def n_vocab(self) -> int:
        return self.head.weight.shape[0]

    def token_texts(self, tokens: list[int]) -> list[str] | None:
        """How the tokenizer beside the weights spells each token, or None where there is none."""
        if not self.model_dir or not any((Path(self.model_dir) / f).is_file()
                                         for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            return None
        from ..sources import tokenizer

        return tokenizer(self.model_dir).convert_ids_to_tokens(tokens)

    @property
    def input_device(self):
        return self.model.get_input_embeddings().weight.device

    def peak_vram_mb(self) -> float | None:
        """Summed over the GPUs the model spans."""
        if self.device != "cuda":
            return None
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20

    def close(self) -> None:
        pass


def compiled_layers(model):
    """The decoder's layers and each compiled by torch.compile (dynamic shapes: one graph serves every batch
    of more than one window and every length, shared by the layers), where that is safe: a model on one GPU
    whose weights are plain tensors and whose parameters are held by torch's and transformers' own modules
    (the FP16 model). Else None. Compiled, the elementwise work between the matmuls (norms, rotary
    embedding, SiLU, residuals) fuses: a small model's scoring spends most of its time there when eager."""
    layers = getattr(getattr(model, "get_decoder", lambda: None)(), "layers", None)
    params = list(model.parameters())
    own = ("torch.nn.", "transformers.")
    if not isinstance(layers, torch.nn.ModuleList) or len({p.device for p in params}) != 1 \
            or any(type(p.data) is not torch.Tensor for p in params) \
            or any(type(m) is not torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear)) \
            or any(not type(m).__module__.startswith(own) for m in model.modules() if m._parameters) \
            or any(hasattr(m, "_hf_hook") for m in model.modules()):
        return None
    return layers, [torch.compile(layer, dynamic=True) for layer in layers]


def spread_over(gpus: int) -> dict[int, int]:
    """accelerate's max_memory for the first `gpus` GPUs: 90% of each (room for activations), none elsewhere."""
    if torch.cuda.device_count() < gpus:
        raise RuntimeError(f"the model's gpus is {gpus}, and this job sees {torch.cuda.device_count()} GPUs")
    return {i: int(0.9 * torch.cuda.get_device_properties(i).total_memory) for i in range(gpus)}


def weight_bytes(model) -> int:
    """The bytes the model's weights hold in memory: each storage of its state once (tied weights share
    one), a tensor subclass (torchao, quanto) by the tensors it holds, packed data as packed."""
    storages = {}

    def add(t):
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
        else:
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()

    for tensor in model.state_dict().values():
        if isinstance(tensor, torch.Tensor):
            add(tensor)
    return sum(storages.values())

