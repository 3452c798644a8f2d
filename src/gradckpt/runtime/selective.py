"""SELECTIVE decision and ``policy="selective"``: checkpoint a block but keep its expensive ops' outputs.

Layer-level recompute (``RECOMPUTE``) re-runs everything inside a block. Selective checkpointing
keeps the outputs of the ops that are expensive to redo (matrix multiplies and attention kernels)
and recomputes only the cheap ones (pointwise ops, norms, activations, softmax), as torchtitan's
op-level SAC and Megatron-LM's selective recompute do (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models"). It is built on torch's own selective
checkpoint contexts (``torch.utils.checkpoint.create_selective_checkpoint_contexts``), with four
additions torch leaves to the caller:

- Random ops (dropout masks: ``native_dropout``, ``bernoulli_``...) are re-run with the exact
  generator state they had in forward (the state is noted before each one and restored before
  its re-run), so masks match even when ops kept in between consumed random numbers (a CUDA
  flash-attention kernel with dropout does) and even for in-place random ops, which torch's
  cache cannot hold (GPT-2 and BERT draw dropout masks with an in-place ``bernoulli_`` on CPU).
- Data-dependent decisions (``topk``/``sort``/``argmax`` routing in a mixture of experts,
  ``nonzero``...) are kept: their integer outputs are stored in forward and handed back during
  recompute, so tokens go to the same experts even if the recompute would round differently.
- Outputs the recompute never reaches are not kept from the second step on: torch stops a
  recompute once every tensor the forward saved for backward exists again, so the ops after
  that point (a Llama block's down projection) never run in backward, and keeping their
  outputs only costs memory. This is learned per block from each backward and unlearned if a
  later one reaches them.
- A kept output that is modified in place afterwards, through itself or any alias of its
  storage (``scores += bias`` on a 4-D matmul's result, ``out.add_(bias)`` after a grouped
  matmul in GPT-OSS's experts, ``relu_`` after a Linear), is not used: that op is recomputed
  instead, in this backward and, learned per block, in later steps. Inside the block this is
  seen before the write; after it, when the recompute reaches the op.

The ``megatron`` preset does the opposite: it keeps everything a block keeps without
checkpointing and recomputes only the attention core (each ``scaled_dot_product_attention``
call), which is what Megatron-LM's ``--recompute-granularity selective`` does by default.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.utils.checkpoint as tuc
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import CheckpointMismatchError
from .checkpoint import stateful_modules
from .decisions import early_stop_option, run_checkpointed
from .megatron import attention_recomputed
from .replay import DecisionLog, is_data_dependent
from .sac_state import (
    RECOMPUTE,
    SAC_IGNORED,
    BlockRun,
    Learned,
    Policy,
    cache_key,
    is_random,
    op_writes,
    rng_snapshot,
)
from .save_ops import (
    DEFAULT_SAVE_OPS,
    OP_GROUPS,
    POLICY_HELP,
    POLICY_OPTIONS,
    PRESETS,
    normalize_save_ops,
    resolve_save_ops,
    selective_options,
    selective_policy,
)

__all__ = [
    "DEFAULT_SAVE_OPS",
    "OP_GROUPS",
    "POLICY_HELP",
    "POLICY_OPTIONS",
    "PRESETS",
    "normalize_save_ops",
    "resolve_save_ops",
    "selective_block",
    "selective_context_fn",
    "selective_policy",
]

aten = torch.ops.aten


def _record_op(run: BlockRun, func: Any, args: Any, kwargs: Any, call: Callable[[], Any]) -> Any:
    """Forward: note generator states before random ops and keep data-dependent decisions."""
    if is_random(func):
        snap = rng_snapshot(args, kwargs)
        run.rng.append(snap)
        if snap is None:
            run.policy.force_save = True
    writes = op_writes(func)
    if writes:
        run.written(func, args, kwargs)
    out = call()
    run.noted(func, args, out, writes)
    if is_data_dependent(func):
        run.decisions.record(func, out)
    return out


def _replay_op(
    run: BlockRun, cached: Any, func: Any, args: Any, kwargs: Any, call: Callable[[], Any]
) -> Any:
    """Recompute: restore generator states, hand back kept decisions, name mutation errors."""
    if is_random(func):
        if run.rng_i >= len(run.rng):
            raise run.mismatch("more random ops")
        snap = run.rng[run.rng_i]
        run.rng_i += 1
        if isinstance(snap, tuple):
            snap[0].set_state(snap[1])
    common = RECOMPUTE is not None and not is_data_dependent(func)
    if common and _cached_entry(cached, func, args) is RECOMPUTE:
        return call()  # the common op: not kept, torch's cached mode simply runs it

    def kept_or_run() -> Any:
        run.before_cached(cached, func, args)
        try:
            if not _consumed(cached, func, args):
                return call()
            with _recompute_consumed(cached, func, args):
                return call()
        except RuntimeError as e:
            if isinstance(e, CheckpointMismatchError):
                raise
            if "not found in storage" in str(e):
                raise run.mismatch(f"an op ({func}) more often") from e
            raise

    if is_data_dependent(func):
        return run.decisions.replay(func, kept_or_run)
    return kept_or_run()


_CONSUMED = getattr(tuc, "_CONSUMED", None)


def _cached_entry(cached: Any, func: Any, args: Any) -> Any:
    """What torch's cached mode holds for this call of ``func`` (None if it holds nothing)."""
    storage = getattr(cached, "storage", None)
    counter = getattr(cached, "func_counter", None)
    if not isinstance(storage, Mapping) or counter is None or func in SAC_IGNORED:
        return None
    key = cache_key(func, args)
    entries = storage.get(key)
    return None if entries is None else entries.get(counter.get(key, 0))


