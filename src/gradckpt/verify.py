"""Check a plan: one step with and one without it, from the same RNG state; compare everything.

A checkpointed run must give the same loss, the same gradient for every parameter and the same
buffers (BatchNorm running statistics) as the plain run. On CPU in fp32 they are bit-identical:
the recompute runs the same kernels on the same inputs, and autograd's graph (so the order in
which gradients are summed) does not change. ``verify`` therefore demands exact equality by
default; ``atol``/``rtol`` loosen it for kernels that are not deterministic (some CUDA ones).

Two plan options change the order of floating-point sums, so their results are equal within
rounding, not bit-identical: the chunked loss head (``loss_head``: the loss summed chunk by
chunk) and sequence tiles (``tile_tokens``: weight gradients summed tile by tile). For plans
with either, and only for them, a tensor passes when its largest difference is within
``REORDER_RTOL`` (1e-5) of its largest magnitude; every other plan stays bit-exact. The logits
the chunked head does not return (``outputs.logits`` is None with it) are not compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._model_io import call_model, clone_example, default_loss, output_tensors
from .apply import Installed
from .apply import installed as installed_state
from .blocks import BlockSpec
from .enable import disable, enable
from .errors import ConfigError, GradCkptError
from .plans import Plan
from .runtime.chunked_loss import CHUNKED_RTOL

__all__ = ["REORDER_RTOL", "GroupDiff", "VerifyReport", "compare_grads", "reorders_sums", "verify"]

#: Tolerance for plans that reorder sums (chunked loss head, tiles): a tensor's largest
#: difference relative to its largest magnitude. fp32 rounding of sums over a few thousand
#: terms stays near 1e-7 of the largest term; 1e-5 leaves room and still catches any real error
#: (a wrong chunk or tile boundary changes gradients by more than 1e-3 relative).
REORDER_RTOL = CHUNKED_RTOL


def reorders_sums(plan: Plan) -> bool:
    """Whether ``plan`` changes the order of floating-point sums (chunked loss head, tiles)."""
    return bool(plan.options.get("loss_head") or plan.options.get("tile_tokens"))


#: How many problems a report lists per group before summarising the rest.
_MAX_PROBLEMS = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupDiff:
    """The comparison of one parameter group (a block, or a module outside the blocks).

    Attributes:
        name: the block's qualified name, the owning module's name for parameters outside the
            blocks, ``"output"`` for the loss and output tensors, ``"inputs"`` for gradients of
            example tensors that require grad.
        tensors: number of tensors compared (gradients, buffers, outputs).
        max_abs: largest absolute difference over all of them (``inf`` when one side is missing).
        max_rel: largest difference relative to the size of the tensor without the plan,
            ``max|a - b| / max|b|`` per tensor (0 when both are zero).
        problems: one line per mismatching tensor, e.g. ``"up.weight: no gradient with the plan"``.
    """

    name: str
    tensors: int
    max_abs: float
    max_rel: float
    problems: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tensors": self.tensors,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "passed": self.passed,
            "problems": list(self.problems),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """What ``verify`` found for one plan.

    Attributes:
        plan: the plan checked.
        groups: one ``GroupDiff`` per parameter group, ``"output"`` first.
        loss: the loss without the plan (the reference).
        loss_with_plan: the loss with the plan (None when the step failed).
        error: why the step with the plan failed (e.g. a ``CheckpointMismatchError``), or None.
        atol, rtol: the tolerances used (0 and 0: exact equality).
        scale_rtol: a tensor's tolerated largest difference relative to its largest magnitude
            (``REORDER_RTOL`` for plans that reorder sums, else 0).
    """

    plan: Plan
    groups: tuple[GroupDiff, ...]
    loss: float
    loss_with_plan: float | None
    error: str | None = None
    atol: float = 0.0
    rtol: float = 0.0
    scale_rtol: float = 0.0

    @property
    def passed(self) -> bool:
        """True when the step with the plan ran and every tensor matched."""
        return self.error is None and all(g.passed for g in self.groups)

    @property
    def problems(self) -> list[str]:
        """Every mismatch, one line each (the step's error first)."""
        out = [] if self.error is None else [f"step with the plan failed: {self.error}"]
        for g in self.groups:
            out.extend(f"{g.name}: {p}" for p in g.problems)
        return out

    @property
    def max_abs(self) -> float:
        return max((g.max_abs for g in self.groups), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "passed": self.passed,
            "loss": _json_float(self.loss),
            "loss_with_plan": None
            if self.loss_with_plan is None
            else _json_float(self.loss_with_plan),
            "error": self.error,
            "atol": self.atol,
            "rtol": self.rtol,
            "scale_rtol": self.scale_rtol,
            "groups": [g.to_dict() for g in self.groups],
        }

    def table(self) -> str:
        """A fixed-width table, one row per group, and the verdict."""
        w = max([5, *(len(g.name) for g in self.groups)])
        rows = [
            f"{'group':<{w}}  tensors  max abs diff  max rel diff  result",
            f"{'-' * w}  -------  ------------  ------------  ------",
        ]
        for g in self.groups:
            rows.append(
                f"{g.name:<{w}}  {g.tensors:>7}  {format_diff(g.max_abs):>12}  "
                f"{format_diff(g.max_rel):>12}  {'pass' if g.passed else 'FAIL'}"
            )
        rows.extend(f"  {p}" for p in self.problems)
        if self.scale_rtol:
            rows.append(
                f"  tolerance: within {self.scale_rtol:g} of each tensor's largest value "
                "(this plan reorders sums: chunked loss head or tiles)"
            )
        rows.append(f"{self.plan.summary()}: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def format_diff(x: float) -> str:
    """``0`` for exact, ``1.2e-07`` otherwise, ``inf`` for a missing tensor."""
    if x == 0:
        return "0"
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.1e}"


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


# -- running a step ------------------------------------------------------------------------


@dataclass
class _Run:
    loss: torch.Tensor
    outputs: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]
    input_grads: dict[str, torch.Tensor | None]


