"""Refuse plans that the model's FSDP2 wrapping would make wrong (segments spanning FSDP units)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import PlanError
from ..plans import Plan

__all__ = ["check_wrapping", "fsdp_state"]


def fsdp_state(m: nn.Module) -> Any:
    """The FSDP2 state managing ``m`` when ``fully_shard`` was applied to it, else None."""
    if not any(c.__name__ == "FSDPModule" for c in type(m).__mro__):
        return None
    get = getattr(m, "_get_fsdp_state", None)
    return get() if callable(get) else m


def check_wrapping(
    model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], plan: Plan | None
) -> None:
    """Refuse a plan that cannot work with how ``model`` is already wrapped.

    ``gradckpt.enable`` calls this before touching the model.

    Args:
        model: the model being enabled.
        blocks: its blocks, ``[(name, module)]``, in plan order.
        plan: the plan about to be installed.

    Raises:
        GradCkptError: when a segment of ``plan`` spans blocks that FSDP2 sharded as separate
            units (its hooks between the blocks would be skipped by the segment's recompute).

    Example:
        >>> for layer in model.layers:
        ...     fully_shard(layer)
        >>> gradckpt.enable(model, policy="sqrt")  # GradCkptError: ... one by one ...
    """
    if plan is None or not plan.segments:
        return
    for a, b in plan.segments:
        states = [fsdp_state(blk) for _, blk in blocks[a:b]]
        if any(s is not None for s in states) and any(s is not states[0] for s in states):
            raise PlanError(
                f"blocks {blocks[a][0]!r} to {blocks[b - 1][0]!r} are one checkpointed segment "
                f"(policy {plan.policy!r}) but fully_shard was applied to them one by one, so FSDP "
                "hooks sit between them that the segment's recompute would skip. Enable gradckpt "
                "before fully_shard and shard each segment as one unit "
                "(gradckpt.integrations.distributed.parallelize does both), or use a policy "
                "without segments such as 'full'"
            )
