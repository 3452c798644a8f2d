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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint as tuc
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import CheckpointMismatchError
from .checkpoint import stateful_modules
from .decisions import early_stop_option, run_checkpointed
from .megatron import attention_recomputed
from .replay import DecisionLog, is_data_dependent
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

# -- what the recompute must reproduce: random draws and data-dependent decisions -------------


def _tags(func: Any) -> tuple[Any, ...]:
    return tuple(getattr(func, "tags", ()))


_RANDOM: dict[Any, bool] = {}  # per op overload (every op of a selective block asks)


def _is_random(func: Any) -> bool:
    known = _RANDOM.get(func)
    if known is None:
        known = _RANDOM[func] = torch.Tag.nondeterministic_seeded in _tags(func)
    return known


_WRITES: dict[Any, bool] = {}


def _writes(func: Any) -> bool:
    """Whether the op's schema says it writes into an input (``add_``, ``out=``)."""
    known = _WRITES.get(func)
    if known is None:
        schema = getattr(func, "_schema", None)
        known = _WRITES[func] = schema is not None and schema.is_mutable
    return known


_NO_REPLAY = object()  # fake or meta tensors: no real random numbers to reproduce


def _op_device(args: Any, kwargs: Mapping[str, Any]) -> torch.device | object:
    dev = kwargs.get("device")
    if dev is not None:
        return torch.device(dev)
    for x in tree_flatten(args)[0]:
        if isinstance(x, torch.Tensor):
            if type(x) is not torch.Tensor and not isinstance(x, nn.Parameter):
                from torch._subclasses.fake_tensor import is_fake

                if is_fake(x):
                    return _NO_REPLAY
            return x.device
    return torch.device("cpu")


def _default_generator(dev: torch.device) -> torch.Generator | None:
    if dev.type == "cpu":
        return torch.default_generator
    mod = getattr(torch, dev.type, None)
    gens = getattr(mod, "default_generators", None)
    if not gens or mod is None:
        return None
    index = dev.index if dev.index is not None else mod.current_device()
    return gens[index] if 0 <= index < len(gens) else None


def _rng_snapshot(args: Any, kwargs: Mapping[str, Any]) -> Any:
    """``(generator, state)`` before a random op, ``_NO_REPLAY``, or None when it cannot be taken."""
    gen = kwargs.get("generator")
    if not isinstance(gen, torch.Generator):
        dev = _op_device(args, kwargs)
        if dev is _NO_REPLAY or (isinstance(dev, torch.device) and dev.type == "meta"):
            return _NO_REPLAY
        gen = _default_generator(dev)  # type: ignore[arg-type]
    if gen is None:
        return None
    try:
        return gen, gen.get_state()
    except RuntimeError:
        return None


class _Learned:
    """Per block, which kept op calls not to keep, learned from past forwards and backwards.

    ``unreached``: torch stops a recompute as soon as every tensor the forward saved exists again
    (early stop), so ops after that point never run during backward and keeping their outputs is
    pure memory cost: in a Llama block that is the down projection's output, 1/12 of what the
    default save set keeps. After each recompute, calls of an op beyond what the recompute
    reached are noted and no longer kept; a call the recompute did reach is kept again.

    ``mutated``: calls whose kept output was modified in place (through the tensor or any alias
    of its storage), seen in a forward or a backward; they are recomputed from then on. This
    stays learned: a call not kept can no longer show whether it would be modified.

    Which ops are kept only changes memory and FLOPs, never results: an op not kept is
    recomputed from the same inputs.
    """

    def __init__(self) -> None:
        self.unreached: set[tuple[Any, int]] = set()
        self.mutated: set[tuple[Any, int]] = set()

    def learn_reached(self, caching: Any, cached: Any) -> None:
        storage = getattr(caching, "storage", None)
        reached = getattr(cached, "func_counter", None)
        if not isinstance(storage, Mapping) or not isinstance(reached, Mapping):
            return
        for func, entries in storage.items():
            n = reached.get(func, 0)
            for idx, entry in entries.items():
                if idx < n:
                    self.unreached.discard((func, idx))
                elif entry is not _RECOMPUTE:
                    self.unreached.add((func, idx))


