"""What a model's config.json says of its shape, under every architecture's own names: the widths
its matrices' rows have, how many positions it can attend to, whether it needs its own code."""
from __future__ import annotations

HIDDEN = ("hidden_size", "n_embd", "d_model", "dim", "model_dim")
INTERMEDIATE = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "hidden_dim")
POSITIONS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def _first(cfg: dict, names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        if isinstance(cfg.get(name), int) and not isinstance(cfg.get(name), bool):
            return name, cfg[name]
    return None


def widths(cfg: dict) -> dict[str, int]:
    """The input widths of the model's linear layers, by the config key that gives each. GPT-2 leaves
    n_inner null for 4 x n_embd."""
    out = dict(filter(None, [_first(cfg, HIDDEN), _first(cfg, INTERMEDIATE)]))
    if "n_embd" in out and not any(k in out for k in INTERMEDIATE) and "n_inner" in cfg:
        out["n_inner (4 x n_embd)"] = 4 * out["n_embd"]
    return out


def max_positions(cfg: dict) -> tuple[str, int] | None:
    """The config key and number of positions the model can attend to, where it says."""
    return _first(cfg, POSITIONS)


def too_long(cfg: dict, context: int, who: str = "the model") -> str | None:
    """Why windows of `context` tokens are too long for the model, or None (also when it does not say)."""
    positions = max_positions(cfg)
    if positions and context > positions[1]:
        return (f"windows of {context} tokens are longer than {who} can attend to ({positions[0]} = {positions[1]}); "
                f"set eval.context to at most {positions[1]}")
    return None


def stored_dtype(cfg: dict) -> str | None:
    """The dtype the model's weights are stored in, where its config says (transformers 5 writes `dtype`)."""
    return cfg.get("dtype") or cfg.get("torch_dtype")


def needs_own_code(cfg: dict) -> bool:
    return "auto_map" in cfg
