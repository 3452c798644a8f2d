"""``gradckpt.plan`` and ``enable(budget=...)``: profile (eagerly or on the first step), then solve."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..apply import install
from ..errors import BudgetError, GradCkptError
from ..plan import Plan
from ..units import format_bytes, parse_bytes
from .model import StepProfile
from .profile import ProfileRecorder, ProfileTracker, assemble, profile_step, snapshot
from .solve import solve

__all__ = ["LazyBudget", "auto_plan", "plan", "plan_for_budget", "profile_model", "resolve_budget"]

LossFn = Callable[[Any], torch.Tensor]


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


def _default_loss(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].float().sum()
    raise GradCkptError(
        f"cannot find a loss in the model's output ({type(out).__name__}); pass loss_fn=lambda out: ..."
    )


def _call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)


def _batch_of(example: Any) -> int:
    for t in (
        example.values()
        if isinstance(example, dict)
        else example
        if isinstance(example, (tuple, list))
        else [example]
    ):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return 0


def profile_model(
    model: nn.Module,
    example: Any,
    *,
    blocks: Sequence[tuple[str, nn.Module]],
    loss_fn: LossFn | None = None,
    options: dict[str, Any] | None = None,
) -> StepProfile:
    """Profile one forward+backward of ``model`` on ``example`` (gradients and RNG restored)."""
    if example is None:
        raise GradCkptError("profiling needs an example batch (example=...)")
    loss_of = loss_fn or _default_loss

    def step() -> None:
        loss_of(_call(model, example)).backward()

    return profile_step(model, step, blocks, options=options, batch=_batch_of(example))


def auto_plan(profile: StepProfile, budget: int, options: dict[str, Any] | None = None) -> Plan:
    """Solve ``profile`` for ``budget`` bytes and wrap the result as a Plan named ``auto``."""
    sol = solve(profile, budget)
    return Plan(
        profile.blocks,
        sol.decisions,
        policy="auto",
        options=dict(options or {}),
        notes={
            "budget_bytes": budget,
            "predicted_peak_bytes": sol.peak,
            "predicted_extra_time_s": sol.cost / 1e9,
        },
    )


def plan(
    model: nn.Module,
    budget: int | str,
    example: Any,
    *,
    blocks: Any = None,
    loss_fn: LossFn | None = None,
    **options: Any,
) -> Plan:
    """The cheapest plan whose predicted peak fits ``budget``, from one profiled step on ``example``.

    Args:
        model: the model to train (its gradients, buffers and RNG state are left as they were).
        budget: device memory for the step: ``"20GiB"``, ``"20GB"``, ``"512MiB"`` or int bytes.
        example: one training batch: a dict of keyword inputs, a tuple of positional ones, or a tensor.
        blocks: as for ``enable`` (default: ``find_blocks``).
        loss_fn: ``loss_fn(output) -> loss`` (default: ``output.loss``, else ``output.sum()``).
        **options: plan options for the decisions (e.g. ``save_ops``).

    Returns:
        A ``Plan`` (policy ``"auto"``) with the predicted peak and extra time in ``plan.notes``.

    Raises:
        BudgetError: nothing fits; says the smallest achievable peak and the batch that would fit.

    Example:
        >>> p = gradckpt.plan(model, "12GiB", example=batch)
        >>> gradckpt.enable(model, plan=p)
    """
    from ..blocks import resolve_blocks

    found = resolve_blocks(model, blocks)
    b = resolve_budget(budget)
    prof = profile_model(model, example, blocks=found, loss_fn=loss_fn, options=options)
    return auto_plan(prof, b, options)


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
    if example is not None:
        prof = profile_model(model, example, blocks=blocks, loss_fn=loss_fn, options=options)
        return auto_plan(prof, b, options), None
    if loss_fn is not None:
        raise GradCkptError(
            "loss_fn= is only used with example=; the lazy profile watches the real step"
        )
    names = tuple(n for n, _ in blocks)
    from ..plan import Decision

    provisional = Plan(
        names,
        (Decision.RECOMPUTE,) * len(names),
        policy="full",
        options=dict(options),
        notes={"budget_bytes": b, "pending": "profiling the first training step"},
    )
    return provisional, LazyBudget(b, list(blocks), dict(options))


class LazyBudget:
    """Profiles the first training step (forward, backward, optimizer) and re-plans at the second."""

    def __init__(self, budget: int, blocks: list[tuple[str, nn.Module]], options: dict[str, Any]):
        self.budget = budget
        self.blocks = blocks
        self.options = options
        self.recorder: ProfileRecorder | None = None
        self.result: Plan | None = None

    def install(self, model: nn.Module) -> Callable[[], None]:
        handle = model.register_forward_pre_hook(self._pre(model), with_kwargs=True)

        def remove() -> None:
            handle.remove()
            self._abort()

        return remove

    def _abort(self) -> None:
        rec, self.recorder = self.recorder, None
        if rec is not None:
            rec.remove()
            try:
                rec.tracker.__exit__(None, None, None)
            except Exception:
                pass

    def _pre(self, model: nn.Module) -> Callable[..., None]:
        def hook(_m: nn.Module, args: Any, kwargs: Any) -> None:
            if not (torch.is_grad_enabled() and model.training):
                return
            if self.recorder is None:
                self._start(model)
            else:
                self._finish(model)

        return hook

    def _start(self, model: nn.Module) -> None:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        tracker = ProfileTracker(device_type=dev.type, use_allocator=dev.type == "cuda")
        rec = ProfileRecorder([n for n, _ in self.blocks], [m for _, m in self.blocks], tracker)
        rec.install()
        import gc

        from ..measure import live_tensors

        gc.collect()
        tracker.seed(live_tensors())
        tracker.window_peak = tracker.live()
        tracker.__enter__()
        self.recorder = rec

    def _finish(self, model: nn.Module) -> None:
        rec = self.recorder
        if rec is None:
            return
        rec.tracker.__exit__(None, None, None)
        rec.finish()
        rec.remove()
        self.recorder = None
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        restore = snapshot(model)
        try:
            first = rec.captured.get(0)
            batch = (
                int(first[0][0].shape[0])
                if first and first[0] and isinstance(first[0][0], torch.Tensor)
                else 0
            )
            prof = assemble(rec, model, _decisions(dev), self.options, dev, batch)
        finally:
            restore()
        try:
            new = auto_plan(prof, self.budget, self.options)
        except BudgetError as e:
            raise BudgetError(f"{e} (measured on the first training step)") from None
        self.result = new
        install(model, new, self.blocks)
        warnings.warn(
            f"gradckpt: budget {format_bytes(self.budget)}: profiled the first step, now using "
            f"{new.summary()} (predicted peak {format_bytes(new.notes['predicted_peak_bytes'])})",
            stacklevel=2,
        )


def _decisions(dev: torch.device) -> list[Any]:
    from .profile import available_decisions

    return available_decisions(dev)
