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

__all__ = ["BlockWrapper", "applied_plan", "disable", "enable", "register_decision"]

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
) -> Any:
    """Checkpoint ``forward(*args, **kwargs)``, passing keyword tensors positionally.

    torch infers the device whose RNG it replays from positional tensors only, and its own
    keyword arguments (``debug``, ``context_fn``...) could collide with a block's; so keyword
    values travel as positional arguments and are put back by name inside. ``name`` (the
    block's qualified name) is what errors about this block say.
    """
    names = tuple(kwargs)
    n = len(args)

    def call(*flat: Any) -> Any:
        return forward(*flat[:n], **dict(zip(names, flat[n:])))

    if torch.compiler.is_compiling():
        # No per-block label here: dynamo would guard on the name it is built from and compile
        # every block separately, falling back to eager after recompile_limit (8) blocks.
        return ck.checkpoint(call, *args, *kwargs.values(), context_fn=context_fn)
    label = f"block {name!r}" if name else ck.describe(forward)
    call._gradckpt_label = label  # type: ignore[attr-defined]
    out = ck.checkpoint(call, *args, *kwargs.values(), stateful=stateful, context_fn=context_fn)
    _refuse_lazy_output(label, out)
    return out


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

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return run_checkpointed(forward, args, kwargs, stateful=stateful, name=name)

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
    """The blocks of one segment: one checkpointed region from the first block that runs to the
    last, whose recompute replays the blocks that ran, each from the RNG state it saw.

    Between two blocks the region steps aside (its saved-tensor hooks come off the stack), so
    the model's own code there is not part of the region, and a block the model skips
    (LayerDrop: ``if self.training and torch.rand([]) < self.layerdrop: continue`` in BART,
    OPT, Whisper, wav2vec2...) is skipped by the replay too. The model's random draws between
    blocks advance the RNG in forward only, so each replayed block restores its own entry
    state instead of running on from the previous block's (without that, OPT's dropout masks
    differed in the recompute: wrong gradients, no error).
    """

    names: list[str]
    forwards: list[Callable[..., Any]]
    stateful: list[nn.Module]
    gen: Generator[None, None, None] | None = None
    hooks: list[Any] = field(default_factory=list)  # what the open region pushed, bottom first
    paused: bool = False
    prev: Any = None  # the output of the last block that ran
    last: int = -1  # its index
    records: list[tuple[int, Any, Any, ck.RngState]] = field(default_factory=list)

    def _resume(self) -> None:
        if self.paused:
            ck.resume_region(self.hooks)
            self.paused = False

    def abort(self) -> None:
        """Close the region after an error: nothing it saved will be used."""
        if self.gen is not None:
            self._resume()
            ck.abort_region(self.gen)
        self._reset()

    def finish(self) -> None:
        """Close a region whose last blocks did not run (skipped, or the forward ended early)."""
        gen = self.gen
        if gen is not None:
            self._resume()
        self._reset()
        if gen is not None:
            ck.close_region(gen)

    def _reset(self) -> None:
        self.gen, self.hooks, self.paused, self.prev, self.last = None, [], False, None, -1

    def _open(self, j: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        records: list[tuple[int, Any, Any, ck.RngState]] = [
            (j, None, None, ck.RngState(*args, *kwargs.values()))
        ]
        forwards = self.forwards

        def replay(*a: Any, **kw: Any) -> Any:
            # torch restored the RNG of the first block's positional inputs; this restores each
            # block's own (keyword tensors' devices included) and forks what it touches.
            with ck.fork_rng(r[3] for r in records):
                k, _, _, rng = records[0]
                rng.restore()
                out = forwards[k](*a, **kw)
                for k, ra, rkw, rng in records[1:]:
                    rng.restore()
                    out = forwards[k](*_fill(ra, out), **_fill(rkw, out))
            return out

        self.records = records
        label = f"segment of blocks {self.names[j]!r} to {self.names[-1]!r}"
        below = ck.saved_hooks_top()
        self.gen = ck.open_region(replay, args, kwargs, stateful=self.stateful, name=label)
        try:
            self.hooks = ck.pushed_since(below)
        except BaseException:
            self.abort()
            raise

    def forward(self, j: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fwd = self.forwards[j]
        if self.gen is not None and j <= self.last:
            if j != 0:
                after = self.names[self.last]
                self.abort()
                raise GradCkptError(
                    f"block {self.names[j]!r} ran out of order inside a checkpointed segment "
                    f"(after {after!r}); the sqrt policy needs its blocks called one after "
                    "another, each at most once: use policy='full' for this model"
                )
            self.finish()  # a new forward: the previous one's region is complete as it is
        if self.gen is None:
            if not torch.is_grad_enabled():
                return fwd(*args, **kwargs)
            self._open(j, args, kwargs)
        else:
            found: list[int] = []
            paths = _tensor_paths(self.prev)
            rec = (_substitute(args, paths, found), _substitute(kwargs, paths, found))
            if not found:
                before = self.names[self.last]
                self.abort()
                raise GradCkptError(
                    f"block {self.names[j]!r} does not take block {before!r}'s output as "
                    "input, so they cannot be checkpointed as one segment: use policy='full' "
                    "or 'every:K' for this model"
                )
            self.records.append((j, *rec, ck.RngState(*args, *kwargs.values())))
            self._resume()
        self.prev = None
        try:
            out = fwd(*args, **kwargs)
            _refuse_lazy_output(f"block {self.names[j]!r}", out)
        except BaseException:
            self.abort()
            raise
        if j == len(self.forwards) - 1:
            self.finish()
        else:
            self.prev, self.last = out, j
            self.paused = ck.pause_region(self.hooks)
            if not self.paused:
                self.abort()
                raise GradCkptError(
                    f"block {self.names[j]!r} left saved-tensor hooks of its own open when it "
                    "returned, so it cannot be part of a checkpointed segment: use "
                    "policy='full' for this model"
                )
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
            tensor moved by it and by OFFLOAD blocks.

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
            # A segment whose last blocks did not run (LayerDrop skipped them) is complete
            # as it is; after an exception inside a block its region is already aborted.
            run.finish()

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
            return run_checkpointed(own_forward, args, kwargs, stateful=[])
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
