"""The report's figures, as PNG files: quality vs bits per weight with the Pareto front, size per
method, evaluation speed per method. Each method has one colour in every figure."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .methods import BASELINE, METHODS
from .summary import weight_bytes

FIGURES = {"quality": "quality_vs_bpw.png", "size": "size_per_method.png", "speed": "speed_per_method.png"}


def color(method: str):
    """A method's colour, the same in every figure and no other method's: its place in the method table
    (tab20 has a colour for each of up to 20 methods)."""
    import matplotlib

    assert len(METHODS) <= 20, "more methods than tab20 has colours"
    return matplotlib.colormaps["tab20"](list(METHODS).index(method))


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The points no other point beats on both x and y (lower is better on both)."""
    front, best = [], float("inf")
    for _, row in points.sort_values([x, y]).iterrows():
        if row[y] < best:
            front.append(row)
            best = row[y]
    return pd.DataFrame(front)


def _name(row) -> str:
    return "FP16" if row["method"] == BASELINE.name else f"{row['method']} {row['variant']}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


# Label offsets in points, tried in turn until a label overlaps no label placed before it.
OFFSETS = [(5, 4), (5, -11), (-5, 4), (-5, -11), (5, 14), (5, -21), (-5, 14), (-5, -21), (5, 24), (-5, 24),
           (5, -31), (-5, -31), (5, 34), (-5, 34)]


def _label_points(ax, points: pd.DataFrame, x: str, y: str) -> None:
    """Name every point, each label at the first nearby place where it overlaps no label placed before
    it; a label set away from its point gets a thin leader line."""
    renderer = ax.figure.canvas.get_renderer()
    placed = []
    for _, row in points.sort_values([x, y]).iterrows():
        for dx, dy in OFFSETS:
            text = ax.annotate(_name(row), (row[x], row[y]), fontsize=7, xytext=(dx, dy), textcoords="offset points",
                               ha="left" if dx > 0 else "right", va="bottom",
                               arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.6"} if abs(dy) > 10 else None)
            box = text.get_window_extent(renderer)
            if (dx, dy) == OFFSETS[-1] or not any(box.overlaps(other) for other in placed):
                break
            text.remove()
        placed.append(box)


def _Plain(**kwargs):
    """A log axis's tick labels as plain numbers (0.01, 30, 1392.5; not 1e-02 or 1.3925x10^3), on the ticks
    matplotlib's LogFormatter labels (minor ones only where few decades leave room)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return Plain(**kwargs)


def quality(df: pd.DataFrame, path: Path) -> None:
    plt = _pyplot()

    ok = df[(df["status"] == "ok") & df["bits_per_weight"].notna()]
    models = sorted(ok["model"].unique())
    metrics = [m for m in ("ppl", "kl_mean") if ok[m].notna().any()]
    fig, axes = plt.subplots(len(models) or 1, len(metrics) or 1, figsize=(7.5 * max(len(metrics), 1),
                             5.6 * max(len(models), 1)), squeeze=False)
    for r, model in enumerate(models):
        cells = ok[ok["model"] == model]
        for c, metric in enumerate(metrics):
            ax, points = axes[r][c], cells.dropna(subset=[metric])
            if metric == "kl_mean":
                points = points[points["method"] != BASELINE.name]  # zero by definition: off a log axis
            for method in [m for m in METHODS if m in set(points["method"])]:  # legend in the table's order
                group = points[points["method"] == method]
                ax.scatter(group["bits_per_weight"], group[metric], color=color(method), s=36,
                           label="FP16" if method == BASELINE.name else method)
            front = pareto_front(points, "bits_per_weight", metric)
            if not front.empty:
                ax.step(front["bits_per_weight"], front[metric], where="post", color="black", lw=1, ls="--",
                        label="Pareto front")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_Plain())
            ax.yaxis.set_minor_formatter(_Plain(minor_thresholds=(2, 0.5)))
            ax.set_xlabel("bits per weight (bpw)")
            ax.set_ylabel("perplexity (lower is better)" if metric == "ppl" else "KL(FP16 ‖ cell), nats/token")
            ax.set_title(f"{model}: {'perplexity' if metric == 'ppl' else 'KL divergence from FP16'} vs size")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            _label_points(ax, points, "bits_per_weight", metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(df: pd.DataFrame, column: str, scale: float, xlabel: str, title: str, path: Path) -> None:
    plt = _pyplot()
    ok = df[(df["status"] == "ok") & df[column].notna()].sort_values(["model", "method", "variant"])
    fig, ax = plt.subplots(figsize=(8, 0.32 * max(len(ok), 4) + 1.2))
    labels = [f"{r['model']} · {_name(r)}" for _, r in ok.iterrows()]
    ax.barh(labels, ok[column] / scale, color=[color(m) for m in ok["method"]])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(df: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    paths = {k: out_dir / v for k, v in FIGURES.items()}
    quality(df, paths["quality"])
    sized = df.assign(weight_bytes=weight_bytes(df))
    _bars(sized, "weight_bytes", 1e6, "size of the weights, MB (on disk; in memory for load-time methods)",
          "Size per method", paths["size"])
    _bars(df, "eval_tokens_per_s", 1, "evaluation tokens/s (each cell on the device in its row of the table)",
          "Evaluation speed per method", paths["speed"])
    return paths
