"""Plots of measured or estimated results (matplotlib, imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["plot_memory_vs_cost"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("plotting needs matplotlib: pip install 'gradckpt[plot]'") from e
    return plt


def plot_memory_vs_cost(
    points: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    title: str = "",
    frontier: bool = True,
) -> Path:
    """Scatter peak memory (GiB) against speed cost (%), one labelled point per policy.

    Args:
        points: dicts with ``policy``, ``peak_bytes`` and ``speed_cost`` (fraction).
        path: the PNG to write.
        title: plot title.
        frontier: draw the lower-left frontier (points no other point beats on both axes).

    Returns:
        The path written.
    """
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"plot file must end in .png, got {str(path)!r}")
    if not out.parent.exists():
        raise ConfigError(f"directory {str(out.parent)!r} does not exist")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [p["speed_cost"] * 100 for p in points]
    ys = [p["peak_bytes"] / 2**30 for p in points]
    ax.scatter(xs, ys, s=40, zorder=3)
    for p, x, y in zip(points, xs, ys):
        ax.annotate(p["policy"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if frontier and len(points) > 1:
        order = sorted(zip(xs, ys))
        best: list[tuple[float, float]] = []
        for x, y in order:
            if not best or y < best[-1][1]:
                best.append((x, y))
        ax.step(
            [b[0] for b in best],
            [b[1] for b in best],
            where="post",
            alpha=0.5,
            zorder=2,
            label="frontier",
        )
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("speed cost vs no checkpointing (%)")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
