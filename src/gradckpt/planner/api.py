"""``gradckpt.plan`` and ``enable(budget=...)``: profile one step on an example (or lazily, ``lazy.py``), then solve."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .._model_io import batch_of, call_model, default_loss
from ..errors import BudgetError, ConfigError
from ..plans import Decision, Plan
from ..units import format_bytes, parse_bytes
from .lazy import LazyBudget
from .model import StepProfile
from .profile import profile_step
from .solve import auto_plan

__all__ = [
    "LONG_CONTEXT_STEPS",
    "LazyBudget",
    "auto_plan",
    "plan",
    "plan_for_budget",
    "profile_model",
    "resolve_budget",
]

LossFn = Callable[[Any], torch.Tensor]

#: What a budget plan adds, step by step, when no choice of per-block decisions fits: the
#: chunked loss head (full logits never exist; costs one more ``lm_head`` forward), then
#: sequence tiles in the blocks' MLP, norms and attention projections (runtime.tiles; one more
#: projection forward per block). Each step's gradients are equal within rounding, not
#: bit-identical (``verify``'s tolerance); the plan's ``notes["long_context"]`` says which
#: were added. An option the caller gave is kept as given.
LONG_CONTEXT_STEPS: tuple[dict[str, Any], ...] = (
    {"loss_head": "chunked", "loss_head_optional": True},
    {"tile_tokens": 4096, "tile_norms": True, "tile_proj": True},
)


def _profile_and_solve(
    model: nn.Module,
    budget: int,
    example: Any,
    *,
    blocks: Sequence[tuple[str, nn.Module]],
    loss_fn: LossFn | None,
    options: dict[str, Any],
    decisions: Sequence[Decision] | None = None,
) -> Plan:
    """The cheapest plan that fits, adding ``LONG_CONTEXT_STEPS`` one by one while none does."""
    opts = dict(options)
    added: list[str] = []
    steps = [s for s in LONG_CONTEXT_STEPS if not any(k in opts for k in s)]
    while True:
        prof = profile_model(
            model, example, blocks=blocks, loss_fn=loss_fn, options=opts, decisions=decisions
        )
        try:
            plan = auto_plan(prof, budget, opts)
        except BudgetError as e:
            if not steps:
                if added:
                    raise BudgetError(f"{e} (with {' and '.join(added)})") from None
                raise
            step = steps.pop(0)
            opts = {**step, **opts}
            added.append("the chunked loss head" if "loss_head" in step else "sequence tiles")
            continue
        if added:
            plan = replace(plan, notes={**plan.notes, "long_context": ", ".join(added)})
        return plan


def resolve_budget(budget: int | str, *, reference: int | None = None) -> int:
    """Bytes from ``"20GiB"``/``"20GB"``/int, or ``"60%"`` of ``reference`` (e.g. none's peak)."""
    if isinstance(budget, str) and budget.strip().endswith("%"):
        if reference is None:
            raise BudgetError(
                f"budget {budget!r} is a percentage, but of nothing: give bytes, e.g. '20GiB'"
            )
        try:
            pct = float(budget.strip()[:-1])
        except ValueError:
            raise BudgetError(f"budget {budget!r} is not a percentage like '60%'") from None
        if not 0 < pct <= 1000:
            raise BudgetError(f"budget percentage must be in (0, 1000], got {budget!r}")
        return int(reference * pct / 100)
    return parse_bytes(budget, what="budget")


def profile_model(
    model: nn.Module,
    example: Any,
    *,
    blocks: Sequence[tuple[str, nn.Module]],
    loss_fn: LossFn | None = None,
    options: dict[str, Any] | None = None,
    decisions: Sequence[Decision] | None = None,
) -> StepProfile:
    """Profile one forward+backward of ``model`` on ``example`` (gradients and RNG restored).

    ``decisions``: those to offer (default: what the model's device allows; the estimator's
    fake model, which stands for a CUDA device, offers OFFLOAD too).
    """
    if example is None:
        raise ConfigError("profiling needs an example batch (example=...)")
    loss_of = loss_fn or default_loss

    def step() -> None:
        loss_of(call_model(model, example)).backward()

    return profile_step(
        model, step, blocks, decisions=decisions, options=options, batch=batch_of(example)
    )


def plan(
    model: nn.Module,
    budget: int | str,
    example: Any,
    *,
    blocks: Any = None,
    loss_fn: LossFn | None = None,
    decisions: Sequence[Decision] | None = None,
    **options: Any,
) -> Plan:
    """The cheapest plan whose predicted peak fits ``budget``, from one profiled step on ``example``.

    Args:
        model: the model to train (its gradients, buffers and RNG state are left as they were).
        budget: device memory for the step: ``"20GiB"``, ``"20GB"``, ``"512MiB"`` or int bytes.
        example: one training batch: a dict of keyword inputs, a tuple of positional ones, or a tensor.
        blocks: as for ``enable`` (default: ``find_blocks``).
        loss_fn: ``loss_fn(output) -> loss`` (default: ``output.loss``, else ``output.sum()``).
        decisions: the decisions to choose from (default: all the model's device allows).
        **options: plan options for the decisions (e.g. ``save_ops``).

    Returns:
        A ``Plan`` (policy ``"auto"``) with the predicted peak and extra time in ``plan.notes``.
        When no per-block plan fits, the chunked loss head and then sequence tiles are added
        (``LONG_CONTEXT_STEPS``; ``notes["long_context"]`` says which).

    Raises:
        BudgetError: nothing fits, even with those; says the smallest achievable peak and the
            batch that would fit.

    Example:
        >>> p = gradckpt.plan(model, "12GiB", example=batch)
        >>> gradckpt.enable(model, plan=p)
    """
    from ..blocks import resolve_blocks

    found = resolve_blocks(model, blocks)
    b = resolve_budget(budget)
    return _profile_and_solve(
        model, b, example, blocks=found, loss_fn=loss_fn, options=options, decisions=decisions
    )


def plan_for_budget(
    model: nn.Module,
    budget: int | str,
    *,
    blocks: Sequence[tuple[str, nn.Module]],
    example: Any = None,
    loss_fn: LossFn | None = None,
    **options: Any,
) -> tuple[Plan, LazyBudget | None]:
    """What ``enable(budget=...)`` installs: the solved plan, or ``full`` plus a lazy profiler.

    Without ``example``, the first training step runs under ``full`` (the leanest standard plan)
    while it is profiled, and the solved plan replaces it at the start of the second step.
    """
    b = resolve_budget(budget)
    _refuse_below_weights(model, b)
    if example is not None:
        plan = _profile_and_solve(
            model, b, example, blocks=blocks, loss_fn=loss_fn, options=options
        )
        return plan, None
    if loss_fn is not None:
        raise ConfigError(
            "loss_fn= is only used with example=; the lazy profile watches the real step"
        )
    names = tuple(n for n, _ in blocks)
    provisional = Plan(
        names,
        (Decision.RECOMPUTE,) * len(names),
        policy="full",
        options=dict(options),
        notes={"budget_bytes": b, "pending": "profiling the first training step"},
    )
    return provisional, LazyBudget(b, list(blocks), dict(options))


def _refuse_below_weights(model: nn.Module, budget: int) -> None:
    """Refuse at once a budget below what the step must hold whatever the plan: weights, buffers
    and one gradient per trainable weight (known before any step runs; the lazy planner used to
    find out only at the second step)."""
    seen: set[int] = set()
    held = 0
    dev = next((p.device for p in model.parameters()), None)
    if dev is None or dev.type == "meta":
        return
    for t in [*model.parameters(), *model.buffers()]:
        if t.device != dev:
            continue
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            held += st.nbytes()
        if isinstance(t, nn.Parameter) and t.requires_grad:
            held += t.numel() * t.element_size()
    if budget < held:
        raise BudgetError(
            f"budget {format_bytes(budget)} is below the {format_bytes(held)} the model's weights, "
            "buffers and gradients take before any activation, so the smallest achievable peak "
            "is above it whatever the plan; raise the budget, freeze weights (LoRA) or shard "
            "them (FSDP2)"
        )