def _step(
    model: nn.Module,
    example: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None,
    params: list[tuple[str, nn.Parameter]],
    rng: _Rng,
) -> _Run:
    for _, p in params:
        p.grad = None
    ex = clone_example(example)
    rng.restore()
    out = call_model(model, ex)
    loss = loss_fn(out) if loss_fn is not None else default_loss(out)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(
            f"the loss must be a tensor with one element, got "
            f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}"
        )
    if not loss.requires_grad:
        raise ConfigError(
            "the loss does not require grad: no parameter of the model is trainable, or the "
            "example is run under torch.no_grad()"
        )
    loss.backward()
    return _Run(
        loss=loss.detach().clone(),
        outputs={
            k: t.detach().clone()
            for k, t in output_tensors(out, kv_cache=False)  # the cache is off with a plan
            if t is not loss
        },
        grads={n: None if p.grad is None else p.grad.detach().clone() for n, p in params},
        buffers={n: b.detach().clone() for n, b in model.named_buffers()},
        input_grads={
            k: None if t.grad is None else t.grad.detach().clone()
            for k, t in output_tensors(ex)
            if t.requires_grad
        },
    )


class _Rng:
    """The CPU and device RNG states at one moment, to start every run from."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.device = device
        self.mod: Any = None
        self.dev_state: torch.Tensor | None = None
        if device.type != "cpu":
            mod = getattr(torch, device.type, None)
            if mod is not None and hasattr(mod, "get_rng_state") and mod.is_available():
                self.mod = mod
                self.dev_state = mod.get_rng_state(device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.mod is not None:
            self.mod.set_rng_state(self.dev_state, self.device)


# -- comparing -----------------------------------------------------------------------------


def _diff(
    ref: torch.Tensor | None,
    got: torch.Tensor | None,
    atol: float,
    rtol: float,
    scale_rtol: float = 0.0,
) -> tuple[float, float, str | None]:
    """(max abs diff, max rel diff, problem or None) for one tensor."""
    if ref is None and got is None:
        return 0.0, 0.0, None
    if got is None:
        return math.inf, math.inf, "no gradient with the plan (it has one without)"
    if ref is None:
        return math.inf, math.inf, "a gradient with the plan but none without"
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return (
            math.inf,
            math.inf,
            (
                f"{tuple(got.shape)} {got.dtype} with the plan, {tuple(ref.shape)} {ref.dtype} without"
            ),
        )
    if ref.numel() == 0 or torch.equal(ref, got):
        return 0.0, 0.0, None
    a, b = got.detach().double(), ref.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = torch.where(both_nan, torch.zeros_like(a), (a - b).abs())
    same_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    d = torch.where(same_inf, torch.zeros_like(d), d)
    d = torch.nan_to_num(d, nan=math.inf)
    max_abs = float(d.max())
    scale = float(b.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max())
    max_rel = 0.0 if max_abs == 0 else (max_abs / scale if scale > 0 else math.inf)
    bad = d > atol + rtol * b.abs().nan_to_num(nan=0.0) + scale_rtol * scale
    if bool(bad.any()):
        n = int(bad.sum())
        return (
            max_abs,
            max_rel,
            (
                f"differs in {n} of {ref.numel()} values (max abs {format_diff(max_abs)}, "
                f"max rel {format_diff(max_rel)})"
            ),
        )
    return max_abs, max_rel, None


def compare_grads(
    ref: Mapping[str, torch.Tensor | None],
    got: Mapping[str, torch.Tensor | None],
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
) -> tuple[bool, float]:
    """Compare two sets of gradients by name, with the same per-tensor rule as ``verify``.

    Args:
        ref: name -> gradient (None: no gradient) of the reference run.
        got: the same for the run being checked; a name missing on one side counts as None.
        atol, rtol: allowed difference per value, ``atol + rtol * |ref|`` (default: exact).

    Returns:
        ``(equal, max_abs)``: whether every gradient is within tolerance, and the largest
        absolute difference (``inf`` when a gradient exists on one side only or the shapes differ).

    Example:
        >>> g = {"w": torch.ones(2)}
        >>> compare_grads(g, {"w": torch.tensor([1.0, 1.5])})
        (False, 0.5)
    """
    equal, max_abs = True, 0.0
    for name in dict.fromkeys([*got, *ref]):
        d_abs, _, problem = _diff(ref.get(name), got.get(name), atol, rtol)
        equal = equal and problem is None
        max_abs = max(max_abs, d_abs)
    return equal, max_abs


class _Group:
    def __init__(self, name: str) -> None:
        self.name = name
        self.tensors = 0
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.problems: list[str] = []

    def add(self, what: str, d: tuple[float, float, str | None]) -> None:
        self.tensors += 1
        self.max_abs = max(self.max_abs, d[0])
        self.max_rel = max(self.max_rel, d[1])
        if d[2] is not None:
            self.problems.append(f"{what}: {d[2]}")

    def done(self) -> GroupDiff:
        problems = self.problems[:_MAX_PROBLEMS]
        if len(self.problems) > _MAX_PROBLEMS:
            problems.append(f"... and {len(self.problems) - _MAX_PROBLEMS} more tensors")
        return GroupDiff(
            name=self.name,
            tensors=self.tensors,
            max_abs=self.max_abs,
            max_rel=self.max_rel,
            problems=tuple(problems),
        )


def _group_of(name: str, blocks: Sequence[str]) -> tuple[str, str]:
    """(group, name inside the group) of a parameter or buffer's qualified name."""
    for b in blocks:
        if name.startswith(b + "."):
            return b, name[len(b) + 1 :]
    owner, _, leaf = name.rpartition(".")
    return (owner or "(model)"), leaf


