"""The llama.cpp backend: a GGUF file through llama-cpp-python's low-level API, fed token ids."""
from __future__ import annotations

import numpy as np

from . import HostLogits


class LlamaCppBackend:
    """A GGUF model in llama.cpp, fed token ids directly (no llama.cpp tokenization), decoding as
    llama-perplexity does: windows of n_ctx go n_batch / n_ctx at a time into one llama_decode
    (n_batch 2048, n_ubatch 512, one KV cache per sequence), logits requested from the first
    scored position to the window's end. The same batches give the same floating-point sums."""

    N_BATCH, N_UBATCH = 2048, 512  # llama-perplexity's defaults

    def __init__(self, gguf_path: str, context: int, threads: int):
        import llama_cpp as L

        self.L = L
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
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    def info(self) -> dict:
        return {"backend": "llama.cpp", "device": "cuda" if self.gpu else "cpu", "compute_dtype": "gguf"}

    def logits(self, ids: np.ndarray, n_scored: int) -> HostLogits:
        """Logits predicting the last n_scored tokens of each window (rows of ids, one sequence each),
        [B, n_scored, vocab] float32: a view of llama.cpp's output buffer, valid until the next call."""
        L, (n_seq, n) = self.L, ids.shape
        first = n - n_scored - 1  # logits at position p predict token p + 1; the last one predicts nothing
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        out = []
        for start in range(0, n, self.n_batch):  # several batches only when one window exceeds n_batch
            size = min(n - start, self.n_batch)
            count = size * n_seq
            positions = np.tile(np.arange(start, start + size), n_seq)
            np.ctypeslib.as_array(self.batch.token, shape=(count,))[:] = ids[:, start:start + size].reshape(-1)
            np.ctypeslib.as_array(self.batch.pos, shape=(count,))[:] = positions
            np.ctypeslib.as_array(self.batch.n_seq_id, shape=(count,))[:] = 1
            np.ctypeslib.as_array(self.batch.logits, shape=(count,))[:] = positions >= first
            for k in range(count):
                self.batch.seq_id[k][0] = k // size
            self.batch.n_tokens = count
            rc = L.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            n_out = int((positions >= first).sum())
            if n_out:
                logits = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))
                out.append(logits if start + size == n else logits.copy())  # the next decode overwrites it
        logits = out[0] if len(out) == 1 else np.concatenate(out)
        return HostLogits(logits.reshape(n_seq, n_scored + 1, self.n_vocab))

    def peak_vram_mb(self) -> float | None:
        return None

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)
