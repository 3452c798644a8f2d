"""Measure one training step: peak and activation bytes, bytes per block, FLOPs by phase, time.

On CUDA, bytes come from the caching allocator's statistics. On CPU and under FakeTensorMode they
come from tracking live tensor storages: every storage an op creates is counted until Python frees
it, and storages alive before the step (weights, optimizer states, inputs) are seeded first so that
views of them (``weight.t()`` in every Linear) are not counted as new memory.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import ConfigError
from ..state import is_recomputing
from .flops import count_flops
from .tracker import LiveStorageTracker, io_bytes, is_view_op, live_tensors

__all__ = ["MemoryStats", "StepTracker", "count_flops", "measure"]


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
            CPU emulation (``gradckpt.runtime.offload.emulate_host_on_cpu``), else 0.
        host_activation_bytes: host bytes held for backward at the end of forward (offload).
        block_bytes: per block name, device bytes it added to live memory during forward.
        forward_flops: FLOPs before backward started.
        backward_flops: FLOPs of backward ops (gradient computation), recompute excluded.
        recompute_flops: FLOPs spent re-running checkpointed forward code during backward.
        recompute_bytes: bytes read and written by the ops re-run during backward (inputs plus
            outputs of every op that is not a view; ops whose results a selective checkpoint
            kept are not re-run and not counted). FLOPs miss the cost of recomputing pointwise
            ops, which is memory traffic; this counts it.
        op_bytes: the same count over every op of the step (forward, backward and recompute): a
            tensor read by two ops counts twice.
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
    op_bytes: int = 0
    time_s: float = 0.0
    device: str = "cpu"

    @property
    def total_flops(self) -> int:
        return self.forward_flops + self.backward_flops + self.recompute_flops

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class StepTracker(LiveStorageTracker, TorchDispatchMode):
    """Dispatch mode tracking live storage bytes per device type, FLOPs per phase, backward start.

    Phases: ``forward`` until the first op runs inside an autograd graph task (backward),
    ``recompute`` for forward code re-run by a checkpoint during backward, ``backward`` for the
    rest of the graph task. Ops after backward (optimizer step) count as forward again, but their
    bytes still count towards the peak.
    """

    def __init__(self, *, device_type: str, use_allocator: bool = False) -> None:
        TorchDispatchMode.__init__(self)
        LiveStorageTracker.__init__(self, device_type=device_type, use_allocator=use_allocator)
        self.at_backward: dict[str, int] = {}
        self.flops = {"forward": 0, "backward": 0, "recompute": 0}
        self.recompute_bytes = 0
        self.op_bytes = 0
        self.in_backward = False
        self.backward_started = False

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
        if not is_view_op(func):
            moved = io_bytes(args, kwargs, out)
            self.op_bytes += moved
            if is_recomputing():
                self.recompute_bytes += moved
        for t in tree_flatten(out)[0]:
            # With the allocator, CUDA bytes come from its statistics; host (CPU) storages, such
            # as offloaded activations, exist only in this count, so they are tracked still.
            if isinstance(t, torch.Tensor) and not (self.use_allocator and t.device.type == "cuda"):
                self.track(t)
        return out


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
            raise ConfigError(
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
        raise ConfigError(
            f"measure needs a function running one step, got {type(step_fn).__name__}"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"model= must be an nn.Module, got {type(model).__name__}")
    if blocks is not None:
        blocks = list(blocks) if isinstance(blocks, Iterable) else [blocks]  # type: ignore[list-item]
        if not all(
            isinstance(b, tuple) and len(b) == 2 and isinstance(b[1], nn.Module) for b in blocks
        ):
            raise ConfigError("blocks= must be [(name, module), ...] as find_blocks returns")
    dev = _resolve_device(device, model)
    # Fake tensors report the device they pretend to be on; the allocator knows nothing of them.
    use_allocator = dev.type == "cuda" and torch.cuda.is_available() and not _fake_model(model)
    tracker = StepTracker(device_type=dev.type, use_allocator=use_allocator)

    if blocks is None and model is not None:
        from ..blocks import find_blocks
        from ..errors import BlockError

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
    fake = model is not None and any(is_fake(p) for p in model.parameters())
    tracker.seed(live_tensors(fake=fake))
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
        op_bytes=tracker.op_bytes,
        time_s=elapsed,
        device=str(dev),
    )
