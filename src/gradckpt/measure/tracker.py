"""LiveStorageTracker: counts the bytes of live tensor storages per device (CPU, fake tensors, host buffers)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ..state import is_host_storage

__all__ = ["LiveStorageTracker", "io_bytes", "live_tensors", "storages"]


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
        self._live: dict[int, tuple[int, str]] = {}
        self._refs: dict[int, weakref.ref[Any]] = {}
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.baseline: dict[str, int] = {}

    def _free(self, key: int) -> None:
        info = self._live.pop(key, None)
        self._refs.pop(key, None)
        if info is not None:
            n, dev = info
            self.current[dev] = self.current.get(dev, 0) - n

    def _finalizer(self, key: int) -> Callable[[Any], None]:
        def free(_ref: Any) -> None:
            self._free(key)

        return free

    def track(self, t: torch.Tensor) -> None:
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
            self._live[key] = (n, dev)
            cur = self.current.get(dev, 0) + n
            self.current[dev] = cur
            if cur > self.peak.get(dev, 0):
                self.peak[dev] = cur

    def seed(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self.track(t)
        self.baseline = dict(self.current)
        self.peak = dict(self.current)

    def live_bytes(self, device_type: str | None = None) -> int:
        dev = device_type or self.device_type
        if self.use_allocator and dev == "cuda":
            return int(torch.cuda.memory_allocated())
        return self.current.get(dev, 0)


def io_bytes(args: Any, kwargs: Any, out: Any) -> int:
    """Bytes an op reads and writes: every tensor among its inputs and outputs."""
    n = 0
    for t in tree_flatten((args, kwargs or {}, out))[0]:
        if isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    return n


def live_tensors() -> list[torch.Tensor]:
    """Every tensor Python holds now (what ``seed`` is given before a step)."""
    # issubclass(type(o)) rather than isinstance: isinstance on some torch module-level objects
    # (torch.distributed.reduce_op) emits a deprecation warning.
    return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
