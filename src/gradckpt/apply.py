"""Install a Plan on a model by overriding each block's ``forward``; ``uninstall`` undoes it exactly.

This is the only code that touches ``block.forward``. No wrapper modules are added, so
``state_dict()`` keys, ``named_parameters()`` and Hugging Face ``save_pretrained`` output are
the same with and without gradckpt. The checkpoint wraps the block's ``forward`` (not
``__call__``), so module hooks such as FSDP2's all-gather stay outside the recomputed region
and do not run twice (the same choice transformers makes for its layers).

Deciding *what* to install (a policy, a budget, a saved plan) is ``enable``'s job, one layer up.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import BlockError, PlanError
from .guards.prepare import prepare_model
from .plans import Decision, Plan
from .runtime import decisions
from .runtime.checkpoint import stateful_modules
from .runtime.decisions import override_forward
from .runtime.segments import SegmentRun, closer, segment_forward

__all__ = ["Installed", "applied_plan", "check_plan", "install", "installed", "uninstall"]


@dataclass
class Installed:
    """What ``install`` did to one model, and how to undo it.

    Attributes:
        plan: the installed plan.
        restores: undo functions, run in reverse order by ``uninstall``.
        segments: the open-region state of each segment (policy ``sqrt``).
        pending: the planner's lazy budget while it waits for the first training step
            (``enable(model, budget=...)`` without ``example=``), else None.
    """

    plan: Plan
    restores: list[Callable[[], None]] = field(default_factory=list)
    segments: list[SegmentRun] = field(default_factory=list)
    pending: Any = None


_INSTALLED: weakref.WeakKeyDictionary[nn.Module, Installed] = weakref.WeakKeyDictionary()


def installed(model: nn.Module) -> Installed | None:
    """The ``Installed`` handle of ``model``, or None when gradckpt is not on it."""
    return _INSTALLED.get(model)


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan currently installed on ``model`` by ``enable``, or None."""
    state = _INSTALLED.get(model)
    return None if state is None else state.plan


def check_plan(plan: Plan, names: list[str]) -> None:
    """Refuse ``plan`` unless its blocks are exactly ``names``, in order."""
    if list(plan.blocks) != names:
        missing = [b for b in plan.blocks if b not in names]
        raise PlanError(
            "plan does not match the model's blocks"
            + (f": no block named {missing[0]!r}" if missing else "")
            + f" (plan has {len(plan.blocks)} blocks); make the plan for this model"
        )


def _check_installable(plan: Plan, found: Sequence[tuple[str, nn.Module]]) -> None:
    head = plan.options.get("loss_head")
    if head is not None and decisions.head_for(head) is None:
        raise PlanError(f"loss head {head!r} has no registered installer")
    for d in set(plan.decisions) - {Decision.SAVE}:
        if decisions.wrapper_for(d) is None:
            raise PlanError(f"decision {d.value!r} has no registered block wrapper")
    for (name, block), decision in zip(found, plan.decisions):
        fwd = block.forward
        lazy = inspect.isgeneratorfunction(fwd) or inspect.isasyncgenfunction(fwd)
        if decision is not Decision.SAVE and (lazy or inspect.iscoroutinefunction(fwd)):
            raise BlockError(
                f"block {name!r} ({type(block).__name__}) has a generator or async forward: "
                "its code runs after the call returns, outside any checkpoint; leave it out "
                "with blocks= or keep its activations (Decision.SAVE)"
            )
        if decision is not Decision.SAVE and callable(getattr(block, "backward_pass", None)):
            # Reversible layers (RevNet; transformers' ReformerLayer): the model calls them
            # inside its own autograd.Function, under no_grad, and backward_pass rebuilds their
            # inputs from their outputs and recomputes them. They keep no activations, so a
            # checkpoint around their forward has nothing to save and is never recomputed.
            raise BlockError(
                f"block {name!r} ({type(block).__name__}) is a reversible layer: its model "
                "runs it without recording gradients and recomputes it in its own backward "
                f"({type(block).__name__}.backward_pass), so it keeps no activations and "
                "checkpointing it saves nothing; use policy='none' (reversible layers already "
                "use the memory checkpointing would give) or leave it out with blocks="
            )


def install(model: nn.Module, plan: Plan, found: Sequence[tuple[str, nn.Module]]) -> Installed:
    """Install ``plan`` on ``model``'s blocks ``found`` (replacing whatever gradckpt had there).

    Everything is checked before the model is touched, so a refused plan leaves nothing
    half-applied; if installing fails midway, what was done is undone.

    Returns:
        The ``Installed`` handle (also kept per model: ``installed(model)``).
    """
    check_plan(plan, [n for n, _ in found])
    _check_installable(plan, found)
    uninstall(model)
    state = Installed(plan=plan)
    try:
        state.restores.append(prepare_model(model, found, plan))
        head = plan.options.get("loss_head")
        if head is not None:
            installer = decisions.head_for(head)
            if installer is not None:
                state.restores.append(installer(model, plan.options))
        in_segment = {i for a, b in plan.segments for i in range(a, b)}
        for i, ((name, block), decision) in enumerate(zip(found, plan.decisions)):
            if i in in_segment or (
                decision is Decision.SAVE and not plan.options.get("offload_saved")
            ):
                continue
            wrapper = decisions.wrapper_for(decision)
            if wrapper is None:  # SAVE with offload_saved before offload is registered
                raise PlanError(f"decision {decision.value!r} has no registered block wrapper")
            wrapped = wrapper(name, block, block.forward, plan.options)
            state.restores.append(override_forward(block, wrapped))
        for option, add in decisions.BLOCK_OPTIONS.items():
            if option not in plan.options:
                continue
            for (name, block), decision in zip(found, plan.decisions):
                if decision in decisions.OPTION_DECISIONS:
                    undo = add(name, block, plan.options)
                    if undo is not None:
                        state.restores.append(undo)
        for a, b in plan.segments:
            seg_blocks = [blk for _, blk in found[a:b]]
            run = SegmentRun(
                names=[n for n, _ in found[a:b]],
                forwards=[blk.forward for blk in seg_blocks],
                stateful=stateful_modules(seg_blocks),
                early_stop=decisions.early_stop_option(plan.options),
            )
            run.peers = state.segments  # shared: each run sees every segment of the model
            state.segments.append(run)
            for j, blk in enumerate(seg_blocks):
                state.restores.append(override_forward(blk, segment_forward(run, j)))
        if state.segments:
            # A segment's region stays open from its first block to its last; an exception
            # raised by the model's own code between two of them would leave the region's
            # saved-tensor hooks on the stack, catching every tensor saved afterwards (and
            # holding the region's inputs) until the next forward. Close it when the model's
            # forward ends, however it ends.
            handle = model.register_forward_hook(closer(state.segments), always_call=True)
            state.restores.append(handle.remove)
    except BaseException:
        for restore in reversed(state.restores):
            restore()
        raise
    _INSTALLED[model] = state
    return state


def uninstall(model: nn.Module) -> None:
    """Remove gradckpt from ``model``: the model is exactly what it was before ``install``.

    Calling it on a model without gradckpt does nothing.
    """
    state = _INSTALLED.pop(model, None)
    if state is None:
        return
    for run in state.segments:
        run.abort()
    for restore in reversed(state.restores):
        restore()
