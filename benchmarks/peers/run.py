"""The whole measurement: build the model, measure every configuration, time them, return plain data."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import gradckpt
from gradckpt.bench import machine_info
from gradckpt.bench.models import BenchModel, build_bench_model, make_batch
from gradckpt.verify import compare_grads

from .analysis import frontier_verdicts, iqr
from .configs import (
    COMPILE_BUDGETS,
    COMPILE_REF,
    CPU_THREADS,
    DEFAULTS,
    SEED,
    compiled_step_flops,
    make_configs,
    transformers_version,
)
from .measure import Tracked, budget_configs, grads_of, run_step, time_rounds, track


@dataclass(slots=True, kw_only=True)
class Row:
    """One configuration's measured results: a row of the table, an entry of the JSON's ``rows``.

    Bytes are relative to nothing unless said: ``peak_bytes`` includes the weights, buffers and
    batch; the ``*_delta`` ones are above the step's start. ``None`` means not measured for
    this configuration (e.g. FLOPs and bytes moved of a compiled row, where fused kernels hide
    them from the dispatcher).

    Attributes:
        label, family, what: the configuration's name, ``"gradckpt"`` or ``"peer"``, and what is
            applied, as a user would write it.
        plan: the gradckpt plan's one-line summary (None for a peer).
        matched_peer: for a planner row, the peer whose measured peak was its budget.
        compiled: the blocks ran through ``torch.compile`` (memory from the allocator).
        peak_bytes: weights, buffers and batch plus ``peak_delta_bytes``.
        peak_delta_bytes: the step's peak above its start (gradients included).
        activation_bytes: bytes held for backward at the end of forward.
        memory_source: ``"gradckpt.measure"`` or ``"allocator"``.
        alloc_peak_delta_bytes: the allocator's own peak above start, on the ``none`` row only
            (the two methods' agreement check).
        time_s, cpu_time_s: median wall-clock and process CPU seconds per step.
        speed_cost: median over rounds of (step time / ``none``'s in the same round) - 1, on
            the run's clock; ``ratios`` are those per-round ratios, ``speed_cost_iqr`` their
            interquartile range; ``speed_cost_wall``/``speed_cost_cpu``: the same on each clock.
        extra_flops: FLOPs beyond ``none``'s (compiled rows: beyond ``none+compile``'s graphs).
        extra_bytes: bytes read and written by ops beyond ``none``'s.
        recompute_bytes: gradckpt's own count of bytes recomputed (gradckpt rows only).
        grads_equal, grad_max_abs_diff: gradients vs ``none``'s, exactly
            (``gradckpt.verify.compare_grads``).
        compiled_graph_flops: ``[is_backward, flops]`` per graph inductor compiled.
        grads_equal_compile_ref, grad_max_abs_diff_compile_ref: gradients vs ``none+compile``'s.
        note: anything a reader of the table must know about this row.
        times_s, cpu_times_s: every timed step, wall-clock and CPU seconds, in round order.
    """

    label: str
    family: str
    what: str
    plan: str | None
    matched_peer: str | None
    compiled: bool
    peak_bytes: int
    peak_delta_bytes: int
    activation_bytes: int
    memory_source: str
    alloc_peak_delta_bytes: int | None
    time_s: float
    cpu_time_s: float
    speed_cost: float
    ratios: list[float]
    speed_cost_iqr: float
    speed_cost_wall: float
    speed_cost_cpu: float
    extra_flops: int | None
    extra_bytes: int | None
    recompute_bytes: int | None
    grads_equal: bool | None
    grad_max_abs_diff: float | None
    compiled_graph_flops: list[list[Any]]
    grads_equal_compile_ref: bool | None
    grad_max_abs_diff_compile_ref: float | None
    note: str
    times_s: list[float]
    cpu_times_s: list[float]


def _state_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    seen: set[int] = set()
    n = 0
    for t in (*model.parameters(), *model.buffers(), *batch.values()):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            n += st.nbytes()
    return n


def max_dropout(model: nn.Module) -> float:
    """The largest dropout probability the model applies in training (modules and HF config)."""
    ps = [float(m.p) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)):
            ps.append(float(v))
    return max(ps, default=0.0)


def machine_slug(device: torch.device) -> str:
    """A file-name-safe name for the machine kind, e.g. ``cpu2-x86_64`` or ``nvidia-a100-...``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    return f"cpu{os.cpu_count()}-{platform.machine()}"


def run_peers(
    *,
    model: str = DEFAULTS["model"],
    layers: int | None = DEFAULTS["layers"],
    batch: int = DEFAULTS["batch"],
    seq: int = DEFAULTS["seq"],
    repeats: int = DEFAULTS["repeats"],
    warmup: int = DEFAULTS["warmup"],
    compile_budgets: Sequence[float] = COMPILE_BUDGETS,
    only: Sequence[str] | None = None,
    device: str | None = None,
    threads: int | None = None,
    clock: str | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Measure every configuration; return the results as plain data (what the JSON holds).

    Args:
        model, layers, batch, seq: the workload (a ``gradckpt.bench.models`` bench preset).
        repeats, warmup: timed and untimed interleaved rounds.
        compile_budgets: ``activation_memory_budget`` values for the compile peer (``()``: no
            compiled configuration at all).
        only: configuration labels to keep (development).
        device: ``"cpu"`` or ``"cuda"`` (default: CUDA when available).
        threads: torch threads (default on CPU: ``CPU_THREADS``).
        clock: ``"cpu"`` (process CPU time) or ``"wall"`` for the speed cost (default: CPU time
            on a CPU run, where with one thread it is the compute time and is not inflated by
            other processes' time slices; wall clock on CUDA).
        progress: called with a short status line.

    Example:
        >>> res = run_peers(layers=2, batch=1, seq=32, repeats=1, warmup=0, compile_budgets=())
        >>> [r["label"] for r in res["rows"]][:2]
        ['none', 'full']
    """
    t_start = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads is None and dev.type == "cpu":
        threads = CPU_THREADS
    if threads is not None:
        torch.set_num_threads(threads)
    bm: BenchModel = build_bench_model(model, layers=layers, seed=SEED)
    template = bm.model.to(dev).train()
    data = make_batch(bm, batch, seq)
    configs, skipped = make_configs(template, dev, compile_budgets=compile_budgets, only=only)
    if configs[0].label != "none":
        raise RuntimeError("the first configuration must be 'none' (the reference)")

    tracked: dict[str, Tracked] = {}
    ref: dict[str, torch.Tensor | None] | None = None
    for cfg in configs:
        progress(f"measure {cfg.label}")
        t = track(cfg, data, dev, ref, calibrate=cfg.label == "none")
        tracked[cfg.label] = t
        if ref is None:
            ref = {
                n: (g.detach().clone() if g is not None else None)
                for n, g in grads_of(cfg.model).items()
            }
            t.grads_equal, t.grad_max_abs_diff = True, 0.0
    compile_ref = COMPILE_REF
    compile_grads = None
    if compile_ref in tracked:  # the compiled baseline's grads, to compare compiled budgets with
        c = next(c for c in configs if c.label == compile_ref)
        c.model.zero_grad(set_to_none=True)
        torch.manual_seed(SEED)
        run_step(c, data)
        compile_grads = {
            n: (g.detach().clone() if g is not None else None) for n, g in grads_of(c.model).items()
        }

    targets = sorted(
        ((c.label, tracked[c.label].peak_delta, c.compiled) for c in configs if c.family == "peer"),
        key=lambda x: x[1],
    )
    aliases: list[dict[str, Any]] = []
    if targets:
        extra, aliases, budget_skipped = budget_configs(template, data, targets, configs, progress)
        skipped.extend(budget_skipped)
        for cfg in extra:
            progress(f"measure {cfg.label}")
            tracked[cfg.label] = track(cfg, data, dev, ref)
        configs.extend(extra)

    vs_compiled: dict[str, tuple[bool, float]] = {}
    for cfg in configs:
        if cfg.compiled and compile_grads is not None and cfg.label != compile_ref:
            cfg.model.zero_grad(set_to_none=True)
            torch.manual_seed(SEED)
            run_step(cfg, data)
            vs_compiled[cfg.label] = compare_grads(compile_grads, grads_of(cfg.model))
    ref = compile_grads = None

    times = time_rounds(configs, data, dev, repeats=repeats, warmup=warmup, progress=progress)
    for cfg in configs:
        cfg.model.zero_grad(set_to_none=True)
    if clock is None:
        clock = "cpu" if dev.type == "cpu" else "wall"
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")

    state = _state_bytes(template, data)
    base = tracked["none"]
    flops_of_compiled_ref = None
    if compile_ref in tracked:
        c = next(c for c in configs if c.label == compile_ref)
        flops_of_compiled_ref = compiled_step_flops(c, len(gradckpt.find_blocks(template)))
    n_blocks = len(gradckpt.find_blocks(template))

    def ratios(label: str, clk: str, ref_label: str = "none") -> list[float]:
        return times.ratios(label, ref_label, clock=clk)

    rows: list[Row] = []
    for cfg in configs:
        t = tracked[cfg.label]
        extra_flops: int | None = None
        extra_bytes: int | None = None
        if t.total_flops is not None and base.total_flops is not None:
            extra_flops = t.total_flops - base.total_flops
        elif cfg.compiled and flops_of_compiled_ref is not None:
            own = compiled_step_flops(cfg, n_blocks)
            extra_flops = None if own is None else own - flops_of_compiled_ref
        if t.op_bytes is not None and base.op_bytes is not None:
            extra_bytes = t.op_bytes - base.op_bytes
        note = cfg.note
        if cfg.compiled:
            vs = ""
            if compile_ref in tracked and cfg.label != compile_ref:
                r_c = statistics.median(ratios(cfg.label, clock, compile_ref)) - 1
                vs = f"speed cost vs {compile_ref}: {r_c * 100:+.1f}%"
            note = "; ".join(
                x
                for x in (
                    "memory from the allocator's events (dynamo does not run under gradckpt.measure's dispatch mode)",
                    f"extra FLOPs counted on the compiled block graphs, relative to {compile_ref}'s",
                    "bytes moved not counted (fused kernels)",
                    vs,
                    note,
                )
                if x
            )
        same_c, diff_c = vs_compiled.get(cfg.label, (None, None))
        rows.append(
            Row(
                label=cfg.label,
                family=cfg.family,
                what=cfg.what,
                plan=cfg.plan.summary() if cfg.plan is not None else None,
                matched_peer=cfg.matched_peer,
                compiled=cfg.compiled,
                peak_bytes=state + t.peak_delta,
                peak_delta_bytes=t.peak_delta,
                activation_bytes=t.activation_bytes,
                memory_source=t.source,
                alloc_peak_delta_bytes=t.alloc_peak_delta,
                time_s=statistics.median(times.wall[cfg.label]),
                cpu_time_s=statistics.median(times.cpu[cfg.label]),
                speed_cost=statistics.median(ratios(cfg.label, clock)) - 1.0,
                ratios=ratios(cfg.label, clock),
                speed_cost_iqr=iqr(ratios(cfg.label, clock)),
                speed_cost_wall=statistics.median(ratios(cfg.label, "wall")) - 1.0,
                speed_cost_cpu=statistics.median(ratios(cfg.label, "cpu")) - 1.0,
                extra_flops=extra_flops,
                extra_bytes=extra_bytes,
                recompute_bytes=t.recompute_bytes if cfg.family == "gradckpt" else None,
                grads_equal=t.grads_equal,
                grad_max_abs_diff=t.grad_max_abs_diff,
                compiled_graph_flops=[list(x) for x in cfg.graph_flops],
                grads_equal_compile_ref=same_c,
                grad_max_abs_diff_compile_ref=diff_c,
                note=note,
                times_s=times.wall[cfg.label],
                cpu_times_s=times.cpu[cfg.label],
            )
        )
    row_dicts = [dataclasses.asdict(r) for r in rows]
    mi = machine_info()
    mi["transformers"] = transformers_version()
    mi["cpu_count"] = os.cpu_count()
    mi["slug"] = machine_slug(dev)
    return {
        "schema": 1,
        "date": dt.date.today().isoformat(),
        "machine": mi,
        "settings": {
            "model": bm.name,
            "layers": n_blocks,
            "batch": batch,
            "seq": seq,
            "repeats": repeats,
            "warmup": warmup,
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "clock": clock,
            "parameters": sum(p.numel() for p in template.parameters()),
            "state_bytes": state,
            "dropout": max_dropout(template),
            "seed": SEED,
        },
        "rows": row_dicts,
        "aliases": aliases,
        "skipped": [{"label": s.label, "reason": s.reason} for s in skipped],
        "frontier": frontier_verdicts(row_dicts),
        "runtime_s": time.perf_counter() - t_start,
    }
