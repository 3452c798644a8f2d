"""Analysis of the measured rows (pure): frontier verdicts, the Pareto front, derived numbers."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def iqr(xs: Sequence[float]) -> float:
    if len(xs) < 4:
        return (max(xs) - min(xs)) if len(xs) > 1 else 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def frontier_verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each peer point: the cheapest gradckpt point that fits its memory, and the verdict.

    Like is compared with like: an eager peer with gradckpt's eager rows, a compiled peer
    (``compiled: True``) with gradckpt's compiled rows (gradckpt then ``torch.compile``), since
    compiling is a separate choice a user makes with or without gradckpt.
    The best such point is the one with the least speed cost. The margin is how much slower it
    is than the peer: the median over rounds of the difference of the two per-round ratios
    (paired: both ran in the same round) when the rows carry ``ratios``, else the difference of
    their speed costs; the noise is half the interquartile range of those paired differences
    (else half the sum of the two rows' ``speed_cost_iqr``). A peer is *dominated* when the
    margin is <= 0, *within noise* when it is at most the noise, else *not dominated*. Pure.

    Args:
        rows: result rows with ``label``, ``family``, ``peak_bytes``, ``speed_cost``,
            ``speed_cost_iqr``, optionally ``compiled`` and ``ratios`` (per round, to ``none``).

    Returns:
        One dict per peer row: ``peer``, ``peer_peak_bytes``, ``peer_cost``, ``best`` (label or
        None), ``best_peak_bytes``, ``best_cost``, ``margin``, ``noise``, ``paired`` and
        ``verdict`` (``"dominated"``, ``"within noise"``, ``"not dominated"``,
        ``"nothing fits"``).

    Example:
        >>> frontier_verdicts([
        ...     {"label": "full", "family": "gradckpt", "peak_bytes": 10, "speed_cost": 0.3, "speed_cost_iqr": 0},
        ...     {"label": "hf", "family": "peer", "peak_bytes": 10, "speed_cost": 0.35, "speed_cost_iqr": 0},
        ... ])[0]["verdict"]
        'dominated'
    """
    ours = [r for r in rows if r["family"] == "gradckpt"]
    out = []
    for p in rows:
        if p["family"] != "peer":
            continue
        fits = [
            g
            for g in ours
            if g["peak_bytes"] <= p["peak_bytes"]
            and bool(g.get("compiled")) == bool(p.get("compiled"))
        ]
        v: dict[str, Any] = {
            "peer": p["label"],
            "peer_peak_bytes": p["peak_bytes"],
            "peer_cost": p["speed_cost"],
            "best": None,
            "best_peak_bytes": None,
            "best_cost": None,
            "margin": None,
            "noise": None,
            "paired": False,
            "verdict": "nothing fits",
        }
        if fits:
            best = min(fits, key=lambda g: (g["speed_cost"], g["peak_bytes"]))
            rb, rp = best.get("ratios"), p.get("ratios")
            paired = bool(rb and rp and len(rb) == len(rp) and len(rb) >= 2)
            if paired:
                diffs = [a - b for a, b in zip(rb, rp)]  # type: ignore[arg-type]
                margin = statistics.median(diffs)
                noise = iqr(diffs) / 2
            else:
                margin = best["speed_cost"] - p["speed_cost"]
                noise = (best.get("speed_cost_iqr", 0.0) + p.get("speed_cost_iqr", 0.0)) / 2
            verdict = (
                "dominated"
                if margin <= 0
                else "within noise"
                if margin <= noise
                else "not dominated"
            )
            v.update(
                best=best["label"],
                best_peak_bytes=best["peak_bytes"],
                best_cost=best["speed_cost"],
                margin=margin,
                noise=noise,
                paired=paired,
                verdict=verdict,
            )
        out.append(v)
    return out


def pareto(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both peak bytes and speed cost, by increasing cost."""
    best: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda r: (r["speed_cost"], r["peak_bytes"])):
        if not best or p["peak_bytes"] < best[-1]["peak_bytes"]:
            best.append(p)
    return best


def refresh(res: dict[str, Any]) -> dict[str, Any]:
    """Recompute what is derived from the measurements (per-round ratios, frontier verdicts)."""
    clock = res["settings"].get("clock", "wall")
    key = "cpu_times_s" if clock == "cpu" else "times_s"
    base = next(r for r in res["rows"] if r["label"] == "none")[key]
    for r in res["rows"]:
        r["ratios"] = [t / b for t, b in zip(r[key], base)]
    res["frontier"] = frontier_verdicts(res["rows"])
    return res
