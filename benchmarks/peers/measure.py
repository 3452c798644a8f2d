"""Measuring one configuration: a tracked step (bytes, FLOPs, gradients), interleaved timing, budget plans."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import gradckpt
from gradckpt.bench import StepTimes, time_interleaved
from gradckpt.verify import compare_grads

from .configs import SEED, Config, MiB, Skipped, copy_sharing_weights, gradckpt_then_compile

# -- measuring ---------------------------------------------------------------------------------


def run_step(cfg: Config, batch: dict[str, torch.Tensor]) -> None:
    """Forward and backward (gradients set to None first, outside any measurement)."""
    with cfg.context():
        with torch.profiler.record_function("peers::forward"):
            loss = cfg.model(**batch).loss
        with torch.profiler.record_function("peers::backward"):
            loss.backward()


def allocator_step(
    cfg: Config, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[int, int]:
    """(peak, activation) bytes above the step's start, from the allocator itself.

    On CUDA: the caching allocator's statistics. On CPU: the profiler's allocation events
    (every ``c10`` CPU allocation and free, in order), summed; the activation bytes are the sum
    when the backward marker starts. This sees inductor's buffers, which bypass the dispatcher.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with cfg.context():
            loss = cfg.model(**batch).loss
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - base
            loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, held
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step(cfg, batch)
    events = list(prof.profiler.kineto_results.events())  # type: ignore[union-attr]
    bwd = min((e.start_ns() for e in events if e.name() == "peers::backward"), default=None)
    mem = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    cur = peak = 0
    act: int | None = None
    for e in mem:
        if act is None and bwd is not None and e.start_ns() >= bwd:
            act = cur
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, act if act is not None else cur


@dataclass(slots=True, kw_only=True)
class Tracked:
    """What one tracked step of one configuration cost (bytes above the step's start)."""

    peak_delta: int
    activation_bytes: int
    source: str
    total_flops: int | None = None
    recompute_flops: int | None = None
    recompute_bytes: int | None = None
    op_bytes: int | None = None
    grads_equal: bool | None = None
    grad_max_abs_diff: float | None = None
    alloc_peak_delta: int | None = None


