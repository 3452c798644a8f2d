"""Thread-local facts of the step in progress, shared by the runtime (which sets them) and measure (which reads them).

Two facts: whether a checkpointed region is being recomputed right now (``is_recomputing``),
and which CPU storages are host buffers made by offloading (``host_empty_strided``), so that
on a CPU-only run the tracker can tell "host" copies from CPU memory playing the device.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["host_empty_strided", "is_host_storage", "is_recomputing", "recompute_flag"]

_tls = threading.local()


def is_recomputing() -> bool:
    """True while a checkpointed region is being recomputed during backward (this thread)."""
    return getattr(_tls, "depth", 0) > 0


@contextlib.contextmanager
def recompute_flag() -> Iterator[None]:
    """Mark the code run inside as a recompute (nests: a checkpoint inside a recompute)."""
    _tls.depth = getattr(_tls, "depth", 0) + 1
    try:
        yield
    finally:
        _tls.depth -= 1


# Host buffers made by offloading code. On a CUDA run every CPU storage is host memory; on a
# CPU-only run (offload emulated in tests) these are the CPU storages that stand for host memory.
_host_tls = threading.local()
_HOST_STORAGES: dict[int, weakref.ref[Any]] = {}


def _forget_host(key: int) -> Callable[[Any], None]:
    def forget(_ref: Any) -> None:
        _HOST_STORAGES.pop(key, None)

    return forget


def host_empty_strided(
    size: Iterable[int], stride: Iterable[int], *, dtype: torch.dtype, pin_memory: bool = False
) -> torch.Tensor:
    """A new CPU tensor that ``measure`` counts as host memory, also when the device is the CPU.

    Offloading allocates its host copies with this, so that in a CPU-only test (CPU memory
    standing in for the device) ``MemoryStats.host_*`` shows the copies and the device bytes do not.

    Example:
        >>> buf = host_empty_strided((4, 8), (8, 1), dtype=torch.float32)
    """
    _host_tls.active = True
    try:
        t = torch.empty_strided(
            tuple(size), tuple(stride), dtype=dtype, device="cpu", pin_memory=pin_memory
        )
    finally:
        _host_tls.active = False
    st = t.untyped_storage()
    _HOST_STORAGES[id(st)] = weakref.ref(st, _forget_host(id(st)))
    return t


def is_host_storage(st: torch.UntypedStorage) -> bool:
    """Whether ``st`` is a host buffer made by ``host_empty_strided`` (or is being made now)."""
    if getattr(_host_tls, "active", False):
        return True
    ref = _HOST_STORAGES.get(id(st))
    return ref is not None and ref() is st
