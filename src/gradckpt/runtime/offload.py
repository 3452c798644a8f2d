"""OFFLOAD decision and ``offload_saved``: keep tensors needed for backward in host memory.

Two ways to trade device memory for host memory and PCIe traffic instead of recompute:

- ``Decision.OFFLOAD`` / ``policy="offload"`` (what Unsloth's ``use_gradient_checkpointing=
  "unsloth"`` does): the block is recomputed like ``RECOMPUTE``, and its input, the one tensor a
  checkpoint keeps, is copied to pinned host memory on a side CUDA stream during forward and
  copied back during backward, one block ahead: the block before's copy starts when this
  block's recompute ends, so it runs beside this block's backward.
- ``enable(..., offload_saved=True)`` (what torchtune's ``OffloadActivations`` and TRL's
  ``activation_offloading`` do): every tensor a non-recomputed (``SAVE``) block keeps for
  backward is moved to host memory, fetched back one block ahead during backward.

Both go through torch's ``saved_tensors_hooks``. A checkpoint saves its inputs as saved tensors
of the region (``_CheckpointFrame.save_inputs`` in torch/utils/checkpoint.py), before its own
hooks take over, so hooks around the checkpoint call see exactly the block's inputs.

On CUDA the copies run on two side streams (device-to-host, host-to-device), into pinned
buffers from torch's caching host allocator (freed buffers are handed back step after step once
their copies completed, so there is no ``cudaHostAlloc`` per step), and at most
``MAX_IN_FLIGHT`` device tensors wait for their copy to finish. Small tensors (below
``offload_min_bytes``) stay on the device. On a CPU-only run there is no separate device memory:
both options do nothing beyond what ``RECOMPUTE``/``SAVE`` do, and say so once. They never copy
into pinned memory there, which is what makes ``torch.autograd.graph.save_on_cpu(pin_memory=
True)`` double the saved bytes on a CPU host.

Testing on CPU: inside ``emulate_host_on_cpu()``, CPU memory plays the device and copies are
made into separate buffers that ``measure`` counts as host memory (``host_empty_strided``), so
tests run the real pack-to-host / fetch-to-device path and see device bytes drop and host bytes
rise by exactly the offloaded sizes.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import PolicyError, warn_once
from ..plans import Decision, Plan
from ..state import host_empty_strided, is_recomputing
from ..units import parse_size
from .checkpoint import stateful_modules
from .decisions import early_stop_option, run_checkpointed

__all__ = [
    "DEFAULT_MIN_BYTES",
    "MAX_IN_FLIGHT",
    "Copier",
    "emulate_host_on_cpu",
    "offload_options",
]

#: Tensors smaller than this stay on the device (``offload_min_bytes``). A copy costs a launch
#: and a synchronisation point (~10 us) whatever its size; at PCIe 4.0's ~25 GB/s 1 MiB takes
#: ~40 us, so smaller copies are dominated by overhead for little memory.
DEFAULT_MIN_BYTES = 1 << 20

#: Device tensors kept alive while their device-to-host copy is still running (torchtune's
#: ``max_fwd_stash_size`` is 5): bounds the extra device memory offloading holds in forward.
MAX_IN_FLIGHT = 4


# -- options -----------------------------------------------------------------------------------


def _min_bytes(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0
    try:
        return parse_size(value, what="offload_min_bytes")
    except ValueError as e:
        raise PolicyError(str(e)) from None


def offload_options(options: dict[str, Any]) -> dict[str, Any]:
    """Take ``offload_saved`` and ``offload_min_bytes`` out of ``enable``'s options, validated.

    Args:
        options: the keyword options given to ``enable``; the two keys are removed from it.

    Returns:
        What the plan's ``options`` should carry: ``{"offload_saved": True,
        "offload_min_bytes": 4096}`` (only the keys that were given).

    Example:
        >>> opts = {"offload_saved": True, "offload_min_bytes": "64KiB"}
        >>> offload_options(opts), opts
        ({'offload_saved': True, 'offload_min_bytes': 65536}, {})
    """
    out: dict[str, Any] = {}
    if "offload_saved" in options:
        value = options.pop("offload_saved")
        if not isinstance(value, bool):
            raise PolicyError(f"offload_saved must be True or False, got {value!r}")
        if value:
            out["offload_saved"] = True
    if "offload_min_bytes" in options:
        out["offload_min_bytes"] = _min_bytes(options.pop("offload_min_bytes"))
    return out


#: The ``offload`` policy's help line and options (registered by ``runtime.builtin``).
POLICY_HELP = (
    "recompute every block and keep its input in pinned host memory, fetched back one block "
    "ahead (same as full on a CPU-only run); offload_min_bytes="
)
POLICY_OPTIONS = ("offload_min_bytes",)
#: Why ``policy="unsloth"`` selects ``offload``: Unsloth's ``use_gradient_checkpointing="unsloth"``
#: (unsloth_zoo's offloaded gradient checkpointer) copies each decoder layer's input hidden state to
#: host memory with a non-blocking copy in forward, brings it back in backward and recomputes the
#: layer from it: OFFLOAD per block, which is what ``offload`` plans.
UNSLOTH_ALIAS = (
    "Unsloth's offloaded checkpointing keeps each layer's input in host memory and recomputes "
    "the layer in backward, as 'offload' does"
)


def offload_policy(names: Any, arg: str | None, options: dict[str, Any]) -> Plan:
    opts = {}
    if "offload_min_bytes" in options:
        opts["offload_min_bytes"] = _min_bytes(options["offload_min_bytes"])
    return Plan(
        tuple(names), tuple(Decision.OFFLOAD for _ in names), policy="offload", options=opts
    )


# -- moving tensors between the device and host memory ----------------------------------------


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides when they describe a dense layout (so the copy keeps them), else contiguous.

    Keeping the layout matters for exact gradients: a transposed copy would send the matmul in
    backward down another BLAS path and change the low bits of its result.
    """
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.size(d)))
    expected = 1
    for d in order:
        if t.size(d) != 1 and t.stride(d) != expected:
            break
        expected *= t.size(d)
    else:
        return tuple(t.stride())
    strides, n = [0] * t.dim(), 1
    for d in reversed(range(t.dim())):
        strides[d] = n
        n *= t.size(d)
    return tuple(strides)