def _compare(
    ref: _Run,
    got: _Run | None,
    blocks: Sequence[str],
    atol: float,
    rtol: float,
    scale_rtol: float = 0.0,
    *,
    dropped: frozenset[str] = frozenset(),
) -> list[GroupDiff]:
    """Group by group; ``dropped``: output fields the plan does not return (not compared)."""
    groups: dict[str, _Group] = {"output": _Group("output")}

    def g(name: str) -> _Group:
        if name not in groups:
            groups[name] = _Group(name)
        return groups[name]

    out = groups["output"]
    out.add("loss", _diff(ref.loss, None if got is None else got.loss, atol, rtol, scale_rtol))
    if got is None:
        return [out.done()]
    for k, t in ref.outputs.items():
        if k in dropped and k not in got.outputs:
            continue
        if k in got.outputs:
            out.add(k, _diff(t, got.outputs[k], atol, rtol, scale_rtol))
        else:
            out.add(k, (math.inf, math.inf, "missing from the output with the plan"))
    for k, gi in ref.input_grads.items():
        g("inputs").add(f"{k}.grad", _diff(gi, got.input_grads.get(k), atol, rtol, scale_rtol))
    for n, gp in ref.grads.items():
        group, leaf = _group_of(n, blocks)
        g(group).add(f"{leaf}.grad", _diff(gp, got.grads.get(n), atol, rtol, scale_rtol))
    for n, t in ref.buffers.items():
        group, leaf = _group_of(n, blocks)
        g(group).add(f"{leaf} (buffer)", _diff(t, got.buffers.get(n), atol, rtol, scale_rtol))
    return [gr.done() for gr in groups.values()]


# -- the public function -------------------------------------------------------------------


