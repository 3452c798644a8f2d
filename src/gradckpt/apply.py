"""Install a Plan on a model by overriding each block's ``forward``; ``disable`` undoes it exactly.

No wrapper modules are added, so ``state_dict()`` keys, ``named_parameters()`` and Hugging Face
``save_pretrained`` output are the same with and without gradckpt. The checkpoint wraps the block's
``forward`` (not ``__call__``), so module hooks such as FSDP2's all-gather stay outside the
recomputed region and do not run twice (the same choice transformers makes for its layers).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from . import checkpoint as ck
from .blocks import BlockSpec, resolve_blocks
from .errors import BlockError, GradCkptError, PlanError, PolicyError
from .plan import Decision, Plan
from .policies import make_plan

__all__ = [
    "BlockWrapper",
    "applied_plan",
    "disable",
    "early_stop_option",
    "enable",
    "register_decision",
]

#: ``wrapper(name, block, forward, plan_options) -> new_forward`` for one decision.
BlockWrapper = Callable[[str, nn.Module, Callable[..., Any], Mapping[str, Any]], Callable[..., Any]]

_WRAPPERS: dict[Decision, BlockWrapper] = {}


def register_decision(decision: Decision) -> Callable[[BlockWrapper], BlockWrapper]:
    """Register how blocks with ``decision`` are wrapped (one place per decision)."""

    def deco(fn: BlockWrapper) -> BlockWrapper:
        _WRAPPERS[decision] = fn
        return fn

    return deco


def run_checkpointed(
    forward: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    stateful: list[nn.Module],
    context_fn: ck.ContextFn | None = None,
    name: str | None = None,
    early_stop: bool = True,
) -> Any:
    """Checkpoint ``forward(*args, **kwargs)``, passing keyword tensors positionally.

    torch infers the device whose RNG it replays from positional tensors only, and its own
    keyword arguments (``debug``, ``context_fn``...) could collide with a block's; so keyword
    values travel as positional arguments and are put back by name inside. ``name`` (the
    block's qualified name) is what errors about this block say; ``early_stop`` is torch's
    (the plan option ``early_stop``, see ``early_stop_option``).
    """
    names = tuple(kwargs)
    n = len(args)

    def call(*flat: Any) -> Any:
        return forward(*flat[:n], **dict(zip(names, flat[n:])))

    if torch.compiler.is_compiling():
        # No per-block label here: dynamo would guard on the name it is built from and compile
        # every block separately, falling back to eager after recompile_limit (8) blocks.
        return ck.checkpoint(
            call, *args, *kwargs.values(), context_fn=context_fn, early_stop=early_stop
        )
    label = f"block {name!r}" if name else ck.describe(forward)
    call._gradckpt_label = label  # type: ignore[attr-defined]
    out = ck.checkpoint(
        call,
        *args,
        *kwargs.values(),
        stateful_modules=stateful,
        context_fn=context_fn,
        early_stop=early_stop,
    )
    _refuse_lazy_output(label, out)
    return out


def early_stop_option(options: Mapping[str, Any]) -> bool:
    """The plan option ``early_stop`` (default True): whether a recompute stops early.

    torch stops a recompute once every tensor the forward saved exists again, by raising
    through the rest of the block's forward; module post-hooks inside the block (other
    libraries' cleanup, e.g. bitsandbytes freeing dequantized weights) then never run during
    the recompute. ``enable(model, policy=..., early_stop=False)`` re-runs whole blocks instead.
    """
    value = options.get("early_stop", True)
    if not isinstance(value, bool):
        raise PolicyError(f"early_stop must be True or False, got {value!r}")
    return value


def _refuse_lazy_output(label: str, out: Any) -> None:
    # A generator's body runs when it is iterated, after the checkpointed region has closed: its
    # tensors would be neither checkpointed nor recomputed, so such blocks are refused.
    if inspect.isgenerator(out) or inspect.isasyncgen(out) or inspect.iscoroutine(out):
        raise BlockError(
            f"{label} returned a {type(out).__name__}: its code would run after the checkpoint "
            "has closed; gradckpt checkpoints blocks that return tensors (or tuples, lists, "
            "dicts of them): return a list instead, or leave this block out with blocks="
        )


@register_decision(Decision.RECOMPUTE)
def _recompute(
    name: str, block: nn.Module, forward: Callable[..., Any], options: Mapping[str, Any]
) -> Callable[..., Any]:
    stateful = ck.stateful_modules([block])
    early_stop = early_stop_option(options)

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return run_checkpointed(
            forward, args, kwargs, stateful=stateful, name=name, early_stop=early_stop
        )

    return checkpointed_forward


# -- segments: several consecutive blocks checkpointed as one unit ----------------------------


class _Ref:
    """Placeholder for a tensor of the previous block's output, found again at recompute time."""

    __slots__ = ("path",)

    def __init__(self, path: tuple[Any, ...]) -> None:
        self.path = path


def _tensor_paths(obj: Any, path: tuple[Any, ...] = ()) -> dict[int, tuple[Any, ...]]:
    if isinstance(obj, torch.Tensor):
        return {id(obj): path}
    out: dict[int, tuple[Any, ...]] = {}
    if isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            out.update(_tensor_paths(v, (*path, i)))
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_tensor_paths(v, (*path, k)))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _substitute(obj: Any, paths: dict[int, tuple[Any, ...]], found: list[int]) -> Any:
    if isinstance(obj, torch.Tensor) and id(obj) in paths:
        found.append(1)
        return _Ref(paths[id(obj)])
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_substitute(v, paths, found) for v in obj)
    if isinstance(obj, list):
        return [_substitute(v, paths, found) for v in obj]
    if type(obj) is dict:
        return {k: _substitute(v, paths, found) for k, v in obj.items()}
    return obj