class HostCopy:
    """One tensor parked in host memory, and the state of fetching it back."""

    __slots__ = ("__weakref__", "_held", "_live", "copier", "host", "pending", "ready", "waiting")

    def __init__(self, copier: Copier, host: torch.Tensor, ready: Any) -> None:
        self.copier = copier
        self.host = host
        self.ready = ready  # CUDA event recorded after the device-to-host copy, or None
        self.pending: tuple[torch.Tensor, Any] | None = None
        # The device copy's storage while any tensor still uses it: tensors rebuilt from it are
        # dropped by autograd after each unpack, the storage is not, so later unpacks share it.
        self._live: weakref.ref[torch.UntypedStorage] | None = None
        # Saved tensors packed into this copy and not yet unpacked. The device copy is held
        # from the first unpack to the last (no longer than the tensor lived without offload),
        # so a tensor saved by several ops (an input both pow and mul keep) is fetched once.
        self.waiting = 0
        self._held: torch.Tensor | None = None

    def _alive(self) -> torch.UntypedStorage | None:
        return self._live() if self._live is not None else None

    def prefetch(self) -> None:
        """Start copying back to the device, unless already started or still there."""
        if self.pending is None and self._alive() is None:
            self.pending = self.copier.start_fetch(self)

    def fetched(self) -> torch.Tensor:
        """The tensor back on the device (waits for the copy; several unpacks share one copy)."""
        st = self._alive()
        if st is not None:
            host = self.host
            t = torch.empty(0, dtype=host.dtype, device=self.copier.device)
            t = t.set_(st, 0, host.size(), host.stride())
        else:
            pending = self.pending if self.pending is not None else self.copier.start_fetch(self)
            self.pending = None
            t = self.copier.finish_fetch(pending)
            self._live = weakref.ref(t.untyped_storage())
        self.waiting -= 1
        self._held = t if self.waiting > 0 else None
        return t


