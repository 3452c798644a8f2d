"""What a selective block's recompute must reproduce, per op and per block call (for ``selective``).

Which ops draw random numbers, write into their inputs or make data-dependent decisions (looked up
once per op overload); the generator state noted before a random op; the per-op policy handed to
torch's selective-checkpoint contexts (``Policy``); what is learned per block across steps
(``Learned``); and one forward's record (``BlockRun``): kept outputs, their aliases, random
states and decisions. ``runtime/selective.py`` runs these around each op inside torch's modes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint as tuc
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import CheckpointMismatchError
from .replay import DecisionLog

aten = torch.ops.aten

# -- what the recompute must reproduce: random draws and data-dependent decisions -------------


def _tags(func: Any) -> tuple[Any, ...]:
    return tuple(getattr(func, "tags", ()))


_RANDOM: dict[Any, bool] = {}  # per op overload (every op of a selective block asks)


def is_random(func: Any) -> bool:
    known = _RANDOM.get(func)
    if known is None:
        known = _RANDOM[func] = torch.Tag.nondeterministic_seeded in _tags(func)
    return known


_WRITES: dict[Any, bool] = {}


def op_writes(func: Any) -> bool:
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


def rng_snapshot(args: Any, kwargs: Mapping[str, Any]) -> Any:
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


class Learned:
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
                elif entry is not RECOMPUTE:
                    self.unreached.add((func, idx))


class Policy:
    """torch's per-op policy: keep ``save`` ops, never keep ops that write into their inputs."""

    def __init__(self, save: frozenset[Any], learned: Learned) -> None:
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
        if op_writes(func):
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
RECOMPUTE = getattr(tuc, "_RECOMPUTE", None)
_VERSION_WRAPPER = getattr(tuc, "_VersionWrapper", None)
SAC_IGNORED: Any = getattr(tuc, "SAC_IGNORED_OPS", frozenset({aten.detach.default}))
_detach_helper: Callable[[Any], Any] = getattr(tuc, "_detach_helper", lambda x: x.detach())


def cache_key(func: Any, args: Any) -> Any:
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
class BlockRun:
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
    policy: Policy
    learned: Learned
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
        if storage is None or RECOMPUTE is None or func in SAC_IGNORED:
            return
        key = cache_key(func, args)
        counter = getattr(self.caching, "func_counter", {})
        call = (key, counter.get(key, 0) - 1)
        entry = storage.get(key, {}).get(call[1], RECOMPUTE)
        if entry is not RECOMPUTE:
            for w in _leaves(entry):
                sid = _storage_id(getattr(w, "val", None))
                if sid is not None:
                    self.kept_on.setdefault(sid, []).append(call)
            return
        if writes or getattr(func, "is_view", False) or not self.kept_on:
            return
        for x in _leaves(out):
            for kept_call in self.kept_on.get(_storage_id(x), ()):  # type: ignore[arg-type]
                if storage.get(kept_call[0], {}).get(kept_call[1]) is RECOMPUTE:
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
            storage[call[0]][call[1]] = RECOMPUTE
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
                if entry is not RECOMPUTE and self.changed((key, idx), entry):
                    self.recompute((key, idx))

    def before_cached(self, cached: Any, func: Any, args: Any) -> None:
        """Recompute: a kept call about to be used is recomputed if it changed after forward."""
        storage = self._entries(cached)
        if storage is None or RECOMPUTE is None or func in SAC_IGNORED:
            return
        key = cache_key(func, args)
        call = (key, getattr(cached, "func_counter", {}).get(key, 0))
        entry = storage.get(key, {}).get(call[1])
        if entry is None or entry is RECOMPUTE:
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
