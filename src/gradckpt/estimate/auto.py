"""Policy 'auto' in an estimate: the budget planner's plan for what a GPU leaves for the step."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from ..errors import GradCkptError
from ..planner.api import plan as planner_plan
from ..plans import Decision
from ..runtime.chunked_loss import HEAD_NAME
from ..units import format_bytes
from . import fake_model
from .gpus import GPU
from .step_cost import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES
from .training import CHUNKED_LOSSES, TrainingSetup

__all__ = ["AUTO_TRIES", "plan_until_it_fits", "planner_plan_for_gpu"]

#: plans the estimate tries before it reports the last one as over the GPU
AUTO_TRIES = 3


def planner_plan_for_gpu(
    cfg: Any,
    st: TrainingSetup,
    L: int,
    types: Any,
    gpu: GPU | None,
    fixed_overhead: int | None,
    shrink: int = 0,
    sharded: tuple[int, int] | None = None,
) -> tuple[Any, str | None]:
    """Hook for the memory-budget planner (``gradckpt.planner``): the cheapest plan that fits ``gpu``.

    Returns ``(plan, None)``, or ``(None, why)`` when there is no GPU or the planner cannot plan
    this model. The planner profiles the full-depth fake model; its
    budget is what the GPU leaves for the step: memory minus the CUDA allowance (context and
    allocator slack) minus the optimizer states, which the fake step does not hold. The planner
    counts every live CPU tensor of the process as already in memory (as ``gradckpt.measure``
    does), so cached fake models are dropped first; large real CPU tensors the caller keeps
    alive make its plan more conservative. The plan it returns is then estimated like any other.
    ``shrink``: bytes taken off that budget (a re-plan after the estimate found the plan over).
    ``sharded``: with data-parallel sharding, ``(static, grad_shards)``: what each GPU holds
    all step besides gradients (its share of weights and optimizer states, plus the
    communication buffers at the peak) and the ways each gradient is sharded (FSDP2, ZeRO-2/3:
    N; else 1). The planner profiles the unsharded model, counting its weights as present: the
    budget gives them back and takes ``static`` instead. Gradients are profiled as the sharded
    step holds them: with ``grad_shards`` > 1 each one, once accumulated, is replaced by its
    1/N shard (the reduce-scatter FSDP2 and ZeRO run after each block's backward).
    """
    if gpu is None:
        return None, "policy 'auto' needs a GPU (--gpu): the memory it plans for"
    sess = fake_model.get_session(cfg, st, L, types)
    # The planner measures like gradckpt.measure: every live tensor of the process is baseline.
    # Fake models cached from earlier estimates would count as weights: let them go.
    fake_model.keep_only(sess)
    gc.collect()
    whole, _ = sess.totals(st.optimizer)
    if fixed_overhead is None:
        room = int((gpu.memory_bytes - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_SLACK))
    else:
        room = gpu.memory_bytes - fixed_overhead
    budget = room - whole.optimizer_bytes - shrink
    if sharded is not None:
        budget = room - shrink - sharded[0] + whole.weight_bytes
    if budget <= 0:
        what = (
            "the optimizer states alone exceed"
            if sharded is None
            else ("each GPU's share of weights and optimizer states and its buffers exceed")
        )
        return None, f"policy 'auto' skipped: {what} {gpu.name}"
    batch = sess.inputs(st.batch, st.seq)
    chunked = st.hf_loss in CHUNKED_LOSSES  # the setup's loss is a chunked head: plan with it
    head: dict[str, Any] = {"loss_head": HEAD_NAME, "loss_head_optional": True} if chunked else {}
    hooks = [] if sharded is None or sharded[1] <= 1 else _reduce_scatter(sess.model, sharded[1])
    try:
        with (
            sess.mode,
            sess.index_math(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=st.autocast),
        ):
            return planner_plan(
                sess.model,
                budget,
                batch,
                blocks=sess.block_names,
                decisions=list(Decision),  # the fake model stands for a CUDA device
                **head,
            ), None
    except GradCkptError as e:
        return None, f"policy 'auto' (planner, {format_bytes(budget)} for the step): {e}"
    finally:
        for h in hooks:
            h.remove()


def plan_until_it_fits(
    cfg: Any,
    st: TrainingSetup,
    L: int,
    types: Any,
    gpu: GPU | None,
    fixed_overhead: int | None,
    run: Callable[[Any], tuple[Any, Any]],
    sharded: tuple[int, int] | None = None,
) -> tuple[Any, str | None, tuple[Any, Any]]:
    """The planner's plan for ``gpu``, checked by ``run`` (the replayed estimate) and re-planned.

    The planner's peak model is close to the replayed step, not equal to it: a plan the replay
    puts over the GPU is planned again with the budget lowered, at most ``AUTO_TRIES`` times.
    Returns ``(plan, why, run(plan))``: ``plan`` None (and ``why``) when the planner found none;
    ``run``'s result may still be over the GPU after the last try.
    """
    shrink = 0
    plan: Any = None
    why: str | None = None
    ran: tuple[Any, Any] = (None, None)
    for attempt in range(AUTO_TRIES):
        plan, why = planner_plan_for_gpu(cfg, st, L, types, gpu, fixed_overhead, shrink, sharded)
        if plan is None:
            break
        ran = run(plan)
        result: Any = ran[0]
        if result.fits is not False or result.headroom_bytes is None:
            break
        # The planner's plans move in steps (a block's decision): take off the room its plan
        # left in its own budget too, so that the next plan's own peak is lower by the excess,
        # twice that on each further try
        margin = plan.notes.get("budget_bytes", 0) - plan.notes.get("predicted_peak_bytes", 0)
        shrink += max(0, margin) + (-result.headroom_bytes << attempt)
    return plan, why, ran


def _reduce_scatter(model: torch.nn.Module, n: int) -> list[Any]:
    """Hooks that turn each accumulated gradient into its 1/``n`` shard, as a sharded step holds it."""
    shards: dict[int, torch.Tensor] = {}

    def hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            # a flat shard padded to a multiple of n, as FSDP2 and ZeRO keep it; the full
            # gradient goes (its reduce-scatter output replaces it)
            shards[id(p)] = p.grad.new_empty(-(-p.grad.numel() // n))
            p.grad = None

    return [
        p.register_post_accumulate_grad_hook(hook) for p in model.parameters() if p.requires_grad
    ]