class HostView:
    """A saved tensor as a view of a ``HostCopy`` (or the copy itself when ``dtype`` is None)."""

    __slots__ = ("copy", "dtype", "offset", "size", "stride")

    def __init__(
        self,
        copy: HostCopy,
        dtype: torch.dtype | None = None,
        size: tuple[int, ...] = (),
        stride: tuple[int, ...] = (),
        offset: int = 0,
    ) -> None:
        self.copy = copy
        self.dtype = dtype
        self.size = size
        self.stride = stride
        self.offset = offset

    def fetched(self) -> torch.Tensor:
        base = self.copy.fetched()
        if self.dtype is None:
            return base
        return base.view(self.dtype).as_strided(self.size, self.stride, self.offset)


class Copier:
    """Moves tensors of one device to host memory and back.

    On CUDA: pinned host buffers, a side stream each way, events to order them with the compute
    stream, and at most ``max_in_flight`` device tensors kept alive for unfinished copies. On any
    other device (and for the CPU emulation used in tests): plain synchronous copies.

    Args:
        device: the device whose tensors are moved.
        max_in_flight: device tensors kept alive while their copy to host is running.
    """

    def __init__(
        self, device: torch.device, *, max_in_flight: int = MAX_IN_FLIGHT, fake: bool = False
    ) -> None:
        self.device = device
        #: fake tensors (``gradckpt.estimate``): the same parking and fetching as on a device,
        #: as synchronous fake copies, so the estimate's tracker sees device bytes leave and
        #: host bytes (``state.host_empty_strided``) arrive; no streams, no pinned memory.
        self.fake = fake
        self.cuda = device.type == "cuda" and not fake
        self.max_in_flight = max_in_flight
        self.copies = 0  # tensors copied to host so far (for tests and reports)
        self.fetches = 0  # copies back to the device
        self._parked: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._in_flight: deque[tuple[Any, torch.Tensor]] = deque()
        if self.cuda:
            self.d2h = torch.cuda.Stream(device)
            self.h2d = torch.cuda.Stream(device)

    def eligible(self, t: Any, min_bytes: int) -> bool:
        """Whether ``t`` is worth moving: a plain strided tensor on this device, big enough.

        Parameters and tensor subclasses (DTensors, quantized weights) stay put; fake tensors
        move only for a fake copier (an estimate).
        """
        plain = type(t) is torch.Tensor or (
            self.fake and isinstance(t, FakeTensor) and not isinstance(t, nn.Parameter)
        )
        return (
            plain
            and t.layout is torch.strided
            and t.device == self.device
            and t.numel() > 0
            and t.numel() * t.element_size() >= min_bytes
        )

    def park(self, t: torch.Tensor) -> HostView:
        """Copy ``t`` to host memory (asynchronously on CUDA); what to unpack it from later.

        When ``t`` covers at least half of its storage, the whole storage is copied once and
        every tensor saved from it (a tensor and its transposed or reshaped views, an attention
        mask every block saves) is rebuilt from that one copy with its exact strides; otherwise
        (a small slice of a big tensor) only ``t``'s elements are copied.
        """
        st = t.untyped_storage()
        # Fake tensors (estimates) copy their own elements: a fake tensor made with set_() on a
        # fake storage kept that storage alive after the device tensor was freed (seen on torch
        # 2.13), so the estimate would count the offloaded input on the device all the same.
        whole = not self.fake and st.nbytes() <= 2 * t.numel() * t.element_size()
        key: Any = st if whole else t
        hit = self._parked.get(key)
        copy = None
        if hit is not None and hit[0] == t._version:
            copy = hit[1]()
        if copy is None:
            if whole:
                src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
                copy = self._copy(src, (st.nbytes(),), (1,))
            else:
                copy = self._copy(t, tuple(t.size()), _dense_strides(t))
            self._parked[key] = (t._version, weakref.ref(copy))
        copy.waiting += 1
        if whole:
            return HostView(
                copy, t.dtype, tuple(t.size()), tuple(t.stride()), int(t.storage_offset())
            )
        return HostView(copy)

    def _copy(self, t: torch.Tensor, size: tuple[int, ...], stride: tuple[int, ...]) -> HostCopy:
        host = host_empty_strided(size, stride, dtype=t.dtype, pin_memory=self.cuda)
        ready = None
        if self.cuda:
            self.d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.d2h):
                host.copy_(t, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.d2h)
            # Keep t alive until the copy has read it (rather than record_stream, which would
            # hold its memory until some later allocation happens to check).
            self._in_flight.append((ready, t))
            self._drain(self.max_in_flight)
        else:
            host.copy_(t)
        self.copies += 1
        return HostCopy(self, host, ready)

    def _drain(self, limit: int) -> None:
        q = self._in_flight
        while q and q[0][0].query():
            q.popleft()
        while len(q) > limit:
            q.popleft()[0].synchronize()

    def start_fetch(self, copy: HostCopy) -> tuple[torch.Tensor, Any]:
        """Start copying ``copy`` back to the device; returns (tensor, event) for ``finish_fetch``."""
        host = copy.host
        self.fetches += 1
        if not self.cuda:
            dev = torch.empty_strided(
                host.size(), host.stride(), dtype=host.dtype, device=self.device
            )
            dev.copy_(host)
            return dev, None
        self._drain(self.max_in_flight)  # release device tensors whose copy has finished
        if copy.ready is not None:
            self.h2d.wait_event(copy.ready)
        with torch.cuda.stream(self.h2d):
            dev = torch.empty_strided(
                host.size(), host.stride(), dtype=host.dtype, device=self.device
            )
            dev.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.h2d)
        return dev, done

    def finish_fetch(self, pending: tuple[torch.Tensor, Any]) -> torch.Tensor:
        """Make the compute stream wait for a fetch started by ``start_fetch``; the device tensor."""
        dev, done = pending
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            dev.record_stream(stream)  # allocated on the copy stream, used and freed on this one
        return dev