class _Policy:
    """torch's per-op policy: keep ``save`` ops, never keep ops that write into their inputs."""

    def __init__(self, save: frozenset[Any], learned: _Learned) -> None:
        self.save = save
        self.learned = learned
        self.counts: dict[Any, int] = {}
        self.force_save = False
        self.saved_last = False  # whether the last call asked torch to keep the op's output

    def __call__(self, ctx: Any, func: Any, *args: Any, **kwargs: Any) -> tuc.CheckpointPolicy:
        # torch numbers the calls of each op the same way (its cache key is the op).
        idx = self.counts.get(func, 0)
        self.counts[func] = idx + 1
        self.saved_last = False
        if self.force_save:  # a random op whose generator state could not be noted
            self.force_save = False
            self.saved_last = True
            return tuc.CheckpointPolicy.MUST_SAVE
        if _writes(func):
            # An in-place op's cached result would be handed back without writing into the
            # recomputed input (the `noise.bernoulli_(p)` of CPU dropout): always re-run it.
            return tuc.CheckpointPolicy.PREFER_RECOMPUTE
        if func in self.save or getattr(func, "overloadpacket", None) in self.save:
            call = (func, idx)
            if call in self.learned.unreached or call in self.learned.mutated:
                return tuc.CheckpointPolicy.PREFER_RECOMPUTE
            self.saved_last = True
            return tuc.CheckpointPolicy.PREFER_SAVE
        return tuc.CheckpointPolicy.PREFER_RECOMPUTE


# torch's selective-checkpoint internals (torch/utils/checkpoint.py, 2.4 to 2.13): the cache
# marker for "recompute this call", the ops it neither counts nor caches, and its cache key.
_RECOMPUTE = getattr(tuc, "_RECOMPUTE", None)
_VERSION_WRAPPER = getattr(tuc, "_VersionWrapper", None)
_SAC_IGNORED: Any = getattr(tuc, "SAC_IGNORED_OPS", frozenset({aten.detach.default}))
_detach_helper: Callable[[Any], Any] = getattr(tuc, "_detach_helper", lambda x: x.detach())


def _cache_key(func: Any, args: Any) -> Any:
    # torch keys its cache by the op, except inductor_compiled_code regions (one key each); the
    # name test avoids calling torch's key function, which imports a module, on every op.
    key_fn = getattr(tuc, "_sac_storage_key", None)
    if key_fn is None or getattr(func, "__name__", "") != "inductor_compiled_code":
        return func
    return key_fn(func, args)


def _leaves(x: Any) -> list[Any]:
    return (
        [x]
        if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple, dict))
        else (tree_flatten(x)[0])
    )


