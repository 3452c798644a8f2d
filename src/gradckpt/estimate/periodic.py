"""Periodic plans: which few blocks stand in for a deep model's step (pure: plans and names only).

Blocks of a decoder are identical, so the timeline of an L-block model is the timeline of a
few-block model with its middle blocks repeated. ``estimate`` therefore runs the first period of
blocks, one more period (one block each for ``none``/``full``, K for ``every:K``) and the last
block, and replays the second period to reach L blocks; the result equals a full-depth run byte
for byte (checked in tests). Plans that are not periodic (``sqrt`` segments, planner plans)
run at full depth.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..plans import Decision, Plan

__all__ = ["MAX_PERIOD", "block_names_at_depth", "period_of", "reduced_layout"]

_BLOCK_NAME = re.compile(r"^(.*?)(\d+)$")
MAX_PERIOD = 6


def block_names_at_depth(small_names: Sequence[str], depth: int) -> list[str] | None:
    """Names of the blocks of the ``depth``-layer model, from those of a smaller build."""
    prefixes = set()
    for i, name in enumerate(small_names):
        m = _BLOCK_NAME.match(name)
        if not m or int(m.group(2)) != i:
            return None
        prefixes.add(m.group(1))
    if len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    return [f"{prefix}{i}" for i in range(depth)]


def period_of(plan: Plan, types: list[Any] | None) -> int | None:
    """Smallest P such that blocks P..L-2 repeat with period P (decisions and layer types).

    None when the plan has segments or no period up to ``MAX_PERIOD`` (run at full depth).
    """
    if plan.segments:
        return None
    L = len(plan)
    keys = [(d, None if types is None else types[i]) for i, d in enumerate(plan.decisions)]
    for p in range(1, MAX_PERIOD + 1):
        if all(keys[i] == keys[p + (i - p) % p] for i in range(p, L - 1)):
            return p
    return None


def reduced_layout(
    plan: Plan, types: list[Any] | None
) -> tuple[list[int], list[Decision], list[Any] | None] | None:
    """How to run ``plan`` on a small model: ``(order, small decisions, small layer types)``.

    The small model has ``2P + 1`` blocks: the first period as is, one period of middle blocks
    (replayed), and the last block. The first period stays un-replayed because tensors shared
    by all blocks of a kind (the rotary tables, each layer type's mask) are freed in the
    backward of the first block that uses them. ``order[i]`` is the small-model block standing
    in for block i. None: run at full depth.
    """
    L = len(plan)
    p = period_of(plan, types)
    if p is None or 2 * p + 1 >= L:
        return None
    idx = [*range(2 * p), L - 1]
    order = [*range(p)] + [p + (i - p) % p for i in range(p, L - 1)] + [2 * p]
    decisions = [plan.decisions[i] for i in idx]
    small_types = None if types is None else [types[i] for i in idx]
    return order, decisions, small_types