_lock = threading.Lock()
_copiers: dict[tuple[torch.device, bool], Copier] = {}
_emulating = 0


@contextlib.contextmanager
def emulate_host_on_cpu() -> Iterator[None]:
    """Offload on a CPU-only run as if CPU memory were a device: for tests of the offload path.

    Inside, ``OFFLOAD`` and ``offload_saved`` copy CPU tensors into separate buffers that
    ``measure`` counts as host memory, and copy them back when backward needs them. Gradients
    must be unchanged and device bytes must drop by what was moved; that is what the tests check.

    Example:
        >>> with emulate_host_on_cpu():
        ...     stats = gradckpt.measure(step, model=model)
        >>> stats.host_activation_bytes > 0
        True
    """
    global _emulating
    with _lock:
        _emulating += 1
    try:
        yield
    finally:
        with _lock:
            _emulating -= 1


def copier_for(device: torch.device, *, fake: bool = False) -> Copier | None:
    """The copier for ``device``, or None where there is no separate device memory (CPU).

    ``fake``: the block's tensors are fake (an estimate, whose fake tensors stand for a GPU's
    while they say "cpu"): a copier that makes fake host copies, so offloaded bytes leave the
    estimated device memory and show as host bytes.
    """
    if device.type == "meta":
        return None
    if fake:
        key = (device, True)
        with _lock:
            copier = _copiers.get(key)
            if copier is None:
                copier = _copiers[key] = Copier(device, fake=True)
        return copier
    if device.type == "cpu" and not _emulating:
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return None  # fake CUDA tensors outside an estimate: nothing real to move
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _lock:
        copier = _copiers.get((device, False))
        if copier is None:
            copier = _copiers[(device, False)] = Copier(device)
    return copier


# -- saved-tensor hooks, one group per block call ----------------------------------------------

_tls = threading.local()