def _storage_id(x: Any) -> int | None:
    """Identity of a tensor's storage, shared by all its aliases; None where there is none."""
    if not isinstance(x, torch.Tensor):
        return None
    try:
        return int(x.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None  # tensor subclasses without a storage of their own


def _written(func: Any, args: Any, kwargs: Mapping[str, Any]) -> list[Any]:
    """The tensors an op writes into (``self`` of ``add_``, ``out=``), from its schema."""
    written: list[Any] = []
    for i, arg in enumerate(func._schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        if arg.name in kwargs:
            written.append(kwargs[arg.name])
        elif i < len(args) and not arg.kwarg_only:
            written.append(args[i])
    return tree_flatten(written)[0]


@dataclass
class _BlockRun:
    """One forward of one block: what its recompute must reproduce.

    Kept outputs must not change before the recompute reads them. torch checks each kept
    tensor's version counter, but aliases that do not share it go unseen: a 4-D
    ``torch.matmul`` runs ``bmm`` and returns ``_unsafe_view(bmm_out)``, a new version counter
    on the same storage, so ``scores += bias`` (BigBird's block-sparse attention,
    Nystromformer's ``context_layer += conv(v)``) rewrote the kept ``bmm`` output and backward
    used the biased scores, silently (a parameter gradient off by 6.5 in a two-block toy;
    3.3e-4 and 1.4e-4 on tiny BigBird and Nystromformer). So a kept call whose storage is
    written in any way is recomputed instead of kept, which costs no memory (it frees the kept
    tensor) and one re-run of that op in backward (what ``full`` pays for every op):

    - inside the block, every op that writes (its schema says so) is checked against the
      storages of the kept outputs before it runs;
    - after the block, the kept tensor's own version and that of each alias made in the block
      by an op that is not a view (views share the counter already; in practice
      ``_unsafe_view``) are compared when the recompute reaches the call. A handle on each
      such alias shares its storage (0 extra bytes) and is dropped when the call is used.

    Where nothing is written (Llama, GPT-2, BERT, Mixtral bench presets, sdpa or eager, 2
    layers, batch 2 x 64) the bytes kept, the peak and the FLOPs re-run are exactly those
    before this check. The alternative, a private copy of every kept ``bmm`` output that
    escapes through ``_unsafe_view``, would add the scores' bytes (batch * heads * seq^2 * 4,
    48 MiB per block for GPT-2 small's 12 heads at batch 1 x 1024 in fp32) to every
    eager-attention model, written or not, and would still leave GPT-OSS's experts refused
    (their ``out.add_(bias)`` writes into the kept tensor itself).
    """

    name: str
    policy: _Policy
    learned: _Learned
    caching: Any = None  # torch's forward (caching) mode, whose storage holds what is kept
    rng: list[Any] = field(default_factory=list)
    decisions: DecisionLog = field(default_factory=lambda: DecisionLog("block"))
    rng_i: int = 0
    kept_on: dict[int, list[tuple[Any, int]]] = field(default_factory=dict)  # storage -> calls
    aliases: dict[tuple[Any, int], list[tuple[torch.Tensor, int]]] = field(default_factory=dict)

    def _entries(self, mode: Any) -> Any:
        storage = getattr(mode, "storage", None)
        return storage if isinstance(storage, Mapping) else None

    def noted(self, func: Any, args: Any, out: Any, writes: bool) -> None:
        """After ``func`` ran in forward: note where a kept output lives, or a new alias of one."""
        if not self.policy.saved_last and (writes or not self.kept_on):
            return  # the common op: nothing of it kept, and no kept output it could alias
        storage = self._entries(self.caching)
        if storage is None or _RECOMPUTE is None or func in _SAC_IGNORED:
            return
        key = _cache_key(func, args)
        counter = getattr(self.caching, "func_counter", {})
        call = (key, counter.get(key, 0) - 1)
        entry = storage.get(key, {}).get(call[1], _RECOMPUTE)
        if entry is not _RECOMPUTE:
            for w in _leaves(entry):
                sid = _storage_id(getattr(w, "val", None))
                if sid is not None:
                    self.kept_on.setdefault(sid, []).append(call)
            return
        if writes or getattr(func, "is_view", False) or not self.kept_on:
            return
        for x in _leaves(out):
            for kept_call in self.kept_on.get(_storage_id(x), ()):  # type: ignore[arg-type]
                if storage.get(kept_call[0], {}).get(kept_call[1]) is _RECOMPUTE:
                    continue  # no longer kept (another of its outputs was written)
                handle = _detach_helper(x)  # shares x's version counter and storage
                self.aliases.setdefault(kept_call, []).append((handle, x._version))

    def written(self, func: Any, args: Any, kwargs: Mapping[str, Any]) -> None:
        """Before ``func`` writes into tensors in forward: stop keeping what shares their storage."""
        if not self.kept_on:
            return
        for x in _written(func, args, kwargs):
            for call in self.kept_on.pop(_storage_id(x), ()):  # type: ignore[arg-type]
                self.recompute(call)

    def recompute(self, call: tuple[Any, int]) -> None:
        """Recompute ``call`` in backward instead of using its (modified) kept output."""
        storage = self._entries(self.caching)
        if storage is not None and call[1] in storage.get(call[0], {}):
            storage[call[0]][call[1]] = _RECOMPUTE
        self.learned.mutated.add(call)
        self.aliases.pop(call, None)

    def changed(self, call: tuple[Any, int], entry: Any) -> bool:
        """Whether a kept output was modified since forward, through itself or an alias."""
        wrapped = (
            w
            for w in _leaves(entry)
            if _VERSION_WRAPPER is not None and isinstance(w, _VERSION_WRAPPER)
        )
        if any(w.version is not None and w.val._version != w.version for w in wrapped):
            return True
        return any(h._version != v for h, v in self.aliases.get(call, ()))

    def check_all(self) -> None:
        """End of forward: recompute kept calls changed in ways no op's schema showed."""
        storage = self._entries(self.caching)
        if storage is None:
            return
        for key, entries in list(storage.items()):
            for idx, entry in list(entries.items()):
                if entry is not _RECOMPUTE and self.changed((key, idx), entry):
                    self.recompute((key, idx))

    def before_cached(self, cached: Any, func: Any, args: Any) -> None:
        """Recompute: a kept call about to be used is recomputed if it changed after forward."""
        storage = self._entries(cached)
        if storage is None or _RECOMPUTE is None or func in _SAC_IGNORED:
            return
        key = _cache_key(func, args)
        call = (key, getattr(cached, "func_counter", {}).get(key, 0))
        entry = storage.get(key, {}).get(call[1])
        if entry is None or entry is _RECOMPUTE:
            return
        if self.changed(call, entry):
            self.recompute(call)
        else:
            self.aliases.pop(call, None)  # used now: let its storage go when the recompute does

    def mismatch(self, what: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"block {self.name!r}: the recompute during backward ran {what} than the forward "
            "did, so its kept results cannot be matched up; the block's forward is not "
            "deterministic (Python-side state or sizes that change between calls): make it "
            "deterministic, or give this block Decision.RECOMPUTE or SAVE"
        )


def _record_op(run: _BlockRun, func: Any, args: Any, kwargs: Any, call: Callable[[], Any]) -> Any:
    """Forward: note generator states before random ops and keep data-dependent decisions."""
    if _is_random(func):
        snap = _rng_snapshot(args, kwargs)
        run.rng.append(snap)
        if snap is None:
            run.policy.force_save = True
    writes = _writes(func)
    if writes:
        run.written(func, args, kwargs)
    out = call()
    run.noted(func, args, out, writes)
    if is_data_dependent(func):
        run.decisions.record(func, out)
    return out


def _replay_op(
    run: _BlockRun, cached: Any, func: Any, args: Any, kwargs: Any, call: Callable[[], Any]
) -> Any:
    """Recompute: restore generator states, hand back kept decisions, name mutation errors."""
    if _is_random(func):
        if run.rng_i >= len(run.rng):
            raise run.mismatch("more random ops")
        snap = run.rng[run.rng_i]
        run.rng_i += 1
        if isinstance(snap, tuple):
            snap[0].set_state(snap[1])
    common = _RECOMPUTE is not None and not is_data_dependent(func)
    if common and _cached_entry(cached, func, args) is _RECOMPUTE:
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
    if not isinstance(storage, Mapping) or counter is None or func in _SAC_IGNORED:
        return None
    key = _cache_key(func, args)
    entries = storage.get(key)
    return None if entries is None else entries.get(counter.get(key, 0))


def _consumed_entry(cached: Any, func: Any, args: Any) -> tuple[Any, int] | None:
    """(the cache entries of ``func``'s key, this call's index) if that call's kept output was
    already handed to an earlier backward (torch marks it consumed), else None."""
    storage = getattr(cached, "storage", None)
    counter = getattr(cached, "func_counter", None)
    if _CONSUMED is None or not isinstance(storage, Mapping) or counter is None:
        return None
    key = _cache_key(func, args)
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


def _merged(caching: Any, cached: Any, run: _BlockRun) -> tuple[Any, Any] | None:
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

        _gradckpt_run: _BlockRun

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

        _gradckpt_run: _BlockRun

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

    def __init__(self, run: _BlockRun, inner: TorchDispatchMode) -> None:
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
    name: str, save: frozenset[Any], learned: _Learned | None = None
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

    known = learned if learned is not None else _Learned()

    def make() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
        if torch.compiler.is_compiling():
            # Under torch.compile the policy only tags graph nodes, and compiled random ops
            # replay their seeds themselves (functionalized RNG).
            policy = _Policy(save, _Learned())
            return tuc.create_selective_checkpoint_contexts(policy)  # type: ignore[no-any-return]
        policy = _Policy(save, known)
        caching, cached = tuc.create_selective_checkpoint_contexts(policy)
        run = _BlockRun(
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


_LEARNED: weakref.WeakKeyDictionary[nn.Module, dict[frozenset[Any], _Learned]] = (
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
    learned = _LEARNED.setdefault(block, {}).setdefault(save, _Learned())
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
