"""The capacity search: the largest setting whose predicted peak fits a GPU (pure: callables only)."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["Capacity", "largest_fitting"]


def largest_fitting(
    fits: Callable[[int], bool], peak: Callable[[int], float], capacity: float, limit: int
) -> int:
    """The largest ``k`` in ``[1, limit]`` with ``fits(k)``, given ``fits(1)`` and peaks that grow with ``k``.

    Exponential search for a bracket, then bisection inside it. Both are steered by the straight
    line through the last two peaks (peaks are close to linear in batch, and with SDPA in
    sequence length): the line's largest ``k`` under ``capacity`` is probed together with
    ``k + 1``, so a good line answers in 2 probes after the first two. A step where the line
    does not pay off is followed by a plain doubling or bisection step, which keeps the worst
    case logarithmic. Every answer is checked: ``fits(k)`` and ``k == limit or not fits(k + 1)``.
    The callables should memoize (``peak(k)`` is read again for probed ``k``).

    Args:
        fits: whether setting ``k`` fits.
        peak: the predicted peak at ``k`` (``inf`` when unknown).
        capacity: the memory ``fits`` compares against (used only to aim).
        limit: the largest ``k`` to try.

    Returns:
        The largest fitting ``k``, or ``limit`` when that fits.

    Example:
        >>> largest_fitting(lambda k: 3 * k + 10 <= 100, lambda k: 3 * k + 10, 100, 1000)
        30
    """
    lo = 1  # fits(lo)
    hi: int | None = None  # not fits(hi)
    prev: int | None = None  # an earlier fitting k < lo, for the line before a bracket exists
    use_line = True
    while True:
        if hi is None and lo >= limit:
            return limit
        if hi is not None and hi - lo <= 1:
            return lo
        top = limit + 1 if hi is None else hi
        ref: int | None = hi if hi is not None else prev
        guess = None
        if use_line and ref is not None:
            slope = (peak(ref) - peak(lo)) / (ref - lo)
            if slope > 0 and math.isfinite(slope):
                guess = lo + math.floor((capacity - peak(lo)) / slope)
        plain = 2 * lo if hi is None else (lo + hi) // 2
        cand = plain if guess is None else guess
        cand = max(lo + 1, min(cand, top - 1))
        width: int | None = None if hi is None else hi - lo
        closed = False
        if fits(cand):
            prev, lo = lo, cand
            if guess is not None and cand + 1 < top:
                # the line says cand is the largest: one more probe settles it
                if fits(cand + 1):
                    prev, lo = lo, cand + 1
                else:
                    hi, closed = cand + 1, True
        else:
            hi = cand
            if guess is not None and cand - 1 > lo:
                if fits(cand - 1):
                    prev, lo = lo, cand - 1
                    closed = True
                else:
                    hi = cand - 1
        if guess is not None:
            # the line missed: take a plain step next (doubling, or halving the bracket)
            use_line = closed or (width is not None and hi is not None and 2 * (hi - lo) <= width)
        else:
            use_line = True


class Capacity:
    """``fits(k)`` for a capacity in bytes and a memoized ``peak(k)``; None peaks never fit."""

    def __init__(self, capacity: int, peak: Callable[[int], int | None]) -> None:
        self.capacity = capacity
        self._peak = peak

    def peak(self, k: int) -> float:
        p = self._peak(k)
        return math.inf if p is None else float(p)

    def __call__(self, k: int) -> bool:
        p = self._peak(k)
        return p is not None and p <= self.capacity