def _consumed_entry(cached: Any, func: Any, args: Any) -> tuple[Any, int] | None:
    """(the cache entries of ``func``'s key, this call's index) if that call's kept output was
    already handed to an earlier backward (torch marks it consumed), else None."""
    storage = getattr(cached, "storage", None)
    counter = getattr(cached, "func_counter", None)
    if _CONSUMED is None or not isinstance(storage, Mapping) or counter is None:
        return None
    key = cache_key(func, args)
    entries = storage.get(key)
    if entries is None:
        return None
    idx = counter.get(key, 0)
    return (entries, idx) if entries.get(idx) is _CONSUMED else None


def _consumed(cached: Any, func: Any, args: Any) -> bool:
    return _consumed_entry(cached, func, args) is not None


@contextlib.contextmanager
def _recompute_consumed(cached: Any, func: Any, args: Any) -> Iterator[None]:
    """Recompute a kept output that an earlier backward of this region already used.

    torch hands each kept output to the first recompute only (and frees it), then refuses
    any further backward through the region ("backward an extra time"). A second backward
    (``retain_graph=True``, several ``autograd.grad`` calls, a double backward) re-runs
    those ops instead, from the same recomputed inputs, with random ops and decisions
    replayed as in every recompute: the gradients of a full recompute, no memory held.
    """
    found = _consumed_entry(cached, func, args)
    if found is None:
        yield
        return
    entries, idx = found
    entries[idx] = tuc._RECOMPUTE  # torch's cached mode then simply runs the op
    try:
        yield
    finally:
        entries[idx] = _CONSUMED


# One dispatch mode per block call, not two: the forward and recompute work above runs inside
# torch's own selective-checkpoint modes (subclasses of them), so each op goes through one
# Python __torch_dispatch__ as with torch's SAC alone. Where those private classes are not
# what this code expects, a mode stacked right above torch's does the same (``_Stacked``).
_CACHING = getattr(tuc, "_CachingTorchDispatchMode", None)
_CACHED = getattr(tuc, "_CachedTorchDispatchMode", None)


def _merged(caching: Any, cached: Any, run: BlockRun) -> tuple[Any, Any] | None:
    """torch's two modes turned into gradckpt's (``__class__`` swapped), or None."""
    if (
        _RecordSAC is None
        or _ReplaySAC is None
        or type(caching) is not _CACHING
        or type(cached) is not _CACHED
    ):
        return None
    caching.__class__ = _RecordSAC
    cached.__class__ = _ReplaySAC
    caching._gradckpt_run = run
    cached._gradckpt_run = run
    return caching, cached


if _CACHING is not None and _CACHED is not None:

    class _RecordSAC(_CACHING):  # type: ignore[misc, valid-type]
        """torch's forward (caching) mode with ``_record_op`` around each op."""

        _gradckpt_run: BlockRun

        def __exit__(self, *exc: Any) -> Any:
            out = super().__exit__(*exc)
            if exc[0] is None:
                self._gradckpt_run.check_all()
            return out

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            parent = super().__torch_dispatch__
            return _record_op(
                self._gradckpt_run, func, args, kwargs, lambda: parent(func, types, args, kwargs)
            )

    class _ReplaySAC(_CACHED):  # type: ignore[misc, valid-type]
        """torch's recompute (cached) mode with ``_replay_op`` around each op."""

        _gradckpt_run: BlockRun

        def __enter__(self) -> Any:
            self._gradckpt_run.rng_i = 0
            self._gradckpt_run.decisions.rewind()
            return super().__enter__()

        def __exit__(self, *exc: Any) -> Any:
            out = super().__exit__(*exc)
            run = self._gradckpt_run
            run.learned.learn_reached(run.caching, self)
            return out

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            parent = super().__torch_dispatch__
            return _replay_op(
                self._gradckpt_run,
                self,
                func,
                args,
                kwargs,
                lambda: parent(func, types, args, kwargs),
            )

