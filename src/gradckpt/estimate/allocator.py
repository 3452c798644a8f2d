"""A model of PyTorch's CUDA caching allocator, and a training step's allocations replayed through it.

``torch.cuda.memory_reserved()`` (what ``nvidia-smi`` shows, less the CUDA context, and what an
out-of-memory error is about) is not the bytes of live tensors: the caching allocator rounds
every request, carves it out of segments it got from ``cudaMalloc`` and keeps freed blocks
cached for reuse, never giving a segment back unless ``empty_cache`` is called. This module
replays the storages one fake training step creates and frees (``timeline.Interval.events``,
strung together at full depth like ``timeline.replay``) through the allocator's rules, as
``c10/cuda/CUDACachingAllocator.cpp`` (torch 2.x, default settings, no expandable segments)
states them:

- a request is rounded up to a multiple of 512 B (``kMinBlockSize``);
- requests of at most 1 MiB (``kSmallSize``) come from the small pool, whose segments are
  2 MiB (``kSmallBuffer``); larger ones from the large pool, whose segments are 20 MiB
  (``kLargeBuffer``) for requests under 10 MiB (``kMinLargeAlloc``) and the request rounded up
  to 2 MiB (``kRoundLarge``) otherwise;
- a request takes the smallest cached free block of its pool that is large enough (best
  fit); a block larger than the request is split when the remainder is at least 512 B (small
  pool) or more than 1 MiB (large pool), else the request gets the whole block;
- a freed block merges with free neighbours of its segment;
- only when no cached block fits does the allocator reserve a new segment.

Streams, ``max_split_size_mb``, ``roundup_power2_divisions`` and garbage-collection thresholds
keep their defaults (off); one stream. The model is checked against the same rules' own
consequences in ``tests/test_allocator.py``; on a GPU, ``make gpu-check`` compares it with
``torch.cuda.memory_reserved``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .timeline import Timeline, storage_of

__all__ = [
    "K_LARGE_BUFFER",
    "K_MIN_BLOCK",
    "K_MIN_LARGE_ALLOC",
    "K_ROUND_LARGE",
    "K_SMALL_BUFFER",
    "K_SMALL_SIZE",
    "CachingAllocator",
    "StepAllocation",
    "replay_step",
    "round_size",
    "optimizer_state_sizes",
    "segment_size",
    "step_allocation",
]

MiB = 1024**2
K_MIN_BLOCK = 512  # kMinBlockSize: every request is a multiple of this
K_SMALL_SIZE = 1 * MiB  # kSmallSize: largest request served by the small pool
K_SMALL_BUFFER = 2 * MiB  # kSmallBuffer: small-pool segment size
K_LARGE_BUFFER = 20 * MiB  # kLargeBuffer: large-pool segment for requests under 10 MiB
K_MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: from here on, a segment per request...
K_ROUND_LARGE = 2 * MiB  # kRoundLarge: ...rounded up to 2 MiB

_SMALL, _LARGE = 0, 1


def round_size(nbytes: int) -> int:
    """The block size the allocator hands out for a request (``round_size``).

    Example:
        >>> round_size(1), round_size(512), round_size(513)
        (512, 512, 1024)
    """
    if nbytes < K_MIN_BLOCK:
        return K_MIN_BLOCK
    return -(-nbytes // K_MIN_BLOCK) * K_MIN_BLOCK


def segment_size(block: int) -> int:
    """Bytes the allocator reserves (``cudaMalloc``) when no cached block fits ``block`` (``get_allocation_size``).

    Example:
        >>> [segment_size(s) // 2**20 for s in (4096, 2 * 2**20, 12 * 2**20 + 1)]
        [2, 20, 14]
    """
    if block <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if block < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return -(-block // K_ROUND_LARGE) * K_ROUND_LARGE


class CachingAllocator:
    """Blocks and segments as the CUDA caching allocator keeps them; no device memory involved.

    Attributes:
        reserved: bytes in segments (``memory_reserved``).
        allocated: bytes in blocks handed out (``memory_allocated``, rounded sizes).
        peak_reserved, peak_allocated: their maxima so far.
        peak_held: the most bytes in segments holding at least one live block. When
            ``cudaMalloc`` fails, the allocator gives back every cached segment that is wholly
            free (``release_cached_blocks`` frees unsplit blocks only) and tries again; so on a
            card too small for ``peak_reserved`` a step still fits while it has ``peak_held``.
    """

    def __init__(self) -> None:
        self.reserved = 0
        self.allocated = 0
        self.peak_reserved = 0
        self.peak_allocated = 0
        self.peak_held = 0
        self._whole_free = 0  # bytes of segments whose one block is free
        self._seg_size: list[int] = []
        # free blocks per pool, sorted: (size, segment, offset), the best fit first
        self._free: tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]] = ([], [])
        self._seg_pool: list[int] = []
        # per segment: block start -> size, and block end -> start (to find the previous block)
        self._starts: list[dict[int, int]] = []
        self._ends: list[dict[int, int]] = []
        self._is_free: set[tuple[int, int]] = set()
        self._handles: dict[int, tuple[int, int, int]] = {}  # handle -> (segment, offset, size)
        self._next = 0

    def malloc(self, nbytes: int) -> int:
        """Hand out a block for ``nbytes`` and return its handle."""
        size = round_size(nbytes)
        pool = _SMALL if size <= K_SMALL_SIZE else _LARGE
        free = self._free[pool]
        i = bisect.bisect_left(free, (size, -1, -1))
        if i < len(free):
            bsize, seg, off = free.pop(i)
            self._is_free.discard((seg, off))
            if off == 0 and bsize == self._seg_size[seg]:
                self._whole_free -= bsize
        else:
            seg, off, bsize = self._new_segment(segment_size(size), pool)
        remaining = bsize - size
        if remaining >= K_MIN_BLOCK if pool == _SMALL else remaining > K_SMALL_SIZE:
            self._set_block(seg, off, size)
            self._set_block(seg, off + size, remaining)
            self._add_free(pool, seg, off + size, remaining)
            bsize = size
        self._next += 1
        self._handles[self._next] = (seg, off, bsize)
        self.allocated += bsize
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_held = max(self.peak_held, self.reserved - self._whole_free)
        return self._next

    def free(self, handle: int) -> None:
        """Return a block to the cache, merged with its free neighbours."""
        seg, off, size = self._handles.pop(handle)
        self.allocated -= size
        pool = self._seg_pool[seg]
        starts, ends = self._starts[seg], self._ends[seg]
        del starts[off], ends[off + size]
        nxt = off + size
        if (seg, nxt) in self._is_free:
            nsize = starts.pop(nxt)
            del ends[nxt + nsize]
            self._remove_free(pool, seg, nxt, nsize)
            size += nsize
        prev = ends.get(off)
        if prev is not None and (seg, prev) in self._is_free:
            psize = starts.pop(prev)
            del ends[off]
            self._remove_free(pool, seg, prev, psize)
            off, size = prev, size + psize
        starts[off] = size
        ends[off + size] = off
        self._add_free(pool, seg, off, size)
        if off == 0 and size == self._seg_size[seg]:
            self._whole_free += size

    # internals ------------------------------------------------------------------------------
    def _new_segment(self, nbytes: int, pool: int) -> tuple[int, int, int]:
        seg = len(self._seg_pool)
        self._seg_pool.append(pool)
        self._seg_size.append(nbytes)
        self._starts.append({0: nbytes})
        self._ends.append({nbytes: 0})
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return seg, 0, nbytes

    def _set_block(self, seg: int, off: int, size: int) -> None:
        starts, ends = self._starts[seg], self._ends[seg]
        old = starts.get(off)
        if old is not None:
            del ends[off + old]
        starts[off] = size
        ends[off + size] = off

    def _add_free(self, pool: int, seg: int, off: int, size: int) -> None:
        bisect.insort(self._free[pool], (size, seg, off))
        self._is_free.add((seg, off))

    def _remove_free(self, pool: int, seg: int, off: int, size: int) -> None:
        free = self._free[pool]
        i = bisect.bisect_left(free, (size, seg, off))
        if i < len(free) and free[i] == (size, seg, off):
            free.pop(i)
        self._is_free.discard((seg, off))


@dataclass(frozen=True)
class StepAllocation:
    """The allocator's state over training steps replayed through ``CachingAllocator``.

    Attributes:
        reserved_bytes: bytes reserved at the end of the last step (the most the allocator
            ever holds: it gives nothing back without ``empty_cache``).
        peak_allocated_bytes: the most bytes in blocks at any moment (rounded sizes:
            ``max_memory_allocated``'s figure).
        peak_held_bytes: the most bytes in segments holding a live block at any moment: what
            the step needs on a card where memory runs short (``CachingAllocator.peak_held``).
        unmatched_frees: frees of the replayed step that had no live storage of that size to
            free (0 when the replay is consistent).
    """

    reserved_bytes: int
    peak_allocated_bytes: int
    peak_held_bytes: int
    unmatched_frees: int


def replay_step(
    persistent: Iterable[int],
    step_events: Sequence[Sequence[tuple[int, int, str]]],
    labels: Sequence[str],
    optimizer_states: Iterable[int] = (),
    steps: int = 2,
) -> StepAllocation:
    """Replay ``steps`` training steps of allocations through a ``CachingAllocator``.

    Args:
        persistent: sizes of the storages alive all run (weights, buffers), allocated first.
        step_events: per interval of the replayed step (in step order), its events
            ``(key, nbytes, origin)``: ``nbytes > 0`` creates storage ``key`` in this interval;
            ``nbytes < 0`` frees the storage ``key`` created in the interval labelled
            ``origin``.
        labels: the label of each interval of ``step_events`` (replayed copies of a block share
            their small run's label).
        optimizer_states: sizes of the optimizer's state tensors, created after the first
            step's backward (while its gradients are alive) and kept.
        steps: steps to replay: the first creates the optimizer states, the second is a
            steady-state step with them in place.

    Returns:
        A ``StepAllocation``. Whatever a step leaves alive (gradients, before the next
        ``zero_grad(set_to_none=True)``) is freed after the optimizer step.

    A free names its storage by the key and origin interval of the small run; the replay gives
    each copy of an interval its own storages and frees the most recent live one of that
    (origin, key). Where there is none (a block's output, freed by the next block: in the
    small run the next block is another interval), it frees the most recent live storage of
    the same size, which plays the same part in the previous copy.
    """
    alloc = CachingAllocator()
    for n in persistent:
        if n > 0:
            alloc.malloc(n)
    states = [n for n in optimizer_states if n > 0]
    unmatched = 0
    for step in range(steps):
        by_key: dict[tuple[str, int], list[int]] = {}
        by_size: dict[int, list[int]] = {}
        alive: dict[int, int] = {}  # handle -> nbytes
        for label, events in zip(labels, step_events):
            mine: dict[int, int] = {}  # key -> handle created in this copy
            for key, n, origin in events:
                if n == 0:  # an empty storage: the allocator hands out nothing for 0 bytes
                    continue
                if n > 0:
                    h = alloc.malloc(n)
                    alive[h] = n
                    by_key.setdefault((label, key), []).append(h)
                    by_size.setdefault(n, []).append(h)
                    mine[key] = h
                    continue
                if label == "exit":
                    # leaving autocast frees its cast cache: the casts of every copy of a block
                    for h in by_key.pop((origin, key), []):
                        if h in alive:
                            del alive[h]
                            alloc.free(h)
                    continue
                h_found = None
                if origin == label and key in mine and mine[key] in alive:
                    h_found = mine.pop(key)
                else:
                    stack = by_key.get((origin, key), [])
                    while stack and stack[-1] not in alive:
                        stack.pop()
                    if stack:
                        h_found = stack.pop()
                if h_found is None:
                    same = by_size.get(-n, [])
                    while same and same[-1] not in alive:
                        same.pop()
                    if same:
                        h_found = same.pop()
                if h_found is None:
                    unmatched += 1
                    continue
                del alive[h_found]
                alloc.free(h_found)
        if step == 0:
            for n in states:
                alloc.malloc(n)
        for h in list(alive):
            alloc.free(h)
    return StepAllocation(alloc.reserved, alloc.peak_allocated, alloc.peak_held, unmatched)


# -- a fake step's allocations at full depth -------------------------------------------------

_STATE_8BIT_MIN = 4096  # bitsandbytes: tensors under 4096 values keep 32-bit states
_STATE_8BIT_BLOCK = 256  # one fp32 absmax per 256 values


def optimizer_state_sizes(params: Iterable[Any], optimizer: str) -> list[int]:
    """The sizes of the state tensors ``optimizer`` creates for ``params``, one entry per tensor.

    torch's AdamW: ``exp_avg`` and ``exp_avg_sq`` like the parameter (its ``step`` counter is a
    CPU tensor unless fused/capturable: left out); SGD with momentum: one buffer; bitsandbytes
    AdamW8bit: two uint8 states and two fp32 absmax vectors per tensor of >= 4096 values, two
    fp32 states below that.
    """
    out: list[int] = []
    for p in params:
        n, nbytes = p.numel(), p.numel() * p.element_size()
        if optimizer == "adamw":
            out += [nbytes, nbytes]
        elif optimizer == "sgd-momentum":
            out.append(nbytes)
        elif optimizer == "adamw-8bit":
            if n >= _STATE_8BIT_MIN:
                absmax = 4 * -(-n // _STATE_8BIT_BLOCK)
                out += [n, n, absmax, absmax]
            else:
                out += [4 * n, 4 * n]
    return out


def _storages(module: Any, seen: set[int]) -> list[Any]:
    out = []
    for t in [*module.parameters(), *module.buffers()]:
        st = storage_of(t)
        if st is None or id(st) in seen:
            continue
        seen.add(id(st))
        out.append((t, st))
    return out


def step_allocation(
    timeline: Timeline,
    order: Sequence[int],
    model: Any,
    blocks: Sequence[tuple[str, Any]],
    optimizer: str,
) -> StepAllocation:
    """Replay a fake step's allocations, with the small run's blocks in ``order``, through the allocator.

    Args:
        timeline: the small run's timeline (``FakeSession.run``).
        order: block of the small run for each block of the full-depth model (as ``replay``).
        model: the small run's model; its parameters and buffers are the persistent storages,
            each block's repeated as ``order`` says.
        blocks: the small run's blocks.
        optimizer: the optimizer whose states the first step creates.
    """
    seen: set[int] = set()
    per_block = [_storages(b, seen) for _, b in blocks]
    outside = _storages(model, seen)
    persistent = [st.nbytes() for _, st in outside]
    trainable = [t for t, _ in outside if getattr(t, "requires_grad", False)]
    for k in order:
        persistent += [st.nbytes() for _, st in per_block[k]]
        trainable += [t for t, _ in per_block[k] if getattr(t, "requires_grad", False)]
    ivs = timeline.by_label()
    names = ["pre", *(f"f{k}" for k in order), "head", "exit", "bhead"]
    names += [f"b{k}" for k in reversed(order)]
    if "post" in ivs:
        names.append("post")
    return replay_step(
        persistent,
        [ivs[n].events for n in names],
        names,
        optimizer_state_sizes(trainable, optimizer),
    )
