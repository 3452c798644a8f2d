"""Measure one training step: peak and activation bytes, bytes per block, FLOPs by phase, time.

On CUDA, bytes come from the caching allocator's statistics. On CPU and under FakeTensorMode they
come from tracking live tensor storages: every storage an op creates is counted until Python frees
it, and storages alive before the step (weights, optimizer states, inputs) are seeded first so that
views of them (``weight.t()`` in every Linear) are not counted as new memory.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from .checkpoint import is_recomputing
from .errors import GradCkptError

__all__ = ["MemoryStats", "StepTracker", "count_flops", "host_empty_strided", "measure"]

aten = torch.ops.aten


@dataclass(slots=True, kw_only=True)
class MemoryStats:
    """What one training step cost. Bytes are ints; FLOPs count a multiply-add as 2.

    Attributes:
        peak_bytes: most device bytes live at any moment of the step (weights, gradients,
            optimizer states, activations, temporaries).
        activation_bytes: device bytes held for backward at the end of forward: live bytes when
            backward starts minus live bytes before the step (weights, buffers, inputs excluded).
        baseline_bytes: device bytes live before the step started.
        host_peak_bytes: most host (CPU) bytes the step added at any moment, when the device is
            not the CPU (offloaded activations); on a CPU-only run, only the copies of offload's
            CPU emulation (``gradckpt.offload.emulate_host_on_cpu``), else 0.
        host_activation_bytes: host bytes held for backward at the end of forward (offload).
        block_bytes: per block name, device bytes it added to live memory during forward.
        forward_flops: FLOPs before backward started.
        backward_flops: FLOPs of backward ops (gradient computation), recompute excluded.
        recompute_flops: FLOPs spent re-running checkpointed forward code during backward.
        recompute_bytes: bytes read and written by the ops re-run during backward (inputs plus
            outputs of every op that is not a view; ops whose results a selective checkpoint
            kept are not re-run and not counted). FLOPs miss the cost of recomputing pointwise
            ops, which is memory traffic; this counts it.
        time_s: wall time of the step (includes the tracker's overhead on CPU).
        device: the device measured (``"cpu"``, ``"cuda:0"``; under fake tensors, the device they pretend to be on).
    """

    peak_bytes: int
    activation_bytes: int
    baseline_bytes: int = 0
    host_peak_bytes: int = 0
    host_activation_bytes: int = 0
    block_bytes: dict[str, int] = field(default_factory=dict)
    forward_flops: int = 0
    backward_flops: int = 0
    recompute_flops: int = 0
    recompute_bytes: int = 0
    time_s: float = 0.0
    device: str = "cpu"

    @property
    def total_flops(self) -> int:
        return self.forward_flops + self.backward_flops + self.recompute_flops

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "activation_bytes": self.activation_bytes,
            "baseline_bytes": self.baseline_bytes,
            "host_peak_bytes": self.host_peak_bytes,
            "host_activation_bytes": self.host_activation_bytes,
            "block_bytes": dict(self.block_bytes),
            "forward_flops": self.forward_flops,
            "backward_flops": self.backward_flops,
            "recompute_flops": self.recompute_flops,
            "recompute_bytes": self.recompute_bytes,
            "time_s": self.time_s,
            "device": self.device,
        }


# -- FLOPs ---------------------------------------------------------------------------------


def _cpu_sdpa_flop(
    query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kw: Any
) -> int:
    return int(sdpa_flop_count(query.shape, key.shape, value.shape))


def _cpu_sdpa_backward_flop(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kw: Any
) -> int:
    return int(sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape))


# torch's FlopCounterMode has no formula for the CPU flash kernel and counts 0 for it; the
# attention FLOPs are the same two batched matmuls on every device (4*B*H*S_q*S_k*D forward).
_EXTRA_FLOPS: dict[Any, Callable[..., int]] = {}
for _name, _fn in (
    ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flop),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flop),
):
    if hasattr(aten, _name):
        _EXTRA_FLOPS[getattr(aten, _name)] = _fn


def count_flops(func: Any, args: Any, kwargs: Any, out: Any) -> int:
    """FLOPs of one aten op call (0 for ops without a formula: pointwise ops, norms...)."""
    packet = getattr(func, "overloadpacket", func)
    f = _EXTRA_FLOPS.get(packet) or flop_registry.get(packet)
    if f is None:
        return 0
    return int(f(*args, **(kwargs or {}), out_val=out))


# -- live storage tracking -----------------------------------------------------------------


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    try:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        if is_traceable_wrapper_subclass(t):
            attrs, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
            out = []
            for a in attrs:
                v = getattr(t, a)
                if isinstance(v, torch.Tensor):
                    out.extend(_storages(v))
            return out
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):
        return []  # sparse, nested or otherwise storage-less tensors


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


def _is_host(st: torch.UntypedStorage) -> bool:
    if getattr(_host_tls, "active", False):
        return True
    ref = _HOST_STORAGES.get(id(st))
    return ref is not None and ref() is st


class StepTracker(TorchDispatchMode):
    """Dispatch mode tracking live storage bytes per device type, FLOPs per phase, backward start.

    Phases: ``forward`` until the first op runs inside an autograd graph task (backward),
    ``recompute`` for forward code re-run by a checkpoint during backward, ``backward`` for the
    rest of the graph task. Ops after backward (optimizer step) count as forward again, but their
    bytes still count towards the peak.
    """

    def __init__(self, *, device_type: str, use_allocator: bool = False) -> None:
        super().__init__()
        self.device_type = device_type
        self.use_allocator = use_allocator
        self._live: dict[int, tuple[int, str]] = {}
        self._refs: dict[int, weakref.ref[Any]] = {}
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.baseline: dict[str, int] = {}
        self.at_backward: dict[str, int] = {}
        self.flops = {"forward": 0, "backward": 0, "recompute": 0}
        self.recompute_bytes = 0
        self.in_backward = False
        self.backward_started = False

    # storages -------------------------------------------------------------------------------
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
        for st in _storages(t):
            key = id(st)
            if key in self._live:
                continue
            n = int(st.nbytes())
            dev = t.device.type
            if dev == "cpu" and self.device_type == "cpu" and _is_host(st):
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

    # dispatch -------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        in_bwd = torch._C._current_graph_task_id() != -1
        if in_bwd and not self.in_backward:
            self.backward_started = True
            snap = dict(self.current)
            if self.use_allocator:
                snap["cuda"] = int(torch.cuda.memory_allocated())
            for dev, n in snap.items():
                self.at_backward[dev] = max(self.at_backward.get(dev, 0), n)
        self.in_backward = in_bwd
        out = func(*args, **(kwargs or {}))
        flops = count_flops(func, args, kwargs, out)
        if flops:
            phase = "recompute" if is_recomputing() else ("backward" if in_bwd else "forward")
            self.flops[phase] += flops
        if is_recomputing() and not getattr(func, "is_view", False):
            self.recompute_bytes += _io_bytes(args, kwargs, out)
        if not self.use_allocator:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.track(t)
        return out


def _io_bytes(args: Any, kwargs: Any, out: Any) -> int:
    n = 0
    for t in tree_flatten((args, kwargs or {}, out))[0]:
        if isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    return n


def _live_tensors() -> list[torch.Tensor]:
    # issubclass(type(o)) rather than isinstance: isinstance on some torch module-level objects
    # (torch.distributed.reduce_op) emits a deprecation warning.
    return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]


def _fake_model(model: nn.Module | None) -> bool:
    if model is None:
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(p, FakeTensor) for p in model.parameters())


def _resolve_device(device: str | torch.device | None, model: nn.Module | None) -> torch.device:
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError):
            raise GradCkptError(
                f"device {device!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:N'"
            ) from None
    if model is not None:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def measure(
    step_fn: Callable[[], Any],
    *,
    model: nn.Module | None = None,
    blocks: Iterable[tuple[str, nn.Module]] | None = None,
    device: str | torch.device | None = None,
) -> MemoryStats:
    """Run ``step_fn()`` once (a forward, a backward, optionally an optimizer step) and measure it.

    Args:
        step_fn: a function of no arguments running one training step.
        model: the model, for its device and per-block bytes (optional).
        blocks: ``[(name, module)]`` to report ``block_bytes`` for (default: the model's
            blocks from ``find_blocks``, when ``model`` is given and has any).
        device: the device to measure (default: the model's device, else CPU).

    Returns:
        A ``MemoryStats``.

    Example:
        >>> def step():
        ...     model(**batch).loss.backward()
        >>> stats = gradckpt.measure(step, model=model)
        >>> stats.activation_bytes
    """
    if not callable(step_fn):
        raise GradCkptError(
            f"measure needs a function running one step, got {type(step_fn).__name__}"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise GradCkptError(f"model= must be an nn.Module, got {type(model).__name__}")
    if blocks is not None:
        blocks = list(blocks) if isinstance(blocks, Iterable) else [blocks]  # type: ignore[list-item]
        if not all(
            isinstance(b, tuple) and len(b) == 2 and isinstance(b[1], nn.Module) for b in blocks
        ):
            raise GradCkptError("blocks= must be [(name, module), ...] as find_blocks returns")
    dev = _resolve_device(device, model)
    # Fake tensors report the device they pretend to be on; the allocator knows nothing of them.
    use_allocator = dev.type == "cuda" and torch.cuda.is_available() and not _fake_model(model)
    tracker = StepTracker(device_type=dev.type, use_allocator=use_allocator)

    if blocks is None and model is not None:
        from .blocks import find_blocks
        from .errors import BlockError

        try:
            blocks = find_blocks(model)
        except BlockError:
            blocks = []
    block_bytes: dict[str, int] = {}
    handles = []
    for name, mod in blocks or []:

        def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
            if not tracker.backward_started and not is_recomputing():
                block_bytes.setdefault(name, 0)
                block_bytes[name] -= tracker.live_bytes()

        def post(_m: nn.Module, _a: Any, _o: Any, name: str = name) -> None:
            if not tracker.backward_started and not is_recomputing() and name in block_bytes:
                block_bytes[name] += tracker.live_bytes()

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))

    gc.collect()
    if use_allocator:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = int(torch.cuda.memory_allocated())
    tracker.seed(_live_tensors())
    t0 = time.perf_counter()
    try:
        with tracker:
            step_fn()
        if use_allocator:
            torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    elapsed = time.perf_counter() - t0

    key = dev.type
    if use_allocator:
        peak = int(torch.cuda.max_memory_allocated())
        baseline = base_cuda
    else:
        peak = tracker.peak.get(key, 0)
        baseline = tracker.baseline.get(key, 0)
    at_bwd = tracker.at_backward.get(key) if tracker.backward_started else tracker.live_bytes(key)
    # Host memory: every CPU storage on a CUDA run; the offload copies on a CPU-only run.
    host = "host" if key == "cpu" else "cpu"
    host_peak = tracker.peak.get(host, 0) - tracker.baseline.get(host, 0)
    host_act = tracker.at_backward.get(host, 0) - tracker.baseline.get(host, 0)
    return MemoryStats(
        peak_bytes=peak,
        activation_bytes=max(0, (at_bwd or 0) - baseline),
        baseline_bytes=baseline,
        host_peak_bytes=max(0, host_peak),
        host_activation_bytes=max(0, host_act),
        block_bytes=block_bytes,
        forward_flops=tracker.flops["forward"],
        backward_flops=tracker.flops["backward"],
        recompute_flops=tracker.flops["recompute"],
        recompute_bytes=tracker.recompute_bytes,
        time_s=elapsed,
        device=str(dev),
    )