else:  # pragma: no cover - torch without these private classes
    _RecordSAC = _ReplaySAC = None  # type: ignore[assignment, misc]


class _Stacked(TorchDispatchMode):
    """A mode entered right above torch's selective-checkpoint mode ``inner`` (it sees ops first)."""

    def __init__(self, run: BlockRun, inner: TorchDispatchMode) -> None:
        super().__init__()
        self.run = run
        self.inner = inner

    def __enter__(self) -> Any:
        self.inner.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self.inner.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self.inner.__exit__(*exc)


class _Record(_Stacked):
    """``_record_op`` in a mode of its own above torch's caching mode."""

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if exc[0] is None:
            self.run.check_all()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        return _record_op(self.run, func, args, kwargs, lambda: func(*args, **kwargs))


class _Replay(_Stacked):
    """``_replay_op`` in a mode of its own above torch's cached mode."""

    def __enter__(self) -> Any:
        self.run.rng_i = 0
        self.run.decisions.rewind()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.run.learned.learn_reached(self.run.caching, self.inner)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        return _replay_op(self.run, self.inner, func, args, kwargs, lambda: func(*args, **kwargs))


def selective_context_fn(
    name: str, save: frozenset[Any], learned: Learned | None = None
) -> Callable[[], tuple[AbstractContextManager[Any], AbstractContextManager[Any]]]:
    """The ``context_fn`` that checkpoints block ``name`` keeping the outputs of ops in ``save``.

    Args:
        name: the block's qualified name (errors say it).
        save: op overloads and packets to keep (``resolve_save_ops(...)``).

    Returns:
        A function returning torch's (forward, recompute) context pair, for ``checkpoint``.

    Example:
        >>> fn = selective_context_fn("layers.0", resolve_save_ops(["mm"]))
        >>> y = gradckpt.checkpoint(layer, x, context_fn=fn)
    """

    known = learned if learned is not None else Learned()

    def make() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
        if torch.compiler.is_compiling():
            # Under torch.compile the policy only tags graph nodes, and compiled random ops
            # replay their seeds themselves (functionalized RNG).
            policy = Policy(save, Learned())
            return tuc.create_selective_checkpoint_contexts(policy)  # type: ignore[no-any-return]
        policy = Policy(save, known)
        caching, cached = tuc.create_selective_checkpoint_contexts(policy)
        run = BlockRun(
            name=name,
            policy=policy,
            learned=known,
            caching=caching,
            decisions=DecisionLog(f"block {name!r}"),
        )
        merged = _merged(caching, cached, run)
        if merged is not None:
            return merged  # type: ignore[no-any-return]
        return _Record(run, caching), _Replay(run, cached)  # type: ignore[arg-type]

    return make


_LEARNED: weakref.WeakKeyDictionary[nn.Module, dict[frozenset[Any], Learned]] = (
    weakref.WeakKeyDictionary()
)


def selective_block(
    name: str, block: nn.Module, forward: Callable[..., Any], options: Mapping[str, Any]
) -> Callable[..., Any]:
    opts = selective_options(options)
    if opts["preset"] == "megatron":
        return attention_recomputed(name, forward)
    save = resolve_save_ops(opts["save_ops"])
    # What the recompute never reaches is a property of the block's code, so it is remembered per
    # block across enable() calls: the planner's profiling run teaches it, and the first training
    # step under a new plan then keeps exactly what later steps keep (the peak it predicted).
    learned = _LEARNED.setdefault(block, {}).setdefault(save, Learned())
    context_fn = selective_context_fn(name, save, learned)
    stateful = stateful_modules([block])
    early_stop = early_stop_option(options)

    def selective_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return run_checkpointed(
            forward,
            args,
            kwargs,
            stateful=stateful,
            context_fn=context_fn,
            name=name,
            early_stop=early_stop,
        )

    return selective_forward
