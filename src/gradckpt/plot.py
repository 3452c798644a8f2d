"""Plots of measured or estimated results (matplotlib, imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["plot_memory_vs_cost", "plot_peak_sweep", "png_path"]


def png_path(path: str | Path) -> Path:
    """``path`` as a ``Path``, checked before any work: a ``.png`` in a directory that exists.

    Raises:
        ConfigError: another suffix, or a directory that does not exist.
    """
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"plot file must end in .png, got {str(path)!r}")
    if not out.parent.exists():
        raise ConfigError(f"directory {str(out.parent)!r} does not exist")
    return out


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
    out = png_path(path)
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


def plot_peak_sweep(
    lines: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    capacities: Sequence[tuple[str, int]] = (),
    xlabel: str = "sequence length (tokens)",
    title: str = "",
) -> Path:
    """Peak memory (GiB) against sequence length or batch, one line per policy, capacities as horizontal lines.

    Args:
        lines: dicts with ``label`` and ``points``, a list of ``(x, peak_bytes)``.
        path: the PNG to write.
        capacities: ``(name, bytes)`` per GPU, drawn as dashed horizontal lines.
        xlabel: x-axis label; the axis is log2 when x spans more than 4x (powers of two sweep).
        title: plot title.

    Returns:
        The path written.

    Example:
        >>> plot_peak_sweep([{"label": "full", "points": [(512, 2**34), (1024, 2**35)]}],
        ...                 "peak.png", capacities=[("rtx-4090", 24 * 2**30)])
    """
    out = png_path(path)
    if not lines or not any(line["points"] for line in lines):
        raise ConfigError("nothing to plot: give at least one line with points")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    xs_all = sorted({x for line in lines for x, _ in line["points"]})
    for line in lines:
        pts = sorted(line["points"])
        ax.plot(
            [x for x, _ in pts],
            [y / 2**30 for _, y in pts],
            marker="o",
            markersize=4,
            label=line["label"],
            zorder=3,
        )
    for i, (name, cap) in enumerate(capacities):
        # in the legend rather than on the plot: labels there cannot collide with the lines
        ax.axhline(
            cap / 2**30,
            linestyle="--",
            linewidth=1,
            color=f"C{(i + 5) % 10}",
            zorder=2,
            label=name if name[:1].isdigit() else f"{name} ({cap / 2**30:.1f} GiB)",
        )
    if xs_all and xs_all[-1] > 4 * xs_all[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all)
        ax.set_xticklabels([str(x) for x in xs_all])
        ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("predicted peak memory (GiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
