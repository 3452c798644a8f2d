"""Segments: several consecutive blocks checkpointed as one region (policy ``sqrt``).

The region opens when the segment's first block that runs starts and closes when its last block
returns; each later block's inputs are recorded with placeholders for the previous block's
output tensors, with the RNG state it saw, so the recompute replays the blocks that ran one
after another from the first input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointMismatchError, GradCkptError
from .checkpoint import (
    RngState,
    abort_region,
    close_region,
    fork_rng,
    open_region,
    pause_region,
    pushed_since,
    resume_region,
    saved_hooks_top,
)
from .decisions import refuse_lazy_output, run_checkpointed
from .replay import pause_recording, recorders

__all__ = ["SegmentRun", "closer", "segment_forward"]

logger = logging.getLogger("gradckpt")


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


def _layout(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What makes two tensors the same values: one storage, offset, sizes, strides, dtype.

    SqueezeBERT (and FSMT) permute the hidden states between two blocks and back
    (``h.permute(0, 2, 1)`` to record them, then again to run on), so the next block gets a new
    tensor object over the same memory, laid out as the previous block's output.
    """
    if t.layout is not torch.strided or t.numel() == 0:
        return None
    try:
        storage = t.untyped_storage()._cdata  # the StorageImpl: shared by views, fake ones too
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return None  # tensor subclasses without one storage (DTensor, nested)
    return (storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


class _Outputs:
    """The previous block's output tensors, found by identity or as the same view of memory,
    with the version counters they had when the block returned (changed in place since by the
    model's code between blocks: not the output any more, the replay would not reproduce it)."""

    def __init__(self, out: Any) -> None:
        self.paths = _tensor_paths(out)
        self.tensors: dict[int, torch.Tensor] = {}
        self.versions: dict[int, int] = {}
        self.layouts: dict[tuple[Any, ...], int] = {}
        for t in _tensors(out):
            self.tensors[id(t)] = t
            self.versions[id(t)] = t._version
            key = _layout(t)
            if key is not None:
                self.layouts.setdefault(key, id(t))

    def path_of(self, t: torch.Tensor) -> tuple[Any, ...] | None:
        key = id(t) if id(t) in self.paths else None
        if key is None and self.layouts:
            lay = _layout(t)
            key = None if lay is None else self.layouts.get(lay)
        if key is None or self.tensors[key]._version != self.versions[key]:
            return None
        return self.paths[key]


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)


