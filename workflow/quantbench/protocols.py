"""Evaluation protocols: which windows of the token stream a model sees, which positions
are scored and how their losses are averaged — exactly as the upstream tools do it.

- `llamacpp`: llama.cpp's `llama-perplexity` (tools/perplexity, `perplexity()`).
- `gptq`: the GPTQ/AWQ papers' evaluation loop (GPTQ repository, `llama_eval`).
- `sliding-seed`: the Hugging Face perplexity recipe as usually copied, quirks included.
- `sliding`: the same recipe corrected: every token scored once, token-weighted mean.

Pure index arithmetic: every backend then scores exactly these windows of the same ids.
"""
from __future__ import annotations

from dataclasses import dataclass

NAMES = ("gptq", "llamacpp", "sliding", "sliding-seed")
DEFAULT_CONTEXT = {"gptq": 2048, "llamacpp": 512, "sliding": 2048, "sliding-seed": 2048}
DEFAULT_STRIDE = 512
SLIDING = {"sliding", "sliding-seed"}


class SpecError(ValueError):
    """An evaluation spec that no protocol can run, with the key of `eval` that causes it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def resolve(spec: dict) -> dict:
    """The eval spec with its protocol's defaults filled in (the one place they are applied), checked."""
    name = spec["protocol"]
    if name not in NAMES:
        raise SpecError("protocol", f"unknown protocol {name!r}; known: {', '.join(NAMES)}")
    spec = {**spec, "context": spec.get("context") or DEFAULT_CONTEXT[name]}
    if name in SLIDING:
        spec["stride"] = spec.get("stride") or DEFAULT_STRIDE
        if spec["stride"] > spec["context"]:
            raise SpecError("stride", f"stride {spec['stride']} is longer than the window ({spec['context']})")
    elif "stride" in spec:
        raise SpecError("stride", f"only the sliding protocols take a stride; {name} steps by whole windows")
    if name == "llamacpp" and spec["context"] % 2:
        raise SpecError("context", "the llamacpp protocol scores the second half of each window: use an even context")
    return spec


@dataclass(frozen=True)
class Window:
    start: int          # first token id fed to the model
    end: int            # one past the last
    n_scored: int       # the last n_scored tokens of the window are predicted and scored
    bos: bool = False   # the first id fed is replaced by BOS (llama-perplexity)


@dataclass(frozen=True)
class Protocol:
    name: str
    context: int            # n_ctx (llamacpp), seqlen (gptq), max_length (sliding)
    stride: int             # sliding only; the other protocols step by a whole window
    max_windows: int = 0    # score only the first N windows (0: all)
    skip: int = 0           # leading tokens reserved for calibration, never scored

    @classmethod
    def from_spec(cls, spec: dict) -> Protocol:
        spec = resolve(spec)
        return cls(spec["protocol"], spec["context"], spec.get("stride", spec["context"]), spec.get("max_windows", 0),
                   spec.get("skip_tokens", 0))

    @property
    def window_mean(self) -> bool:
        """sliding-seed averages per-window mean losses unweighted; the others average over tokens."""
        return self.name == "sliding-seed"

    def windows(self, n_tokens: int, add_bos: bool = False) -> list[Window]:
        """Windows over tokens [skip, n_tokens), in the order the upstream tool scores them."""
        n, s = n_tokens - self.skip, self.skip
        ctx, stride = self.context, self.stride
        if self.name == "gptq":  # testenc[:, i*seqlen:(i+1)*seqlen]; loss over shifted labels
            out = [Window(s + i * ctx, s + (i + 1) * ctx, ctx - 1) for i in range(n // ctx)]
        elif self.name == "llamacpp":  # logits of positions first..n_ctx-2 with first = n_ctx/2
            if n < 2 * ctx:  # llama-perplexity refuses such a text
                raise ValueError(f"the llamacpp protocol needs at least {2 * ctx} tokens (2 x context) to score, "
                                 f"the evaluation text has {n}")
            n_scored = ctx - 1 - ctx // 2
            out = [Window(s + i * ctx, s + (i + 1) * ctx, n_scored, add_bos) for i in range(n // ctx)]
        elif self.name == "sliding-seed":  # target_ids[:, :-stride] = -100, also in the last, shorter window
            out = []
            for i in range(0, n, stride):
                begin, end = max(i + stride - ctx, 0), min(i + stride, n)
                out.append(Window(s + begin, s + end, min(stride, end - begin - 1)))
        elif self.name == "sliding":  # the corrected recipe: target length end - prev_end
            out, prev_end = [], 0
            for begin in range(0, n, stride):
                end = min(begin + ctx, n)
                out.append(Window(s + begin, s + end, min(end - prev_end, end - begin - 1)))
                prev_end = end
                if end == n:
                    break
        else:
            raise ValueError(f"unknown protocol {self.name!r}; known: {', '.join(NAMES)}")
        out = [w for w in out if w.n_scored > 0]
        if not out:
            raise ValueError(f"the evaluation text has {n_tokens} tokens ({self.skip} reserved for calibration), "
                             f"fewer than one {self.name} window of {ctx}")
        return out[:self.max_windows] if self.max_windows else out

    def describe(self, wins: list[Window], n_tokens: int, tokens_meta: dict) -> dict:
        """Everything a reader needs to know which numbers these are, for metrics.json."""
        tok = tokens_meta["tokenizer"]
        bos = (f"the first id of each window is replaced by BOS ({tok['bos_token_id']}), as llama-perplexity does"
               if any(w.bos for w in wins) else "nothing added per window; the stream starts as its tokenizer began it "
               f"(BOS {'added' if tok.get('add_bos') else 'not added'})")
        return {
            "name": self.name,
            "follows": FOLLOWS[self.name],
            "context": self.context,
            "stride": self.stride,
            "scored": SCORED[self.name].format(ctx=self.context, half=self.context // 2, stride=self.stride),
            "average": "mean of per-window mean NLL" if self.window_mean else "mean NLL over all scored tokens",
            "bos": bos,
            "n_windows": len(wins),
            "max_windows": self.max_windows,
            "skip_tokens": self.skip,
            "n_scored_tokens": sum(w.n_scored for w in wins),
            "stream_tokens": n_tokens,
            "text": tokens_meta["text"],
            "text_sha256": tokens_meta["text_sha256"],
            "tokenizer": tok,
        }


FOLLOWS = {
    "llamacpp": "llama.cpp tools/perplexity (llama-perplexity)",
    "gptq": "GPTQ repository llama_eval (also AWQ's evaluation)",
    "sliding-seed": "Hugging Face perplexity recipe, loop as usually copied",
    "sliding": "Hugging Face perplexity recipe, corrected",
}
SCORED = {
    "llamacpp": "positions {half}+1..{ctx}-1 of each {ctx}-token window (its second half)",
    "gptq": "every token of each {ctx}-token window but its first",
    "sliding-seed": "the last {stride} tokens of each window of up to {ctx}, also in the last, shorter "
                    "window (its scored tokens overlap the previous window's)",
    "sliding": "each token once, with up to {ctx} tokens of context (windows of {ctx} every {stride})",
}
