"""Measure every policy on one model side by side: memory exactly, time as interleaved paired ratios."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..enable import disable, enable
from ..errors import ConfigError, GradCkptError
from ..measure import MemoryStats, measure
from ..plans import Plan
from ..policies import make_plan, policy_names
from .models import BenchModel, build_bench_model, make_batch

__all__ = [
    "BenchReport",
    "PolicyResult",
    "StepTimes",
    "default_policies",
    "machine_info",
    "run_bench",
    "time_interleaved",
]


def default_policies() -> list[str]:
    """Every registered policy that takes no argument, plus ``every:2``, ``none`` first."""
    names = [p for p in policy_names(exact=True) if ":" not in p]  # lean: ask for it by name
    names.insert(names.index("full") + 1 if "full" in names else len(names), "every:2")
    return names


@dataclass(slots=True, kw_only=True)
class PolicyResult:
    """One policy's measured cost on the bench model.

    Attributes:
        policy: the policy name (or ``"budget:<bytes>"`` for a planner-made plan).
        plan: the plan's one-line summary.
        peak_bytes: device bytes live at the step's peak (weights and gradients included).
        activation_bytes: device bytes held for backward at the end of forward.
        host_bytes: host bytes held for backward (offload; 0 on a CPU-only run).
        saving: activation bytes saved vs ``none``, as a fraction of ``none``'s (0.75 = 75% less).
        time_s: median step time (s).
        speed_cost: median over repeats of (time / time of ``none`` in the same repeat) - 1.
        extra_flops: step FLOPs minus those of ``none`` (recompute).
        recompute_flops: FLOPs re-run during backward.
        times_s: every timed step, in repeat order.
    """

    policy: str
    plan: str
    peak_bytes: int
    activation_bytes: int
    host_bytes: int
    saving: float
    time_s: float
    speed_cost: float
    extra_flops: int
    recompute_flops: int
    total_flops: int
    times_s: list[float] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "plan": self.plan,
            "peak_bytes": self.peak_bytes,
            "activation_bytes": self.activation_bytes,
            "host_bytes": self.host_bytes,
            "saving": self.saving,
            "time_s": self.time_s,
            "speed_cost": self.speed_cost,
            "extra_flops": self.extra_flops,
            "recompute_flops": self.recompute_flops,
            "total_flops": self.total_flops,
            "times_s": list(self.times_s),
            "stats": dict(self.stats),
        }


@dataclass(slots=True, kw_only=True)
class BenchReport:
    """All policies on one model, plus the settings and machine they were measured on."""

    model: str
    settings: dict[str, Any]
    machine: dict[str, Any]
    results: list[PolicyResult]
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": dict(self.settings),
            "machine": dict(self.machine),
            "results": [r.to_dict() for r in self.results],
            "skipped": list(self.skipped),
        }

    def result(self, policy: str) -> PolicyResult:
        for r in self.results:
            if r.policy == policy:
                return r
        raise KeyError(policy)


def machine_info() -> dict[str, Any]:
    """Where a measurement was made: CPU/GPU, thread count, torch version."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _step(bm: BenchModel, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model = bm.model

    def step() -> None:
        model.zero_grad(set_to_none=True)
        # The output (with its logits) is dropped before backward, as Trainer does; holding it
        # would keep batch*seq*vocab logits alive through backward (98 MiB on the gpt2 preset).
        model(**batch).loss.backward()

    return step


@dataclass(frozen=True, slots=True)
class StepTimes:
    """Seconds of each timed step per configuration, in round order (warmup rounds left out).

    Attributes:
        wall: label -> wall-clock seconds per step (synchronized on CUDA).
        cpu: label -> process CPU seconds per step (every thread of this process).
        gpu: label -> seconds between CUDA events recorded on the current stream before and
            after each step (the device's own clock); empty unless the device is CUDA.
    """

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    gpu: dict[str, list[float]] = field(default_factory=dict)

    def ratios(self, label: str, reference: str = "none", clock: str = "wall") -> list[float]:
        """Per round, ``label``'s step time over ``reference``'s in the same round.

        Args:
            clock: ``"wall"``, ``"cpu"`` or ``"gpu"`` (CUDA events; only on a CUDA device).
        """
        if clock not in ("wall", "cpu", "gpu"):
            raise ConfigError(f"clock must be 'wall', 'cpu' or 'gpu', got {clock!r}")
        if clock == "gpu" and not self.gpu:
            raise ConfigError("no CUDA-event times: they exist only for steps timed on CUDA")
        times = {"wall": self.wall, "cpu": self.cpu, "gpu": self.gpu}[clock]
        return [t / b for t, b in zip(times[label], times[reference])]


