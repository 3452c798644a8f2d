"""LiveStorageTracker: counts the bytes of live tensor storages per device (CPU, fake tensors, host buffers)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ..state import is_host_storage

__all__ = ["LiveStorageTracker", "io_bytes", "is_view_op", "live_tensors", "storages"]


def storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding ``t``'s data (a wrapper subclass's inner tensors'; [] if none)."""
    try:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        if is_traceable_wrapper_subclass(t):
            attrs, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
            out = []
            for a in attrs:
                v = getattr(t, a)
                if isinstance(v, torch.Tensor):
                    out.extend(storages(v))
            return out
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):
        return []  # sparse, nested or otherwise storage-less tensors


class LiveStorageTracker:
    """Live storage bytes per device type: the one storage-counting engine gradckpt has.

    A storage is counted once (however many tensors view it) from when it is tracked until
    Python frees it (a weakref finalizer). ``seed`` counts what existed before the step, so that
    views of weights made during the step add nothing. On a CPU-only run, host buffers made by
    offloading (``state.host_empty_strided``) are counted under ``"host"``, not ``"cpu"``.
    Subclasses decide which tensors to ``track`` (every op output, in a dispatch mode).
    """

    def __init__(self, *, device_type: str, use_allocator: bool = False) -> None:
        self.device_type = device_type
        self.use_allocator = use_allocator
        # storage key -> (bytes, device, tag); the tag is the subclass's (None by default)
        self._live: dict[int, tuple[int, str, Any]] = {}
        self._refs: dict[int, weakref.ref[Any]] = {}
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.baseline: dict[str, int] = {}

    # what a subclass refines: called once per storage when it starts and stops being counted
    def _added(self, key: int, nbytes: int, device: str, tag: Any) -> None:
        cur = self.current.get(device, 0) + nbytes
        self.current[device] = cur
        if cur > self.peak.get(device, 0):
            self.peak[device] = cur

    def _removed(self, key: int, nbytes: int, device: str, tag: Any) -> None:
        self.current[device] = self.current.get(device, 0) - nbytes

    def _free(self, key: int) -> None:
        info = self._live.pop(key, None)
        self._refs.pop(key, None)
        if info is not None:
            self._removed(key, *info)

    def _finalizer(self, key: int) -> Callable[[Any], None]:
        def free(_ref: Any) -> None:
            self._free(key)

        return free

    def track(self, t: torch.Tensor, tag: Any = None) -> None:
        """Count ``t``'s storages from now until Python frees them (once each), under ``tag``."""
        for st in storages(t):
            key = id(st)
            if key in self._live:
                continue
            n = int(st.nbytes())
            dev = t.device.type
            if dev == "cpu" and self.device_type == "cpu" and is_host_storage(st):
                dev = "host"  # offload emulated on a CPU-only run: CPU memory plays the device
            try:
                self._refs[key] = weakref.ref(st, self._finalizer(key))
            except TypeError:
                continue
            self._live[key] = (n, dev, tag)
            self._added(key, n, dev, tag)

    def retag(self, t: torch.Tensor, tag: Any) -> None:
        """Count ``t``'s (single) storage under ``tag`` from now on."""
        sts = storages(t)
        if len(sts) != 1 or id(sts[0]) not in self._live:
            return
        key = id(sts[0])
        n, dev, old = self._live[key]
        self._removed(key, n, dev, old)
        self._live[key] = (n, dev, tag)
        self._added(key, n, dev, tag)

    def seed(self, tensors: Iterable[torch.Tensor], tag: Any = None) -> None:
        """Count what exists before the step (under ``tag``); it becomes the baseline."""
        for t in tensors:
            self.track(t, tag)
        self.baseline = dict(self.current)
        self.peak = dict(self.current)

    def live_bytes(self, device_type: str | None = None) -> int:
        dev = device_type or self.device_type
        if self.use_allocator and dev == "cuda":
            return int(torch.cuda.memory_allocated())
        return self.current.get(dev, 0)


def is_view_op(func: Any) -> bool:
    """True for ops whose outputs alias an input without writing it (view, t, expand...): torch's own rule."""
    return bool(getattr(func, "is_view", False))


def _distinct_elems(t: torch.Tensor) -> int:
    n = 1
    for s, st in zip(t.shape, t.stride()):
        if st != 0:
            n *= s
    return n


def io_bytes(args: Any, kwargs: Any, out: Any, *, distinct: bool = False) -> int:
    """Bytes an op reads and writes: every tensor among its inputs and outputs.

    ``distinct=True`` counts broadcast (stride-0) dimensions once: the bytes a kernel touches,
    what a roofline time needs; the default counts every element, as ``measure`` reports it.
    """
    n = 0
    for t in tree_flatten((args, kwargs or {}, out))[0]:
        if isinstance(t, torch.Tensor):
            n += (_distinct_elems(t) if distinct else t.numel()) * t.element_size()
    return n


def live_tensors(*, fake: bool = False) -> list[torch.Tensor]:
    """Every tensor Python holds now (what ``seed`` is given before a step).

    Fake tensors (``gradckpt.estimate``'s cached fake models) hold no memory: they are left out
    unless ``fake`` (the step measured runs on fake tensors itself).
    """
    from torch._subclasses.fake_tensor import FakeTensor

    # issubclass(type(o)) rather than isinstance: isinstance on some torch module-level objects
    # (torch.distributed.reduce_op) emits a deprecation warning.
    return [
        o
        for o in gc.get_objects()
        if issubclass(type(o), torch.Tensor) and (fake or not issubclass(type(o), FakeTensor))
    ]
