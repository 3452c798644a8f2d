"""``enable`` / ``disable``: the verb users call (policy | budget | plan -> Plan -> install)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from .apply import applied_plan, check_plan, install, uninstall
from .blocks import BlockSpec, resolve_blocks
from .errors import ConfigError, PlanError, PolicyError
from .planner.api import plan_for_budget
from .plans import Plan
from .policies import make_plan
from .runtime.chunked_loss import check_head_options, head_options
from .runtime.offload import offload_options
from .runtime.tiles import tile_options

__all__ = ["applied_plan", "disable", "enable"]


def enable(
    model: nn.Module,
    policy: str | None = None,
    *,
    budget: int | str | None = None,
    plan: Plan | None = None,
    blocks: BlockSpec = None,
    **options: Any,
) -> Plan:
    """Checkpoint ``model``'s blocks according to a policy, a memory budget, or a saved plan.

    Args:
        model: any ``nn.Module`` with repeated blocks (Hugging Face models included).
        policy: ``"none"``, ``"full"``, ``"every:K"``, ``"sqrt"``... (``gradckpt.policy_names()``);
            default ``"full"`` when neither ``budget`` nor ``plan`` is given.
        budget: memory budget (``"20GiB"`` or bytes): the cheapest plan whose peak fits.
        plan: a ``Plan`` made earlier (e.g. loaded with ``Plan.from_json``).
        blocks: which modules are blocks: names or a predicate ``(name, module) -> bool``
            (default: ``find_blocks(model)``).
        **options: policy options (e.g. ``save_ops`` for ``selective``), and for any policy:
            ``offload_saved=True`` moves the tensors that non-recomputed (SAVE) blocks keep for
            backward to host memory; ``offload_min_bytes`` (default 1 MiB) is the smallest
            tensor moved by it and by OFFLOAD blocks; ``early_stop=False`` re-runs whole blocks
            in the recompute (default True: torch stops once the saved tensors exist again);
            ``loss_head="chunked"`` computes a causal LM's loss ``loss_chunk`` tokens at a time so
            full logits never exist (``runtime.chunked_loss``; ``keep_logits=True`` still returns them);
            ``tile_tokens=N`` (or ``tiles=True``) runs the MLP of RECOMPUTE/OFFLOAD blocks over
            sequence tiles of N tokens, each checkpointed (``runtime.tiles``); with it
            ``tile_norms=True`` and ``tile_proj=True`` tile the norms and the attention
            projections too.

    Returns:
        The installed ``Plan``. A second ``enable`` replaces the first.

    Example:
        >>> plan = gradckpt.enable(model, policy="every:2")
        >>> print(plan.summary())
        every:2: 4 recompute, 4 save
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"enable needs an nn.Module, got {type(model).__name__}")
    given = [
        k for k, v in (("policy", policy), ("budget", budget), ("plan", plan)) if v is not None
    ]
    if len(given) > 1:
        raise PolicyError(f"give one of policy=, budget= or plan=, not {' and '.join(given)}")
    offloading = offload_options(options)  # any policy, budget or plan can add these
    offloading.update(head_options(options))  # loss_head="chunked", loss_chunk, keep_logits
    offloading.update(tile_options(options))  # tile_tokens=N (or tiles=True)
    lazy_budget = None
    if plan is not None:
        if not isinstance(plan, Plan):
            raise PlanError(f"plan= must be a gradckpt.Plan, got {type(plan).__name__}")
        if options:
            raise PolicyError("options are part of the plan; do not pass them with plan=")
        if blocks is None:
            modules = dict(model.named_modules())
            check_plan(plan, [b for b in plan.blocks if b in modules])
            blocks = list(plan.blocks)
        found = resolve_blocks(model, blocks)
    elif budget is not None:
        found = resolve_blocks(model, blocks)
        # the offloading, head and tile options given are part of what the planner profiles
        plan, lazy_budget = plan_for_budget(model, budget, blocks=found, **options, **offloading)
    else:
        found = resolve_blocks(model, blocks)
        plan = make_plan("full" if policy is None else policy, [n for n, _ in found], **options)
    if offloading:
        plan = replace(plan, options={**plan.options, **offloading})
    check_head_options(plan.options)

    state = install(model, plan, found)
    if lazy_budget is not None:  # no example: profile the first step, then re-plan
        try:
            state.restores.append(lazy_budget.install(model))
            state.pending = lazy_budget
        except BaseException:
            uninstall(model)
            raise
    return plan


def disable(model: nn.Module) -> None:
    """Remove gradckpt from ``model``: the model is exactly what it was before ``enable``.

    Calling it on a model without gradckpt does nothing.
    """
    uninstall(model)