def _tolerance(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {x!r}")
    return float(x)


def _reinstall(model: nn.Module, previous: Installed) -> None:
    """Put the caller's plan back; a budget plan still waiting for its first step starts over."""
    lazy = previous.pending
    if lazy is not None and lazy.result is None:
        names = list(previous.plan.blocks)
        enable(model, budget=lazy.budget, blocks=names, **lazy.options)
    else:
        enable(model, plan=previous.plan)


def verify(
    model: nn.Module,
    example: Any,
    plan: Plan | str = "full",
    *,
    blocks: BlockSpec = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    seed: int | None = 0,
    scale_rtol: float | None = None,
) -> VerifyReport:
    """Run one training step with and without ``plan`` and compare loss, gradients and buffers.

    Both runs start from the same RNG state (dropout draws the same masks), the same buffers
    and no gradients. Afterwards the model is as it was: the same plan installed (or none),
    the same buffers, the same ``.grad`` values, and the caller's RNG state untouched.

    Args:
        model: the model, on the device to check (in train mode to check dropout and BatchNorm).
        example: the input: a dict of keyword arguments, a tuple of positional ones, or a tensor.
        plan: a ``Plan`` or a policy name (``"full"``, ``"sqrt"``...).
        blocks: which modules are blocks, as in ``enable`` (default: ``find_blocks``).
        loss_fn: ``output -> scalar tensor`` (default: ``output.loss`` when there is one,
            else the sum of every output tensor that requires grad).
        atol, rtol: tolerated difference, elementwise ``|a - b| <= atol + rtol * |b|``
            (default 0 and 0: bit-exact).
        seed: RNG seed both runs start from; None starts from the current RNG state.
        scale_rtol: tolerated largest difference of a tensor relative to its largest magnitude;
            default ``REORDER_RTOL`` for plans that reorder sums (``reorders_sums``), else 0.

    Returns:
        A ``VerifyReport``; ``report.passed`` is False on any mismatch, a parameter that gets a
        gradient without the plan but none with it, or a step that fails with the plan
        (``report.error``, e.g. a ``CheckpointMismatchError``).

    Raises:
        ConfigError: bad arguments, or a model that fails on the example without the plan.
        PolicyError, PlanError, BlockError: a plan that cannot be installed on this model.

    Example:
        >>> report = gradckpt.verify(model, batch, "sqrt")
        >>> report.passed, report.max_abs
        (True, 0.0)
        >>> print(report.table())
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"verify needs an nn.Module, got {type(model).__name__}")
    if not isinstance(example, (Mapping, tuple, list, torch.Tensor)):
        raise ConfigError(
            "example must be a dict of keyword arguments, a tuple of positional arguments or a "
            f"tensor, got {type(example).__name__}"
        )
    if not isinstance(plan, (Plan, str)):
        raise ConfigError(
            f"plan must be a gradckpt.Plan or a policy name, got {type(plan).__name__}"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(
            f"loss_fn must be a function output -> scalar tensor, got {type(loss_fn).__name__}"
        )
    atol, rtol = _tolerance(atol, "atol"), _tolerance(rtol, "rtol")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"seed must be an integer >= 0 or None, got {seed!r}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameter: nothing to verify")
    if not torch.is_grad_enabled():
        raise ConfigError("verify runs a backward pass: call it outside torch.no_grad()")

    previous = installed_state(model)
    device = next(iter(model.parameters())).device
    saved_grads = {n: p.grad for n, p in model.named_parameters()}
    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def restore_buffers() -> None:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved_buffers:
                    b.copy_(saved_buffers[n])

    fork = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=fork, device_type=device.type):
        if seed is not None:
            torch.manual_seed(seed)
        rng = _Rng(device)
        try:
            # The plan is checked (and refused) before anything runs.
            if isinstance(plan, Plan):
                installed = enable(model, plan=plan, blocks=blocks)
            else:
                installed = enable(model, plan, blocks=blocks)
            disable(model)
            try:
                ref = _step(model, example, loss_fn, params, rng)
            except GradCkptError:
                raise
            except Exception as e:
                raise ConfigError(
                    f"the model fails on this example even without checkpointing: "
                    f"{type(e).__name__}: {e}"
                ) from e
            restore_buffers()
            enable(model, plan=installed, blocks=blocks)
            got: _Run | None = None
            error: str | None = None
            try:
                got = _step(model, example, loss_fn, params, rng)
            except Exception as e:  # the plan broke the step, e.g. CheckpointMismatchError
                error = f"{type(e).__name__}: {e}"
        finally:
            disable(model)
            restore_buffers()
            for n, p in model.named_parameters():
                p.grad = saved_grads.get(n)
            if previous is not None:
                _reinstall(model, previous)

    reorder = reorders_sums(installed)
    if scale_rtol is None:
        scale_rtol = REORDER_RTOL if reorder else 0.0
    scale_rtol = _tolerance(scale_rtol, "scale_rtol")
    dropped = frozenset({"logits"}) if installed.options.get("loss_head") else frozenset()
    groups = _compare(ref, got, installed.blocks, atol, rtol, scale_rtol, dropped=dropped)
    return VerifyReport(
        plan=installed,
        groups=tuple(groups),
        loss=float(ref.loss),
        loss_with_plan=None if got is None else float(got.loss),
        error=error,
        atol=atol,
        rtol=rtol,
        scale_rtol=scale_rtol,
    )
