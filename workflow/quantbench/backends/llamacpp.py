"""The llama.cpp backend: a GGUF file through llama-cpp-python's low-level API, fed token ids; and
what its users feel: llama-bench's speeds, and completions through llama-cpp-python's `Llama`."""
from __future__ import annotations

import numpy as np

from . import N_GEN, N_PROMPT, REPETITIONS, HostLogits, rates, speed_record


class LlamaCppBackend:
    """A GGUF model in llama.cpp, fed token ids directly (no llama.cpp tokenization), decoding as
    llama-perplexity does: windows of n_ctx go n_batch / n_ctx at a time into one llama_decode
    (n_batch 2048, n_ubatch 512, one KV cache per sequence), logits requested from the first
    scored position to the window's end. The same batches give the same floating-point sums."""

    N_BATCH, N_UBATCH = 2048, 512  # llama-perplexity's defaults

    def __init__(self, gguf_path: str, context: int, threads: int):
        import llama_cpp as L

        self.L, self.path, self.threads = L, gguf_path, threads
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.gpu = bool(L.llama_supports_gpu_offload())
        mparams.n_gpu_layers = 10_000 if self.gpu else 0
        self.model = L.llama_model_load_from_file(gguf_path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        self.windows_per_batch = max(1, self.N_BATCH // context)
        cparams = L.llama_context_default_params()
        cparams.n_ctx = context * self.windows_per_batch
        cparams.n_batch = min(self.N_BATCH, cparams.n_ctx)
        cparams.n_ubatch = self.N_UBATCH
        cparams.n_seq_max = self.windows_per_batch
        cparams.kv_unified = False
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens")
        self.n_batch = cparams.n_batch
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    def token_texts(self, tokens: list[int]) -> list[str]:
        """Each token's text as the GGUF's vocabulary stores it (as the Hugging Face tokenizer spells it)."""
        return [self.L.llama_vocab_get_text(self.vocab, t).decode("utf-8", errors="replace") for t in tokens]

    def info(self) -> dict:
        return {"backend": "llama.cpp", "device": "cuda" if self.gpu else "cpu", "compute_dtype": "gguf"}

    def logits(self, ids: np.ndarray, n_scored: int) -> HostLogits:
        """Logits predicting the last n_scored tokens of each window (rows of ids, one sequence each),
        [B, n_scored, vocab] float32: a view of llama.cpp's output buffer, valid until the next call."""
        # logits at position p predict token p + 1; the last one predicts nothing
        return HostLogits(self._decode(ids, ids.shape[1] - n_scored - 1))

    def all_logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits at every position of one row of ids [1, L], [1, L, vocab] float32 (a copy)."""
        assert ids.shape[0] == 1, "one sequence at a time"
        return self._decode(ids, 0).copy()

    def greedy(self, ids: list[int], n_new: int):
        """Up to n_new tokens, each the most likely after ids and those before it (the caller stops it)."""
        L = self.L
        logits = self._decode(np.array([ids]), len(ids) - 1)[0, -1]
        for pos in range(len(ids), len(ids) + n_new):
            token = int(np.argmax(logits))
            yield token
            if pos + 1 == len(ids) + n_new:
                return
            self._fill(np.array([token]), np.array([pos]), 0, np.array([True]))
            if L.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed while generating")
            logits = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(1, self.n_vocab))[0]

    def _fill(self, tokens: np.ndarray, positions: np.ndarray, size: int, wanted: np.ndarray) -> None:
        """The batch: tokens at positions, sequence k // size (0 where size is 0), logits where wanted."""
        count = tokens.size
        np.ctypeslib.as_array(self.batch.token, shape=(count,))[:] = tokens
        np.ctypeslib.as_array(self.batch.pos, shape=(count,))[:] = positions
        np.ctypeslib.as_array(self.batch.n_seq_id, shape=(count,))[:] = 1
        np.ctypeslib.as_array(self.batch.logits, shape=(count,))[:] = wanted
        for k in range(count):
            self.batch.seq_id[k][0] = k // size if size else 0
        self.batch.n_tokens = count

    def _decode(self, ids: np.ndarray, first: int) -> np.ndarray:
        """Logits from position `first` to the end of each row of ids, [B, n - first, vocab]; the cache
        then holds the rows (sequence k the k-th)."""
        L, (n_seq, n) = self.L, ids.shape
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        out = []
        for start in range(0, n, self.n_batch):  # several batches only when one window exceeds n_batch
            size = min(n - start, self.n_batch)
            positions = np.tile(np.arange(start, start + size), n_seq)
            self._fill(ids[:, start:start + size].reshape(-1), positions, size, positions >= first)
            rc = L.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            n_out = int((positions >= first).sum())
            if n_out:
                logits = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))
                out.append(logits if start + size == n else logits.copy())  # the next decode overwrites it
        logits = out[0] if len(out) == 1 else np.concatenate(out)
        return logits.reshape(n_seq, n - first, self.n_vocab)

    def speed(self, repetitions: int = REPETITIONS) -> dict:
        """pp512 and tg128 as llama-bench measures them: each test in its own context of its length, random
        tokens (BOS first where the vocabulary adds one), batches of N_BATCH / N_UBATCH."""
        pp, tg = self._bench(N_PROMPT, 0, repetitions), self._bench(0, N_GEN, repetitions)
        return speed_record(pp, tg, threads=self.threads, n_batch=self.N_BATCH, n_ubatch=self.N_UBATCH)

    def _bench(self, n_prompt: int, n_gen: int, repetitions: int) -> np.ndarray:
        L = self.L
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_prompt + n_gen
        cparams.n_batch, cparams.n_ubatch = self.N_BATCH, self.N_UBATCH
        cparams.n_threads = cparams.n_threads_batch = self.threads
        ctx = L.llama_init_from_model(self.model, cparams)
        batch = L.llama_batch_init(max(n_prompt, 1), 0, 1)
        rng = np.random.default_rng(0)
        bos = L.llama_vocab_bos(self.vocab) if L.llama_vocab_get_add_bos(self.vocab) else None

        def decode(tokens: np.ndarray, first_pos: int) -> None:
            n = tokens.size
            np.ctypeslib.as_array(batch.token, shape=(n,))[:] = tokens
            np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = np.arange(first_pos, first_pos + n)
            np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
            np.ctypeslib.as_array(batch.logits, shape=(n,))[:] = np.arange(n) == n - 1  # the last token's only
            for k in range(n):
                batch.seq_id[k][0] = 0
            batch.n_tokens = n
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed in the speed test")
            L.llama_synchronize(ctx)

        def run(warm_up: bool) -> None:
            if n_prompt:  # the whole prompt, warm-up or not
                tokens = rng.integers(self.n_vocab, size=n_prompt)
                if bos is not None:
                    tokens[0] = bos
                decode(tokens, 0)
                return
            token = bos if bos is not None else rng.integers(self.n_vocab)
            for pos in range(1 if warm_up else n_gen):
                decode(np.array([token]), pos)
                token = rng.integers(self.n_vocab)

        try:
            return rates(run, lambda: L.llama_memory_clear(L.llama_get_memory(ctx), False), n_prompt or n_gen,
                         repetitions)
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)

    def complete(self, prompts: list[str], max_new_tokens: int, model_dir: str | None = None) -> list[dict]:
        """One greedy completion of each prompt through llama-cpp-python's high-level `Llama`, as its users
        run it: a chat model (one whose GGUF has a chat template) gets each prompt as a user message. The
        GGUF carries its own tokenizer and template: model_dir is not read."""
        from llama_cpp import Llama

        n_ctx = min(4096, self.L.llama_model_n_ctx_train(self.model))
        llm = Llama(model_path=self.path, n_ctx=n_ctx, n_threads=self.threads, n_gpu_layers=-1 if self.gpu else 0,
                    seed=0, verbose=False)
        chat = "tokenizer.chat_template" in llm.metadata
        greedy = {"temperature": 0.0, "repeat_penalty": 1.0, "max_tokens": max_new_tokens}
        out = []
        try:
            for prompt in prompts:
                if chat:
                    reply = llm.create_chat_completion([{"role": "user", "content": prompt}], **greedy)
                    text = reply["choices"][0]["message"]["content"]
                else:
                    reply = llm.create_completion(prompt, **greedy)
                    text = reply["choices"][0]["text"]
                out.append({"prompt": prompt, "chat": chat, "completion": text,
                            "new_tokens": reply["usage"]["completion_tokens"],
                            "finish_reason": reply["choices"][0]["finish_reason"]})
        finally:
            llm.close()
        return out

    def peak_vram_mb(self) -> float | None:
        return None

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)