def _substitute(obj: Any, prev: _Outputs, found: list[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        path = prev.path_of(obj)
        if path is None:
            return obj
        found.append(1)
        return _Ref(path)
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_substitute(v, prev, found) for v in obj)
    if isinstance(obj, list):
        return [_substitute(v, prev, found) for v in obj]
    if type(obj) is dict:
        return {k: _substitute(v, prev, found) for k, v in obj.items()}
    return obj


def _versions(obj: Any) -> list[tuple[torch.Tensor, int]]:
    """The tensors a record keeps as they are (not placeholders), with their version counters."""
    return [(t, t._version) for t in _tensors(obj)]


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


@dataclass(eq=False)  # identity: runs hold each other (peers)
class SegmentRun:
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
    early_stop: bool = True
    gen: Generator[None, None, None] | None = None
    hooks: list[Any] = field(default_factory=list)  # what the open region pushed, bottom first
    paused: bool = False
    prev: _Outputs | None = None  # the output of the last block that ran
    last: int = -1  # its index
    # per block that ran: index, inputs (placeholders for the previous output), entry RNG
    # state, and the tensors kept as they are with their version counters at the call
    records: list[tuple[int, Any, Any, RngState, list[tuple[torch.Tensor, int]]]] = field(
        default_factory=list
    )
    warned: bool = False  # a warning about this segment's memory was given
    recorders: list[Any] = field(default_factory=list)  # decision recorders the region entered
    # every segment of the model (this one included): one region is open at a time, so the
    # regions' saved-tensor hooks and dispatch modes stay nested (XLM calls its attention and
    # FFN lists in turn, which would interleave their segments)
    peers: list[SegmentRun] = field(default_factory=list, repr=False)

    def _resume(self) -> None:
        if self.paused:
            resume_region(self.hooks)
            pause_recording(self.recorders, False)
            self.paused = False

    def _pause(self) -> bool:
        self.paused = pause_region(self.hooks)
        if self.paused:
            pause_recording(self.recorders, True)
        return self.paused

    def abort(self) -> None:
        """Close the region after an error: nothing it saved will be used."""
        if self.gen is not None:
            self._resume()
            abort_region(self.gen)
        self._reset()

    def finish(self) -> None:
        """Close a region whose last blocks did not run (skipped, or the forward ended early)."""
        gen = self.gen
        if gen is not None:
            self._resume()
        self._reset()
        if gen is not None:
            close_region(gen)

    def _reset(self) -> None:
        self.gen, self.hooks, self.paused, self.prev, self.last = None, [], False, None, -1
        self.recorders = []

    def _open(self, j: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        records: list[tuple[int, Any, Any, RngState, list[tuple[torch.Tensor, int]]]] = [
            (j, None, None, RngState(*args, *kwargs.values()), _versions((args, kwargs)))
        ]
        forwards, names = self.forwards, self.names
        label = f"segment of blocks {self.names[j]!r} to {self.names[-1]!r}"

        def replay(*a: Any, **kw: Any) -> Any:
            # torch restored the RNG of the first block's positional inputs; this restores each
            # block's own (keyword tensors' devices included) and forks what it touches.
            with fork_rng(r[3] for r in records):
                out = None
                for n, (k, ra, rkw, rng, kept) in enumerate(records):
                    _check_unchanged(label, names[k], kept)
                    rng.restore()
                    if n == 0:
                        out = forwards[k](*a, **kw)
                    else:
                        out = forwards[k](*_fill(ra, out), **_fill(rkw, out))
            return out

        self.records = records
        below = saved_hooks_top()
        modes_below = {id(m) for m in recorders()}
        self.gen = open_region(
            replay, args, kwargs, stateful=self.stateful, name=label, early_stop=self.early_stop
        )
        try:
            self.hooks = pushed_since(below)
            self.recorders = [m for m in recorders() if id(m) not in modes_below]
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
        if torch.is_grad_enabled():
            for other in self.peers:
                if other is not self and other.gen is not None:
                    if not other.warned:
                        other.warned = True
                        logger.warning(
                            "gradckpt sqrt: block %r ran between two blocks of the segment "
                            "from %r, which ends there (its next block starts a region of its "
                            "own: for lists called in turn, as XLM's attentions and ffns, the "
                            "memory of policy 'full', gradients unchanged)",
                            self.names[j],
                            other.names[other.last],
                        )
                    other.finish()  # complete as it is; its later blocks open a region anew
        if self.gen is None:
            if not torch.is_grad_enabled():
                return fwd(*args, **kwargs)
            self._open(j, args, kwargs)
        else:
            found: list[int] = []
            prev = self.prev if self.prev is not None else _Outputs(None)
            rec = (_substitute(args, prev, found), _substitute(kwargs, prev, found))
            if not found and not self.warned:
                # PoolFormer's second patch embedding takes the output of stage 0's last layer
                # (another list): the replay gets this block's inputs as they were (as a
                # checkpoint of its own would), exact, but the segment saves no memory on them.
                self.warned = True
                logger.warning(
                    "gradckpt sqrt: block %r does not take block %r's output as input, so "
                    "its segment keeps this block's inputs (the memory of policy 'full' for "
                    "it, gradients unchanged); blocks that feed each other make better "
                    "segments",
                    self.names[j],
                    self.names[self.last],
                )
            self.records.append((j, *rec, RngState(*args, *kwargs.values()), _versions(rec)))
            self._resume()
        self.prev = None
        try:
            out = fwd(*args, **kwargs)
            refuse_lazy_output(f"block {self.names[j]!r}", out)
        except BaseException:
            self.abort()
            raise
        if j == len(self.forwards) - 1:
            self.finish()
        else:
            self.prev, self.last = _Outputs(out), j
            if not self._pause():
                self.abort()
                raise GradCkptError(
                    f"block {self.names[j]!r} left saved-tensor hooks of its own open when it "
                    "returned, so it cannot be part of a checkpointed segment: use "
                    "policy='full' for this model"
                )
        return out


def _check_unchanged(label: str, block: str, kept: list[tuple[torch.Tensor, int]]) -> None:
    """Refuse to replay ``block`` from inputs the model modified in place after it ran."""
    for t, version in kept:
        if t._version != version:
            raise CheckpointMismatchError(
                f"{label}: an input of block {block!r} (shape {tuple(t.shape)}) was modified "
                "in place after the block ran, so the recompute during backward would read "
                "the changed value and give wrong gradients; backward stopped. Do not modify "
                "a block's inputs in place after it ran, or keep this block's activations "
                "(Decision.SAVE for it in the plan)"
            )


def closer(runs: list[SegmentRun]) -> Callable[..., None]:
    def close_open_segments(_model: nn.Module, _args: Any, _out: Any) -> None:
        for run in runs:
            # A segment whose last blocks did not run (LayerDrop skipped them) is complete
            # as it is; after an exception inside a block its region is already aborted.
            run.finish()

    return close_open_segments


def segment_forward(run: SegmentRun, j: int) -> Callable[..., Any]:
    own_forward = run.forwards[j]  # bound here: indexing by j inside would make dynamo guard on j

    def forward(*args: Any, **kwargs: Any) -> Any:
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

    return forward
