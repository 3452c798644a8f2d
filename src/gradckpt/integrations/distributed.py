"""DDP and FSDP2 with gradckpt, in the order that works: checkpointing, then torch.compile, then sharding.

Why this order (the same as torchtitan's ``parallelize_llama``):

1. **Checkpointing first.** gradckpt overrides each block's ``forward`` on the instance, so the
   checkpoint sits *inside* the module's ``__call__``: FSDP2's pre-forward all-gather and
   post-forward reshard hooks stay outside the recomputed region and run once per forward,
   and the recompute during backward runs after FSDP2's pre-backward hook has all-gathered
   the parameters again. Parameter names do not change, so sharded checkpoints load as usual.
2. **Then torch.compile, per block** (``block.compile()``, FQNs unchanged). Compiling sees the
   checkpoint and turns it into the compiler's own recompute; all blocks share one compiled
   graph.
3. **Then FSDP2 ``fully_shard``** (blocks first, then the root) **or DDP**. A plan's segments
   (policy ``sqrt``: several blocks checkpointed as one unit) are sharded as one FSDP unit: a
   segment's recompute replays its blocks' ``forward`` without the hooks between them, which
   is only right when no FSDP hook sits between them.

Applied in another order: ``enable`` on a DDP-wrapped model works (DDP hooks parameters, not
blocks; block names then start with ``module.``), and so does ``enable`` after ``fully_shard``
for plans without segments; a plan whose segment spans blocks sharded as separate FSDP units
is refused with a ``GradCkptError`` (``check_wrapping``). ``parallelize`` does all three
steps in order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..enable import enable
from ..errors import ConfigError, GradCkptError
from ..guards.fsdp import fsdp_state
from ..plans import Plan

__all__ = ["fsdp_units", "parallelize"]


def fsdp_units(model: nn.Module, plan: Plan) -> list[list[nn.Module]]:
    """The module groups to pass to ``fully_shard`` one by one: a segment's blocks together.

    Args:
        model: the model ``plan`` was enabled on.
        plan: the installed plan (``gradckpt.applied_plan(model)``).

    Returns:
        One list per FSDP unit, in block order: ``[[b0, b1, b2], [b3, b4, b5], [b6, b7]]`` for
        ``sqrt`` on 8 blocks, ``[[b0], [b1], ...]`` for ``full``.

    Example:
        >>> for unit in fsdp_units(model, plan):
        ...     fully_shard(unit if len(unit) > 1 else unit[0])
        >>> fully_shard(model)
    """
    modules = dict(model.named_modules())
    missing = [n for n in plan.blocks if n not in modules]
    if missing:
        raise GradCkptError(
            f"plan names block {missing[0]!r} that {type(model).__name__} does not have; "
            "pass the model the plan was enabled on"
        )
    starts = {a: b for a, b in plan.segments}
    units: list[list[nn.Module]] = []
    i = 0
    while i < len(plan.blocks):
        stop = starts.get(i, i + 1)
        units.append([modules[n] for n in plan.blocks[i:stop]])
        i = stop
    return units


def _wrapped(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        cls = type(m).__name__
        if cls in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
            return f"{name or 'the model'} is already wrapped in {cls}"
        if fsdp_state(m) is not None:
            return f"{name or 'the model'} is already sharded by fully_shard"
        if cls == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None:
            return f"{name or 'the model'} is already compiled"
    return None


def _plan_everywhere(
    model: nn.Module,
    policy: str | None,
    budget: int | str | None,
    plan: Plan | None,
    blocks: Any,
    options: dict[str, Any],
) -> Plan:
    """``enable`` on every rank with one plan: a budget with an example is planned on rank 0.

    A plan from a budget depends on profiling, which could differ by a few bytes between
    ranks; one plan for all keeps every rank's memory and recompute the same. A budget without
    ``example=`` is planned from each rank's own first training step (the planner's lazy mode),
    which cannot be shared before training starts.
    """
    import torch.distributed as dist

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if budget is None or not multi or options.get("example") is None:
        return enable(model, policy, budget=budget, plan=plan, blocks=blocks, **options)
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = enable(model, budget=budget, blocks=blocks, **options).to_dict()
        except GradCkptError as e:
            payload[0] = {"error": str(e)}  # every rank raises, none waits forever
            dist.broadcast_object_list(payload, src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    if "error" in payload[0]:
        raise GradCkptError(f"rank 0 could not plan for budget {budget!r}: {payload[0]['error']}")
    shared = Plan.from_dict(payload[0])
    if dist.get_rank() == 0:
        return shared
    return enable(model, plan=shared, blocks=blocks)


def parallelize(
    model: nn.Module,
    policy: str | None = None,
    *,
    budget: int | str | None = None,
    plan: Plan | None = None,
    blocks: Any = None,
    compile: bool | dict[str, Any] = False,
    data_parallel: str | None = "fsdp2",
    mesh: Any = None,
    fsdp_kwargs: dict[str, Any] | None = None,
    ddp_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[nn.Module, Plan]:
    """Checkpoint, compile and shard ``model`` in that order (see this module's docstring).

    Args:
        model: the bare model (not yet wrapped, sharded or compiled), on its training device.
        policy, budget, plan, blocks, **options: as for ``gradckpt.enable``. With a budget
            under ``torch.distributed``, rank 0 makes the plan and every rank applies it.
        compile: ``True`` or ``torch.compile`` keyword arguments to compile each block in place.
        data_parallel: ``"fsdp2"`` (``fully_shard`` on each unit of ``fsdp_units``, then on the
            root), ``"ddp"`` (``DistributedDataParallel``) or ``None``.
        mesh: the ``DeviceMesh`` for ``fully_shard`` (default: all ranks).
        fsdp_kwargs: more keyword arguments for ``fully_shard`` (``mp_policy``...).
        ddp_kwargs: keyword arguments for ``DistributedDataParallel``.

    Returns:
        ``(model, plan)``: the model to train (the same object for FSDP2, the DDP wrapper for
        DDP) and the installed plan.

    Raises:
        GradCkptError: when ``model`` is already wrapped, sharded or compiled, or
            ``data_parallel`` is unknown.

    Example:
        >>> dist.init_process_group("nccl")
        >>> model, plan = parallelize(model, "full", compile=True, data_parallel="fsdp2")
        >>> optimizer = torch.optim.AdamW(model.parameters())
    """
    if data_parallel not in ("fsdp2", "ddp", None):
        raise ConfigError(f"data_parallel must be 'fsdp2', 'ddp' or None, got {data_parallel!r}")
    problem = _wrapped(model)
    if problem is not None:
        raise ConfigError(
            f"parallelize needs the bare model, but {problem}: call it before DDP, fully_shard "
            "and torch.compile (it applies them itself, in the order checkpointing, compile, "
            "sharding)"
        )
    # 1. checkpointing
    installed = _plan_everywhere(model, policy, budget, plan, blocks, options)
    # 2. compile each block in place, so parameter names do not change
    if compile:
        kw = dict(compile) if isinstance(compile, dict) else {}
        modules = dict(model.named_modules())
        for name in installed.blocks:
            modules[name].compile(**kw)
    # 3. shard or replicate
    if data_parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        kw = dict(fsdp_kwargs or {})
        if mesh is not None:
            kw["mesh"] = mesh
        for unit in fsdp_units(model, installed):
            fully_shard(unit if len(unit) > 1 else unit[0], **kw)
        fully_shard(model, **kw)
        return model, installed
    if data_parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        kw = dict(ddp_kwargs or {})
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cuda" and "device_ids" not in kw:
            kw["device_ids"] = [device.index]
        return DistributedDataParallel(model, **kw), installed
    return model, installed