def _fill(obj: Any, out: Any) -> Any:
    if isinstance(obj, _Ref):
        return _get(out, obj.path)
    if isinstance(obj, tuple):
        return tuple(_fill(v, out) for v in obj)
    if isinstance(obj, list):
        return [_fill(v, out) for v in obj]
    if type(obj) is dict:
        return {k: _fill(v, out) for k, v in obj.items()}
    return obj


@dataclass
class _SegmentRun:
    names: list[str]
    forwards: list[Callable[..., Any]]
    stateful: list[nn.Module]
    early_stop: bool = True
    gen: Generator[None, None, None] | None = None
    prev: Any = None
    expect: int = 0
    records: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)

    def abort(self) -> None:
        if self.gen is not None:
            ck.abort_region(self.gen)
        self.gen, self.prev, self.expect = None, None, 0

    def forward(self, j: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fwd = self.forwards[j]
        if j == 0:
            self.abort()  # a region left open by an exception outside the blocks
            if not torch.is_grad_enabled():
                return fwd(*args, **kwargs)
            records: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
            forwards = self.forwards

            def replay(*a: Any, **kw: Any) -> Any:
                out = forwards[0](*a, **kw)
                for k, (ra, rkw) in enumerate(records, start=1):
                    out = forwards[k](*_fill(ra, out), **_fill(rkw, out))
                return out

            self.records = records
            label = f"segment of blocks {self.names[0]!r} to {self.names[-1]!r}"
            self.gen = ck.open_region(
                replay,
                args,
                kwargs,
                stateful=self.stateful,
                name=label,
                early_stop=self.early_stop,
            )
        elif self.gen is None:
            return fwd(*args, **kwargs)
        else:
            if j != self.expect:
                self.abort()
                raise GradCkptError(
                    f"block {self.names[j]!r} ran out of order inside a checkpointed segment "
                    f"(expected {self.names[self.expect]!r}); the sqrt policy needs its blocks "
                    "called one after another: use policy='full' for this model"
                )
            found: list[int] = []
            paths = _tensor_paths(self.prev)
            rec = (_substitute(args, paths, found), _substitute(kwargs, paths, found))
            if not found:
                self.abort()
                raise GradCkptError(
                    f"block {self.names[j]!r} does not take block {self.names[j - 1]!r}'s output "
                    "as input, so they cannot be checkpointed as one segment: use policy='full' "
                    "or 'every:K' for this model"
                )
            self.records.append(rec)
        self.prev = None
        try:
            out = fwd(*args, **kwargs)
            _refuse_lazy_output(f"block {self.names[j]!r}", out)
        except BaseException:
            self.abort()
            raise
        if j == len(self.forwards) - 1:
            gen, self.gen = self.gen, None
            if gen is not None:
                ck.close_region(gen)
            self.expect = 0
        else:
            self.prev, self.expect = out, j + 1
        return out


# -- enable / disable ----------------------------------------------------------------------


@dataclass
class _Applied:
    plan: Plan
    restores: list[Callable[[], None]]
    segments: list[_SegmentRun]


_APPLIED: weakref.WeakKeyDictionary[nn.Module, _Applied] = weakref.WeakKeyDictionary()


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan currently installed on ``model`` by ``enable``, or None."""
    state = _APPLIED.get(model)
    return None if state is None else state.plan


def _override_forward(block: nn.Module, new_forward: Callable[..., Any]) -> Callable[[], None]:
    had = "forward" in block.__dict__
    old = block.__dict__.get("forward")
    block.forward = new_forward  # type: ignore[method-assign]

    def restore() -> None:
        if had:
            block.forward = old  # type: ignore[method-assign,assignment]
        else:
            block.__dict__.pop("forward", None)

    return restore


def _check_plan(plan: Plan, names: list[str]) -> None:
    if list(plan.blocks) != names:
        missing = [b for b in plan.blocks if b not in names]
        raise PlanError(
            "plan does not match the model's blocks"
            + (f": no block named {missing[0]!r}" if missing else "")
            + f" (plan has {len(plan.blocks)} blocks); make the plan for this model"
        )


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
            in the recompute (default True: torch stops once the saved tensors exist again).

    Returns:
        The installed ``Plan``. A second ``enable`` replaces the first.

    Example:
        >>> plan = gradckpt.enable(model, policy="every:2")
        >>> print(plan.summary())
        every:2: 4 recompute, 4 save
    """
    if not isinstance(model, nn.Module):
        raise GradCkptError(f"enable needs an nn.Module, got {type(model).__name__}")
    given = [
        k for k, v in (("policy", policy), ("budget", budget), ("plan", plan)) if v is not None
    ]
    if len(given) > 1:
        raise PolicyError(f"give one of policy=, budget= or plan=, not {' and '.join(given)}")
    from .offload import offload_options  # also registers OFFLOAD and offload_saved's wrapper

    offloading = offload_options(options)  # any policy, budget or plan can add these
    lazy_budget = None
    if plan is not None:
        if not isinstance(plan, Plan):
            raise PlanError(f"plan= must be a gradckpt.Plan, got {type(plan).__name__}")
        if options:
            raise PolicyError("options are part of the plan; do not pass them with plan=")
        if blocks is None:
            modules = dict(model.named_modules())
            _check_plan(plan, [b for b in plan.blocks if b in modules])
            blocks = list(plan.blocks)
        found = resolve_blocks(model, blocks)
        _check_plan(plan, [n for n, _ in found])
    elif budget is not None:
        from .planner.api import plan_for_budget  # the planner needs profiling machinery

        found = resolve_blocks(model, blocks)
        plan, lazy_budget = plan_for_budget(model, budget, blocks=found, **options)
    else:
        found = resolve_blocks(model, blocks)
        plan = make_plan("full" if policy is None else policy, [n for n, _ in found], **options)

    if offloading:
        plan = replace(plan, options={**plan.options, **offloading})
    for d in set(plan.decisions) - {Decision.SAVE} - set(_WRAPPERS):
        raise PlanError(f"decision {d.value!r} is not available in this build of gradckpt")
    for (name, block), decision in zip(found, plan.decisions):
        fwd = block.forward
        lazy = inspect.isgeneratorfunction(fwd) or inspect.isasyncgenfunction(fwd)
        if decision is not Decision.SAVE and (lazy or inspect.iscoroutinefunction(fwd)):
            raise BlockError(
                f"block {name!r} ({type(block).__name__}) has a generator or async forward: "
                "its code runs after the call returns, outside any checkpoint; leave it out "
                "with blocks= or keep its activations (Decision.SAVE)"
            )

    # Check everything before touching the model, so a refused plan leaves nothing half-applied.
    disable(model)
    state = _Applied(plan=plan, restores=[], segments=[])
    try:
        from .integrations import prepare_model

        state.restores.append(prepare_model(model, found, plan))
        in_segment = {i for a, b in plan.segments for i in range(a, b)}
        for i, ((name, block), decision) in enumerate(zip(found, plan.decisions)):
            if i in in_segment or (
                decision is Decision.SAVE and not plan.options.get("offload_saved")
            ):
                continue
            wrapped = _WRAPPERS[decision](name, block, block.forward, plan.options)
            state.restores.append(_override_forward(block, wrapped))
        for a, b in plan.segments:
            seg_blocks = [blk for _, blk in found[a:b]]
            run = _SegmentRun(
                names=[n for n, _ in found[a:b]],
                forwards=[blk.forward for blk in seg_blocks],
                stateful=ck.stateful_modules(seg_blocks),
                early_stop=early_stop_option(plan.options),
            )
            state.segments.append(run)
            for j, blk in enumerate(seg_blocks):
                state.restores.append(_override_forward(blk, _segment_forward(run, j)))
        if state.segments:
            # A segment's region stays open from its first block to its last; an exception
            # raised by the model's own code between two of them would leave the region's
            # saved-tensor hooks on the stack, catching every tensor saved afterwards (and
            # holding the region's inputs) until the next forward. Close it when the model's
            # forward ends, however it ends.
            handle = model.register_forward_hook(_closer(state.segments), always_call=True)
            state.restores.append(handle.remove)
        if lazy_budget is not None:  # no example: profile the first step, then re-plan
            state.restores.append(lazy_budget.install(model))
    except BaseException:
        for restore in reversed(state.restores):
            restore()
        raise
    _APPLIED[model] = state
    return plan


def _closer(runs: list[_SegmentRun]) -> Callable[..., None]:
    def close_open_segments(_model: nn.Module, _args: Any, _out: Any) -> None:
        for run in runs:
            if run.gen is not None:
                run.abort()

    return close_open_segments


def _segment_forward(run: _SegmentRun, j: int) -> Callable[..., Any]:
    own_forward = run.forwards[j]  # bound here: indexing by j inside would make dynamo guard on j

    def segment_forward(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # A segment's region stays open across blocks, which compiled frames (one per block)
            # cannot share: its recompute would replay eager code against a compiled forward's
            # saved tensors. Under torch.compile each block of a segment is checkpointed alone
            # (the memory of policy 'full', same gradients).
            if not torch.is_grad_enabled():
                return own_forward(*args, **kwargs)
            return run_checkpointed(
                own_forward, args, kwargs, stateful=[], early_stop=run.early_stop
            )
        return run.forward(j, args, kwargs)

    return segment_forward


def disable(model: nn.Module) -> None:
    """Remove gradckpt from ``model``: the model is exactly what it was before ``enable``.

    Calling it on a model without gradckpt does nothing.
    """
    state = _APPLIED.pop(model, None)
    if state is None:
        return
    for run in state.segments:
        run.abort()
    for restore in reversed(state.restores):
        restore()
