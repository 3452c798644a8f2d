"""A memory/FLOP timeline of one training step on fake tensors, and its replay at full depth.

One forward+backward runs under ``TimelineTracker``, a dispatch mode that tracks live storage
bytes the way ``gradckpt.measure`` does (every storage from the op that creates it until Python
frees it; the model's own tensors are the baseline), and also cuts the step into intervals at
block boundaries (forward of block i, backward of block i), keeping for each interval its peak,
the composition of live bytes at that peak (activations kept from forward, logits/loss,
gradients, backward temporaries) and the FLOPs and bytes of every op. ``replay`` strings the
intervals of a few-block run together as the full-depth model's step (see ``periodic``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..measure import LiveStorageTracker, count_flops, io_bytes, is_view_op
from ..state import is_recomputing

__all__ = [
    "ACT",
    "BWD",
    "GRAD",
    "HEAD",
    "TAGS",
    "Interval",
    "ReplayedStep",
    "Timeline",
    "TimelineTracker",
    "replay",
    "storage_of",
]

# Live-bytes categories of the step. Storages alive before the step (weights, inputs) are the
# baseline and carry no tag.
ACT, HEAD, BWD, GRAD = 0, 1, 2, 3
TAGS = ("activations", "logits_loss", "backward_transient", "gradients")
_ZERO = (0, 0, 0, 0)


def _add(a: Sequence[int], b: Sequence[int]) -> tuple[int, int, int, int]:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3])


def _sub(a: Sequence[int], b: Sequence[int]) -> tuple[int, int, int, int]:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3])


# -- the timeline ---------------------------------------------------------------------------


@dataclass
class Interval:
    """One stretch of the step between two marks, relative to the live bytes at its start.

    ``at_max``: tag vector (see ``TAGS``) at the moment live bytes peaked within the interval,
    minus the vector at its start; ``at_end``: the same at its end. ``costs`` counts ops by
    ``(phase, flops, bytes)``.
    """

    label: str
    at_max: tuple[int, int, int, int] = _ZERO
    at_end: tuple[int, int, int, int] = _ZERO
    costs: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    #: bytes freed in this interval (by tag) of storages created in an earlier interval, by
    #: that interval's label: up to the peak moment, and in all. The replay needs them for the
    #: ``exit`` interval, which frees what every block made: autocast's weight-cast cache.
    freed_at_max: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    freed_at_end: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    #: the storages created (``nbytes > 0``) and freed (``-nbytes``) in this interval, in order,
    #: as ``(key, nbytes, label of the interval that created it)``: what ``allocator`` replays
    events: list[tuple[int, int, str]] = field(default_factory=list)
    #: host bytes (offloaded copies, ``state.host_empty_strided``) added in this interval: not
    #: device memory, so in no tag
    host_end: int = 0


@dataclass
class Timeline:
    """The step as intervals: ``pre``, ``f0..f{n-1}``, ``head``, ``exit``, ``bhead``, ``b{n-1}..b0``, ``post``."""

    intervals: list[Interval]
    n_blocks: int

    def by_label(self) -> dict[str, Interval]:
        return {iv.label: iv for iv in self.intervals}


@dataclass
class ReplayedStep:
    """What one policy costs for one training step, replayed at full depth.

    Bytes are relative to the weights (baseline): ``peak`` is the most bytes the step adds,
    ``peak_parts`` their composition at that moment (by ``TAGS``), ``activation`` the bytes
    held for backward when backward starts (``activation_parts`` split by ``TAGS``).
    ``costs`` counts ops by ``(phase, flops, bytes)`` over the whole step.
    """

    peak: int
    peak_parts: tuple[int, int, int, int]
    peak_phase: str
    activation: int
    activation_parts: tuple[int, int, int, int]
    costs: Counter[tuple[str, int, int]]
    #: most host bytes alive at once (offloaded block inputs), and the bytes copied each way
    host_peak: int = 0

    def flops(self, phase: str) -> int:
        return sum(f * n for (ph, f, _b), n in self.costs.items() if ph == phase)

    def nbytes(self, phase: str) -> int:
        return sum(b * n for (ph, _f, b), n in self.costs.items() if ph == phase)


def replay(timeline: Timeline, order: Sequence[int]) -> ReplayedStep:
    """Replay ``timeline`` with its blocks in ``order`` (block index of the small run per real block).

    Example: a 3-block run replayed as a 32-block model is ``order = [0] + [1] * 30 + [2]``.
    """
    ivs = timeline.by_label()
    seq: list[Interval] = [ivs["pre"], *(ivs[f"f{k}"] for k in order), ivs["head"], ivs["exit"]]
    seq.append(ivs["bhead"])
    seq += [ivs[f"b{k}"] for k in reversed(order)]
    if "post" in ivs:
        seq.append(ivs["post"])
    copies = Counter(iv.label for iv in seq)

    def extra(freed: dict[str, tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
        # Leaving autocast frees the cast cache: the casts of every copy of a replayed block.
        out: tuple[int, int, int, int] = _ZERO
        for origin, vec in freed.items():
            k = copies.get(origin, 1) - 1
            if k > 0:
                out = _add(out, [k * x for x in vec])
        return out

    v: tuple[int, int, int, int] = _ZERO
    host = host_peak = 0
    best, best_label = _ZERO, "pre"
    act = _ZERO
    costs: Counter[tuple[str, int, int]] = Counter()
    for iv in seq:
        at_max, at_end = iv.at_max, iv.at_end
        if iv.label == "exit":
            at_max = _sub(at_max, extra(iv.freed_at_max))
            at_end = _sub(at_end, extra(iv.freed_at_end))
        cand = _add(v, at_max)
        if sum(cand) > sum(best):
            best, best_label = cand, iv.label
        v = _add(v, at_end)
        host += iv.host_end
        host_peak = max(host_peak, host)
        if iv.label == "exit":
            act = v
        costs.update(iv.costs)
    forward = ("pre", "head", "exit")
    phase = "forward" if best_label in forward or best_label.startswith("f") else "backward"
    return ReplayedStep(
        peak=sum(best),
        peak_parts=best,
        peak_phase=phase,
        activation=sum(act),
        activation_parts=act,
        costs=costs,
        host_peak=host_peak,
    )


# -- the tracker ----------------------------------------------------------------------------


def storage_of(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


_BASELINE = -1  # category of storages alive before the step (weights, inputs)


class TimelineTracker(LiveStorageTracker, TorchDispatchMode):
    """Live storage bytes by category (``TAGS``), cut into intervals at ``mark`` calls.

    Storages are counted by ``gradckpt.measure``'s ``LiveStorageTracker`` (from the op that
    creates them until Python frees them; views add nothing; storages alive before the step are
    seeded as the baseline). Each storage's tag is ``(category, interval it was created in)``;
    this class adds the per-category vector, its peak within each interval, and op costs.
    The fake tensors live on the CPU and stand for the GPU's memory, so the device is ``"cpu"``
    here; host buffers an offloading decision makes are counted under ``"host"`` (by the base)
    and, like every storage, in the category vector.
    """

    def __init__(self) -> None:
        TorchDispatchMode.__init__(self)
        LiveStorageTracker.__init__(self, device_type="cpu")
        self.vec = [0, 0, 0, 0]
        self.tag = ACT
        self._start: tuple[int, int, int, int] = _ZERO
        self._max: tuple[int, int, int, int] = _ZERO
        self._max_total = 0
        self._costs: Counter[tuple[str, int, int]] = Counter()
        self._freed: dict[int, list[int]] = {}  # origin interval -> bytes freed, by category
        self._freed_max: dict[int, tuple[int, int, int, int]] = {}
        self._events: list[tuple[int, int, int]] = []  # (key, +-bytes, origin interval)
        self.intervals: list[Interval] = []
        self._host_start = 0  # host bytes live at the last mark

    # storages: the base counts them; these keep the category vector -----------------------
    def _added(self, key: int, nbytes: int, device: str, tag: Any) -> None:
        super()._added(key, nbytes, device, tag)
        cat, origin = tag
        if cat == _BASELINE or device == "host":  # host: counted by the base, not device bytes
            return
        self._events.append((key, nbytes, origin))
        self.vec[cat] += nbytes
        total = self.vec[0] + self.vec[1] + self.vec[2] + self.vec[3]
        if total > self._max_total:
            self._max_total = total
            self._max = (self.vec[0], self.vec[1], self.vec[2], self.vec[3])
            if self._freed:
                self._freed_max = {o: (v[0], v[1], v[2], v[3]) for o, v in self._freed.items()}

    def _removed(self, key: int, nbytes: int, device: str, tag: Any) -> None:
        super()._removed(key, nbytes, device, tag)
        cat, origin = tag
        if cat == _BASELINE or device == "host":
            return
        self._events.append((key, -nbytes, origin))
        self.vec[cat] -= nbytes
        if origin != len(self.intervals):
            self._freed.setdefault(origin, [0, 0, 0, 0])[cat] += nbytes

    def seed(self, tensors: Iterable[torch.Tensor], tag: Any = None) -> None:
        super().seed(tensors, (_BASELINE, 0))

    def retag(self, t: torch.Tensor, tag: Any) -> None:
        """Move a tracked storage to another category (a new gradient becomes ``GRAD``)."""
        st = storage_of(t)
        info = None if st is None else self._live.get(id(st))
        if info is None or info[2][0] in (_BASELINE, tag) or info[1] == "host":
            return
        n, dev, (old, origin) = info
        self._live[id(st)] = (n, dev, (tag, origin))
        self.vec[old] -= n
        self.vec[tag] += n

    # intervals ------------------------------------------------------------------------------
    def _vec(self) -> tuple[int, int, int, int]:
        return (self.vec[0], self.vec[1], self.vec[2], self.vec[3])

    def mark(self, label: str) -> None:
        """Close the current interval, naming it ``label``, and open the next one."""
        now = self._vec()
        peak_inside = self._max_total >= sum(now)
        peak = self._max if peak_inside else now
        names = [iv.label for iv in self.intervals]

        def by_label(freed: Any) -> dict[str, tuple[int, int, int, int]]:
            return {names[o]: (v[0], v[1], v[2], v[3]) for o, v in freed.items() if o < len(names)}

        iv = Interval(label, _sub(peak, self._start), _sub(now, self._start), self._costs)
        iv.freed_at_end = by_label(self._freed)
        iv.freed_at_max = by_label(self._freed_max if peak_inside else self._freed)
        iv.events = [(k, n, names[o] if o < len(names) else label) for k, n, o in self._events]
        self._events = []
        iv.host_end = self.current.get("host", 0) - self._host_start
        self._host_start = self.current.get("host", 0)
        self.intervals.append(iv)
        self._start = now
        self._max = now
        self._max_total = sum(now)
        self._costs = Counter()
        self._freed = {}
        self._freed_max = {}

    # dispatch -------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if is_view_op(func):
            return out
        in_bwd = torch._C._current_graph_task_id() != -1
        phase = "recompute" if is_recomputing() else ("backward" if in_bwd else "forward")
        tag = (BWD if in_bwd else self.tag, len(self.intervals))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t, tag)
        nbytes = io_bytes(args, kwargs, out, distinct=True)
        flops = count_flops(func, args, kwargs, out)
        self._costs[(phase, flops, nbytes)] += 1
        return out