def time_interleaved(
    steps: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 0,
    prepare: Callable[[str], object] | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> StepTimes:
    """Time each step once per round for ``warmup + repeats`` rounds, the order rotated each round.

    Round ``r`` starts at step ``r % len(steps)``, so every configuration runs in every position
    and a slow phase of a shared machine falls on all of them; the ratio of two configurations'
    times in the same round (``StepTimes.ratios``) cancels most of that drift. Used by
    ``run_bench`` and by ``benchmarks/peers``.

    Args:
        steps: label -> one training step (the timed part), in the order of the first round.
        repeats: timed rounds (>= 1), after ``warmup`` untimed ones (>= 0).
        prepare: called with the label before each step, untimed (e.g. install its plan).
        device: a CUDA device is synchronized before the clock starts and before it stops, and
            each step is also timed with CUDA events (``StepTimes.gpu``).
        progress: called with (round index counting warmup rounds, label) before each step.

    Returns:
        ``StepTimes`` with ``repeats`` wall-clock and CPU times (and CUDA-event times on CUDA)
        per label.

    Example:
        >>> t = time_interleaved({"none": step_a, "full": step_b}, repeats=5)
        >>> statistics.median(t.ratios("full")) - 1   # full's speed cost
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not steps:
        raise ConfigError("nothing to time: give at least one step")
    dev = torch.device(device) if device is not None else None

    def sync() -> None:
        if dev is not None and dev.type == "cuda":
            torch.cuda.synchronize(dev)

    order = list(steps.items())
    wall: dict[str, list[float]] = {label: [] for label, _ in order}
    cpu: dict[str, list[float]] = {label: [] for label, _ in order}
    cuda = dev is not None and dev.type == "cuda"
    gpu: dict[str, list[float]] = {label: [] for label, _ in order} if cuda else {}
    for r in range(warmup + repeats):
        k = r % len(order)
        for label, step in order[k:] + order[:k]:
            if progress is not None:
                progress(r, label)
            if prepare is not None:
                prepare(label)
            sync()
            if cuda:
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if cuda:
                end.record()
            sync()
            if r >= warmup:
                wall[label].append(time.perf_counter() - t0)
                cpu[label].append(time.process_time() - c0)
                if cuda:
                    gpu[label].append(start.elapsed_time(end) / 1000.0)  # ms -> s
    return StepTimes(wall=wall, cpu=cpu, gpu=gpu)


def run_bench(
    model: str | BenchModel = "llama",
    *,
    batch: int = 4,
    seq: int = 512,
    layers: int | None = None,
    policies: Sequence[str] | None = None,
    plans: Sequence[tuple[str, Plan]] = (),
    budgets: Sequence[str | int] = (),
    repeats: int = 3,
    warmup: int = 1,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure each policy's peak/activation memory, FLOPs and step time on one model.

    Memory and FLOPs come from one tracked step per policy (exact counts). Time comes from
    ``warmup + repeats`` rounds in which every policy runs one untracked step, the order rotated
    each round; the speed cost is the median of per-round ratios to ``none``, which cancels most
    of the drift of a shared machine.

    Args:
        model: a bench preset name, a ``config.json`` path, or a built ``BenchModel``.
        batch, seq, layers: the workload (``layers`` overrides the preset's block count).
        policies: policy names (default: ``default_policies()``); ``none`` is always measured.
        plans: extra ``(label, Plan)`` pairs to measure next to the policies.
        budgets: memory budgets for the planner's ``auto`` plan, as sizes (``"1GiB"``, bytes) or
            percentages of ``none``'s measured peak (``"60%"``); each is profiled, solved and
            measured like a policy (label ``auto@60%``). A budget nothing fits is reported as
            skipped in ``BenchReport.skipped`` rather than failing the run.
        repeats: timed rounds after ``warmup`` untimed ones.
        device: ``"cpu"`` or ``"cuda"`` (default: CUDA when available).
        progress: called with a short label before each step (for a progress bar).

    Returns:
        A ``BenchReport`` with one ``PolicyResult`` per policy, ``none`` first.

    Example:
        >>> report = run_bench("llama", batch=2, seq=128, policies=["full"], repeats=3)
        >>> report.result("full").speed_cost
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
    names = list(policies) if policies is not None else default_policies()
    if not names and not plans and not budgets:
        raise ConfigError("no policies to bench; name at least one, e.g. --policies full")
    for name in names:
        make_plan(name, ["probe"])  # fail on a bad name or argument before building anything
    if "none" not in names:
        names.insert(0, "none")
    names = list(dict.fromkeys(names))
    labels = [*names, *(lbl for lbl, _ in plans), *(f"auto@{b}" for b in budgets)]
    twice = sorted({lbl for lbl in labels if labels.count(lbl) > 1})
    if twice:
        raise ConfigError(
            f"two configurations are labelled {twice[0]!r}: give each plan and budget once, "
            "with a label no policy has"
        )
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device: use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA device is available here; use cpu")

    bm = model if isinstance(model, BenchModel) else build_bench_model(model, layers=layers)
    bm.model.to(dev).train()
    data = make_batch(bm, batch, seq)
    step = _step(bm, data)

    def by_policy(name: str) -> Callable[[], Plan]:
        return lambda: enable(bm.model, policy=name)

    def by_plan(plan: Plan) -> Callable[[], Plan]:
        return lambda: enable(bm.model, plan=plan)

    configs = [(n, by_policy(n)) for n in names] + [(lbl, by_plan(p)) for lbl, p in plans]

    mem: dict[str, tuple[Plan, MemoryStats]] = {}
    try:
        for label, apply in configs:
            if progress:
                progress(f"measure {label}")
            plan = apply()
            step()  # first step allocates lazily-created state (e.g. autocast caches) outside the count
            bm.model.zero_grad(set_to_none=True)
            mem[label] = (plan, measure(step, model=bm.model, device=dev))
        extra, extra_mem, skipped = _budget_configs(
            bm, data, budgets, mem["none"][1].peak_bytes, progress, dev
        )
        configs += extra
        mem.update(extra_mem)
        applies = dict(configs)

        def announce(r: int, label: str) -> None:
            if progress:
                progress(f"time {label} ({'warmup' if r < warmup else f'round {r - warmup + 1}'})")

        times = time_interleaved(
            dict.fromkeys(applies, step),
            repeats=repeats,
            warmup=warmup,
            prepare=lambda label: applies[label](),
            device=dev,
            progress=announce,
        )
    except GradCkptError:
        raise
    finally:
        disable(bm.model)
        bm.model.zero_grad(set_to_none=True)

    _, base = mem["none"]
    results = []
    for label, _ in configs:
        plan, st = mem[label]
        ratios = times.ratios(label)
        results.append(
            PolicyResult(
                policy=label,
                plan=plan.summary(),
                peak_bytes=st.peak_bytes,
                activation_bytes=st.activation_bytes,
                host_bytes=st.host_activation_bytes,
                saving=1.0 - st.activation_bytes / base.activation_bytes
                if base.activation_bytes
                else 0.0,
                time_s=statistics.median(times.wall[label]),
                speed_cost=statistics.median(ratios) - 1.0,
                extra_flops=st.total_flops - base.total_flops,
                recompute_flops=st.recompute_flops,
                total_flops=st.total_flops,
                times_s=times.wall[label],
                stats={**st.to_dict(), **{k: v for k, v in plan.notes.items() if k != "pending"}},
            )
        )
    settings = {
        "batch": batch,
        "seq": seq,
        "layers": len(base.block_bytes) or layers,
        "repeats": repeats,
        "warmup": warmup,
        "device": str(dev),
        "parameters": sum(p.numel() for p in bm.model.parameters()),
    }
    return BenchReport(
        model=bm.name, settings=settings, machine=machine_info(), results=results, skipped=skipped
    )


def _budget_configs(
    bm: BenchModel,
    data: dict[str, torch.Tensor],
    budgets: Sequence[str | int],
    reference: int,
    progress: Callable[[str], None] | None,
    dev: torch.device,
) -> tuple[
    list[tuple[str, Callable[[], Plan]]], dict[str, tuple[Plan, MemoryStats]], list[dict[str, Any]]
]:
    """Profile once, solve each budget, measure its plan.

    Args:
        reference: ``none``'s measured peak, what percentage budgets are of.

    Returns:
        (a ``(label, install)`` pair per budget that has a plan, their plans and measurements
        by label, the budgets nothing fits).
    """
    configs: list[tuple[str, Callable[[], Plan]]] = []
    mem: dict[str, tuple[Plan, MemoryStats]] = {}
    if not budgets:
        return configs, mem, []
    from ..blocks import find_blocks
    from ..errors import BudgetError
    from ..planner.api import auto_plan, profile_model, resolve_budget

    sizes = [(str(b), resolve_budget(b, reference=reference)) for b in budgets]
    if progress:
        progress("profile for budgets")
    disable(bm.model)
    prof = profile_model(bm.model, data, blocks=find_blocks(bm.model))
    step = _step(bm, data)
    skipped = []
    for text, size in sizes:
        label = f"auto@{text}"
        try:
            plan = auto_plan(prof, size)
        except BudgetError as e:
            skipped.append({"policy": label, "budget_bytes": size, "reason": str(e)})
            continue
        if progress:
            progress(f"measure {label}")
        enable(bm.model, plan=plan)
        step()
        bm.model.zero_grad(set_to_none=True)
        mem[label] = (plan, measure(step, model=bm.model, device=dev))

        def apply(plan: Plan = plan) -> Plan:
            return enable(bm.model, plan=plan)

        configs.append((label, apply))
    return configs, mem, skipped