class _Group:
    """The tensors one block call parked; its first fetch in backward prefetches the block before."""

    __slots__ = ("__weakref__", "copies", "defer", "prefetched", "prev")

    def __init__(self, *, defer: bool = False) -> None:
        self.copies: list[HostCopy] = []
        # OFFLOAD blocks: the block before is fetched when this block's recompute ends (its
        # backward hides the copy), not when it starts: two block inputs on the device at the
        # recompute's peak would be one more than needed.
        self.defer = defer
        last = getattr(_tls, "last", None)
        self.prev: weakref.ref[_Group] | None = last
        self.prefetched = False
        _tls.last = weakref.ref(self)

    def prefetch_previous(self) -> None:
        if self.prefetched:
            return
        self.prefetched = True
        prev = self.prev() if self.prev is not None else None
        while prev is not None and not prev.copies:  # blocks whose inputs were all too small
            prev = prev.prev() if prev.prev is not None else None
        if prev is not None:
            for copy in prev.copies:
                copy.prefetch()

    def hooks(
        self, copier: Copier, min_bytes: int, keep: frozenset[int] = frozenset()
    ) -> torch.autograd.graph.saved_tensors_hooks:
        def pack(t: torch.Tensor) -> Any:
            if not copier.eligible(t, min_bytes) or id(t.untyped_storage()) in keep:
                return t
            view = copier.park(t)
            self.copies.append(view.copy)
            return _Parked(self, view)

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, _Parked):
                return packed.get()
            return packed  # type: ignore[no-any-return]

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _Parked:
    __slots__ = ("group", "view")

    def __init__(self, group: _Group, view: HostView) -> None:
        self.group = group
        self.view = view

    def get(self) -> torch.Tensor:
        self.view.copy.prefetch()
        if not self.group.defer:  # a block's own saved tensors (offload_saved): fetch ahead now
            self.group.prefetch_previous()
        return self.view.fetched()


def _device_of(args: tuple[Any, ...], kwargs: Mapping[str, Any], block: nn.Module) -> torch.device:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device
    for p in block.parameters():
        return p.device
    return torch.device("cpu")


def _is_fake(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether the block runs on fake tensors (``gradckpt.estimate``)."""
    return any(isinstance(v, FakeTensor) for v in (*args, *kwargs.values()))


def _option_min_bytes(options: Mapping[str, Any]) -> int:
    value = options.get("offload_min_bytes")
    return DEFAULT_MIN_BYTES if value is None else _min_bytes(value)


def offload_block(
    name: str, block: nn.Module, forward: Callable[..., Any], options: Mapping[str, Any]
) -> Callable[..., Any]:
    stateful = stateful_modules([block])
    min_bytes = _option_min_bytes(options)
    early = early_stop_option(options)

    def offloaded_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        device = _device_of(args, kwargs, block)
        copier = copier_for(device, fake=_is_fake(args, kwargs))
        if copier is None:
            if device.type != "cpu":  # meta tensors: nothing to move
                return run_checkpointed(
                    forward, args, kwargs, stateful=stateful, name=name, early_stop=early
                )
            warn_once(
                "offload",
                "gradckpt: OFFLOAD on a CPU-only run: block inputs already live in host memory, "
                "so they stay where they are and the blocks are recomputed (same as RECOMPUTE)",
            )
            return run_checkpointed(
                forward, args, kwargs, stateful=stateful, name=name, early_stop=early
            )
        group = _Group(defer=True)

        def run(*a: Any, **k: Any) -> Any:
            try:
                return forward(*a, **k)
            finally:  # also when torch stops the recompute early (by raising)
                if is_recomputing():
                    group.prefetch_previous()

        with group.hooks(copier, min_bytes):
            return run_checkpointed(
                run, args, kwargs, stateful=stateful, name=name, early_stop=early
            )

    return offloaded_forward


def _storage_ids(block: nn.Module) -> frozenset[int]:
    tensors = [*block.parameters(), *block.buffers()]
    return frozenset(id(t.untyped_storage()) for t in tensors)


def save_block(
    name: str, block: nn.Module, forward: Callable[..., Any], options: Mapping[str, Any]
) -> Callable[..., Any]:
    """SAVE blocks are wrapped only with ``offload_saved``: their saved tensors go to host."""
    if not options.get("offload_saved"):
        return forward
    min_bytes = _option_min_bytes(options)

    def saved_offloaded_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        device = _device_of(args, kwargs, block)
        copier = copier_for(device, fake=_is_fake(args, kwargs))
        if copier is None:
            if device.type != "cpu":  # meta tensors: nothing to move
                return forward(*args, **kwargs)
            warn_once(
                "offload_saved",
                "gradckpt: offload_saved on a CPU-only run: saved tensors already live in host "
                "memory, so they stay where they are (nothing is copied)",
            )
            return forward(*args, **kwargs)
        # Weights (and views of them, like the weight.t() a Linear saves) are never moved:
        # they stay on the device anyway, so a host copy would only add traffic.
        with _Group().hooks(copier, min_bytes, _storage_ids(block)):
            return forward(*args, **kwargs)

    return saved_offloaded_forward