def grads_of(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def track(
    cfg: Config,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    ref_grads: dict[str, torch.Tensor | None] | None,
    *,
    calibrate: bool = False,
) -> Tracked:
    """One warm step, then one tracked step from seed ``SEED``; gradients compared to ``ref_grads``."""
    cfg.model.zero_grad(set_to_none=True)
    run_step(cfg, batch)  # warm: compiles, lazily-created state, selective learning
    cfg.model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    if cfg.compiled:
        peak, act = allocator_step(cfg, batch, device)
        out = Tracked(peak_delta=peak, activation_bytes=act, source="allocator")
    else:
        st = gradckpt.measure(
            functools.partial(run_step, cfg, batch), model=cfg.model, device=device
        )
        out = Tracked(
            peak_delta=st.peak_bytes - st.baseline_bytes,
            activation_bytes=st.activation_bytes,
            source="gradckpt.measure",
            total_flops=st.total_flops,
            recompute_flops=st.recompute_flops,
            recompute_bytes=st.recompute_bytes,
            op_bytes=st.op_bytes,
        )
        if calibrate:  # the allocator's view of the same step, to show both methods agree
            cfg.model.zero_grad(set_to_none=True)
            torch.manual_seed(SEED)
            out.alloc_peak_delta = allocator_step(cfg, batch, device)[0]
    if ref_grads is not None:
        out.grads_equal, out.grad_max_abs_diff = compare_grads(ref_grads, grads_of(cfg.model))
    return out


def time_rounds(
    configs: Sequence[Config],
    batch: dict[str, torch.Tensor],
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    progress: Callable[[str], None],
) -> StepTimes:
    """``warmup + repeats`` rounds, one step per configuration each, order rotated per round.

    The library's ``gradckpt.bench.time_interleaved``; gradients are set to None before each
    step, outside the clock.

    Returns:
        per configuration label, its steps' wall-clock and process CPU seconds, in round order.
    """
    by_label = {c.label: c for c in configs}

    def announce(r: int, label: str) -> None:
        if label == configs[r % len(configs)].label:  # the first step of round r
            progress(f"round {r + 1}/{warmup + repeats}" + (" (warmup)" if r < warmup else ""))

    return time_interleaved(
        {c.label: functools.partial(run_step, c, batch) for c in configs},
        repeats=repeats,
        warmup=warmup,
        prepare=lambda label: by_label[label].model.zero_grad(set_to_none=True),
        device=device,
        progress=announce,
    )


# -- the planner at each peer's memory -----------------------------------------------------------


def budget_configs(
    template: nn.Module,
    batch: dict[str, torch.Tensor],
    targets: Sequence[tuple[str, int, bool]],
    existing: Sequence[Config],
    progress: Callable[[str], None],
) -> tuple[list[Config], list[dict[str, Any]], list[Skipped]]:
    """gradckpt's auto plan at each peer's measured peak (bytes above the step's start).

    The planner's budgets are absolute (it counts what was live when it profiled); the peer's
    peak above its step's start is moved into that frame by adding the planner's own start
    level. For a compiled peer (``targets`` entries are ``(label, peak, compiled)``) the plan
    is applied, then the blocks are compiled; the planner profiles eager code, so when the
    compiled peer's peak is below anything eager can reach (fused kernels leave smaller
    temporaries), the planner's leanest plan is used instead. A plan identical to an existing
    configuration's is not measured twice: it is recorded as an alias.

    Returns:
        (new configurations, aliases ``{"label", "same_as", "peer"}``, budgets nothing fits).
    """
    from gradckpt.errors import BudgetError
    from gradckpt.planner.api import auto_plan, profile_model
    from gradckpt.planner.solve import min_peak

    model = copy_sharing_weights(template)
    progress("profile for the planner")
    prof = profile_model(model, batch, blocks=gradckpt.find_blocks(model))
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    start = prof.fixed_bytes - grads  # live bytes when the planner's step started
    out: list[Config] = []
    aliases: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    known: dict[tuple[Any, ...], str] = {}
    for c in existing:
        if c.plan is not None and not c.plan.options:
            known[(c.plan.decisions, c.plan.segments, c.compiled)] = c.label
    for peer, delta, compiled in targets:
        label = f"auto@{peer}" + ("+compile" if compiled else "")
        asked = f"budget=<{peer}'s peak>"
        try:
            plan = auto_plan(prof, start + delta)
        except BudgetError:
            sol = min_peak(prof)
            if not compiled:
                skipped.append(
                    Skipped(
                        label,
                        f"no plan fits {peer}'s peak ({delta / MiB:.2f} MiB above the step's "
                        f"start): the planner's leanest plan is predicted at "
                        f"{(sol.peak - start) / MiB:.2f} MiB ({(sol.peak - start - delta) / 2**10:.0f} KiB more)",
                    )
                )
                continue
            plan = gradckpt.Plan(
                prof.blocks,
                sol.decisions,
                policy="auto",
                notes={"predicted_peak_bytes": sol.peak},
            )
            asked = "the planner's leanest plan"
        key = (plan.decisions, plan.segments, compiled)
        if key in known:
            aliases.append({"label": label, "same_as": known[key], "peer": peer})
            continue
        cfg = Config(
            label=label,
            family="gradckpt",
            what=f"gradckpt.enable(model, {asked}) -> {plan.summary()}"
            + (", then block.compile() per block (inductor)" if compiled else ""),
            model=copy_sharing_weights(template),
            matched_peer=peer,
        )
        if compiled:
            gradckpt_then_compile(cfg, plan=plan)
        else:
            cfg.plan = gradckpt.enable(cfg.model, plan=plan)
        predicted = plan.notes.get("predicted_peak_bytes")
        if isinstance(predicted, int):
            cfg.note = f"planner predicted peak {(predicted - start) / MiB:.1f} MiB above start"
            if compiled:
                cfg.note += " (eager)"
        known[key] = label
        out.append(cfg)
    del model
    return out, aliases, skipped
