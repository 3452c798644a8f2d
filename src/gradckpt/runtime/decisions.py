"""Decisions -> block wrappers: the registry, ``run_checkpointed`` and the RECOMPUTE wrapper.

A wrapper turns a block's ``forward`` into the forward its decision asks for
(``wrapper(name, block, forward, plan_options) -> new_forward``). RECOMPUTE is defined here;
SELECTIVE and OFFLOAD (and SAVE with ``offload_saved``) live in their own modules and are
registered explicitly by ``runtime.builtin.register_builtin``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import BlockError
from ..plans import Decision
from .checkpoint import ContextFn, checkpoint, describe, stateful_modules

__all__ = [
    "WRAPPERS",
    "BlockWrapper",
    "available",
    "recompute_block",
    "refuse_lazy_output",
    "register_decision",
    "run_checkpointed",
    "wrapper_for",
]

#: ``wrapper(name, block, forward, plan_options) -> new_forward`` for one decision.
BlockWrapper = Callable[[str, nn.Module, Callable[..., Any], Mapping[str, Any]], Callable[..., Any]]

#: The registry: decision -> wrapper (written by ``register_decision``; tests patch entries).
WRAPPERS: dict[Decision, BlockWrapper] = {}


def register_decision(decision: Decision, wrapper: BlockWrapper) -> None:
    """Say how blocks with ``decision`` are wrapped (one call per decision, see ``builtin``)."""
    WRAPPERS[decision] = wrapper


def wrapper_for(decision: Decision) -> BlockWrapper | None:
    """The wrapper registered for ``decision``, or None."""
    return WRAPPERS.get(decision)


def available() -> list[Decision]:
    """Decisions with a registered wrapper (SAVE always: it needs none)."""
    return [Decision.SAVE, *(d for d in Decision if d in WRAPPERS and d is not Decision.SAVE)]


def run_checkpointed(
    forward: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    stateful: list[nn.Module],
    context_fn: ContextFn | None = None,
    name: str | None = None,
) -> Any:
    """Checkpoint ``forward(*args, **kwargs)``, passing keyword tensors positionally.

    torch infers the device whose RNG it replays from positional tensors only, and its own
    keyword arguments (``debug``, ``context_fn``...) could collide with a block's; so keyword
    values travel as positional arguments and are put back by name inside. ``name`` (the
    block's qualified name) is what errors about this block say.
    """
    names = tuple(kwargs)
    n = len(args)

    def call(*flat: Any) -> Any:
        return forward(*flat[:n], **dict(zip(names, flat[n:])))

    if torch.compiler.is_compiling():
        # No per-block label here: dynamo would guard on the name it is built from and compile
        # every block separately, falling back to eager after recompile_limit (8) blocks.
        return checkpoint(call, *args, *kwargs.values(), context_fn=context_fn)
    label = f"block {name!r}" if name else describe(forward)
    call._gradckpt_label = label  # type: ignore[attr-defined]
    out = checkpoint(call, *args, *kwargs.values(), stateful=stateful, context_fn=context_fn)
    refuse_lazy_output(label, out)
    return out


def refuse_lazy_output(label: str, out: Any) -> None:
    # A generator's body runs when it is iterated, after the checkpointed region has closed: its
    # tensors would be neither checkpointed nor recomputed, so such blocks are refused.
    if inspect.isgenerator(out) or inspect.isasyncgen(out) or inspect.iscoroutine(out):
        raise BlockError(
            f"{label} returned a {type(out).__name__}: its code would run after the checkpoint "
            "has closed; gradckpt checkpoints blocks that return tensors (or tuples, lists, "
            "dicts of them): return a list instead, or leave this block out with blocks="
        )


def recompute_block(
    name: str, block: nn.Module, forward: Callable[..., Any], options: Mapping[str, Any]
) -> Callable[..., Any]:
    stateful = stateful_modules([block])

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return run_checkpointed(forward, args, kwargs, stateful=stateful, name=name)

    return checkpointed_forward
