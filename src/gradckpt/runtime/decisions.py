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

from ..errors import BlockError, PolicyError
from ..plans import Decision
from .checkpoint import ContextFn, checkpoint, describe, stateful_modules

__all__ = [
    "override_forward",
    "WRAPPERS",
    "BLOCK_OPTIONS",
    "HEADS",
    "BlockOption",
    "BlockWrapper",
    "HeadInstaller",
    "OPTION_DECISIONS",
    "available",
    "early_stop_option",
    "head_for",
    "recompute_block",
    "refuse_lazy_output",
    "register_block_option",
    "register_decision",
    "register_head",
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


#: ``installer(model, plan_options) -> undo`` for a model-level decision outside the blocks
#: (the plan option ``loss_head``: how the loss is computed from the last hidden states).
HeadInstaller = Callable[[nn.Module, Mapping[str, Any]], Callable[[], None]]

#: The head registry: ``loss_head`` value -> installer (written by ``register_head``).
HEADS: dict[str, HeadInstaller] = {}


def register_head(name: str, installer: HeadInstaller) -> None:
    """Say how plans with ``options["loss_head"] == name`` install their loss head."""
    HEADS[name] = installer


def head_for(name: str) -> HeadInstaller | None:
    """The installer registered for loss head ``name``, or None."""
    return HEADS.get(name)


#: ``installer(name, block, plan_options) -> undo or None`` for a plan option that changes what
#: happens inside checkpointed (RECOMPUTE/OFFLOAD) blocks (``tile_tokens``: sequence tiles).
BlockOption = Callable[[str, nn.Module, Mapping[str, Any]], "Callable[[], None] | None"]

#: The block-option registry: plan option name -> installer (written by ``register_block_option``).
BLOCK_OPTIONS: dict[str, BlockOption] = {}

#: The decisions block options apply to (the ones that recompute the whole block).
OPTION_DECISIONS = frozenset({Decision.RECOMPUTE, Decision.OFFLOAD})


def register_block_option(option: str, installer: BlockOption) -> None:
    """Say how plans with ``options[option]`` change each RECOMPUTE/OFFLOAD block."""
    BLOCK_OPTIONS[option] = installer


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
    early_stop: bool = True,
) -> Any:
    """Checkpoint ``forward(*args, **kwargs)``, passing keyword tensors positionally.

    torch infers the device whose RNG it replays from positional tensors only, and its own
    keyword arguments (``debug``, ``context_fn``...) could collide with a block's; so keyword
    values travel as positional arguments and are put back by name inside. ``name`` (the
    block's qualified name) is what errors about this block say; ``early_stop`` is torch's
    (the plan option ``early_stop``, see ``early_stop_option``).
    """
    names = tuple(kwargs)
    n = len(args)

    def call(*flat: Any) -> Any:
        return forward(*flat[:n], **dict(zip(names, flat[n:])))

    if torch.compiler.is_compiling():
        # No per-block label here: dynamo would guard on the name it is built from and compile
        # every block separately, falling back to eager after recompile_limit (8) blocks.
        return checkpoint(
            call, *args, *kwargs.values(), context_fn=context_fn, early_stop=early_stop
        )
    label = f"block {name!r}" if name else describe(forward)
    call._gradckpt_label = label  # type: ignore[attr-defined]
    out = checkpoint(
        call,
        *args,
        *kwargs.values(),
        stateful_modules=stateful,
        context_fn=context_fn,
        early_stop=early_stop,
    )
    refuse_lazy_output(label, out)
    return out


def early_stop_option(options: Mapping[str, Any]) -> bool:
    """The plan option ``early_stop`` (default True): whether a recompute stops early.

    torch stops a recompute once every tensor the forward saved exists again, by raising
    through the rest of the block's forward; module post-hooks inside the block (other
    libraries' cleanup, e.g. bitsandbytes freeing dequantized weights) then never run during
    the recompute. ``enable(model, policy=..., early_stop=False)`` re-runs whole blocks instead.
    """
    value = options.get("early_stop", True)
    if not isinstance(value, bool):
        raise PolicyError(f"early_stop must be True or False, got {value!r}")
    return value


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
    early_stop = early_stop_option(options)

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return run_checkpointed(
            forward, args, kwargs, stateful=stateful, name=name, early_stop=early_stop
        )

    return checkpointed_forward


def override_forward(block: nn.Module, new_forward: Callable[..., Any]) -> Callable[[], None]:
    """Set ``block.forward`` on the instance; returns the undo (the class's forward, or the previous one)."""
    had = "forward" in block.__dict__
    old = block.__dict__.get("forward")
    block.forward = new_forward  # type: ignore[method-assign]

    def restore() -> None:
        if had:
            block.forward = old  # type: ignore[method-assign,assignment]
        else:
            block.__dict__.pop("forward", None)

    return restore
