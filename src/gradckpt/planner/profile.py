"""Profile a training step for the planner: per block, what each decision keeps, peaks at and costs.

One real step runs under the leanest standard plan (``full``: every block recomputed), so the
profile itself stays within a budget that the leanest plan fits, with a tracker recording the live
bytes at each block's forward and backward boundaries. Each other decision is then measured on one
block of each kind in isolation (its captured inputs, one forward and backward), and the difference
to the isolated ``full`` run is added to that block's in-model numbers. RNG state, gradients and
buffers (BatchNorm statistics) are restored afterwards: profiling does not change training.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils._pytree import tree_flatten

from .._model_io import ModelState
from ..apply import install, installed, uninstall
from ..blocks import resolve_blocks
from ..errors import BlockError
from ..measure import StepTracker, live_tensors, storages
from ..plans import Decision, Plan
from ..runtime import decisions as _decisions
from ..state import is_recomputing
from .model import BlockOption, StepProfile

__all__ = [
    "ProfileRecorder",
    "ProfileTracker",
    "assemble",
    "available_decisions",
    "device_model",
    "profile_step",
]


def available_decisions(device: torch.device) -> list[Decision]:
    """Decisions the planner may choose on ``device`` (OFFLOAD only where there is a host to park in)."""
    registered = _decisions.available()
    out = [Decision.SAVE, Decision.RECOMPUTE]
    if Decision.SELECTIVE in registered:
        out.append(Decision.SELECTIVE)
    if Decision.OFFLOAD in registered and device.type == "cuda":
        out.append(Decision.OFFLOAD)
    return out


def device_model(device: torch.device) -> tuple[float, float]:
    """Measured (FLOP/s, bytes/s) of ``device``: a 512^3 matmul and a 16 MiB copy, ~50 ms in all."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a = torch.randn(512, 512, device=device)
    b = torch.randn(512, 512, device=device)
    src = torch.empty(4 << 20, device=device)
    dst = torch.empty_like(src)
    rates = []
    for fn, work in (
        (lambda: a @ b, 2 * 512**3),
        (lambda: dst.copy_(src), 2 * src.numel() * src.element_size()),
    ):
        fn()
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.02:
            fn()
            n += 1
        sync()
        rates.append(work * n / (time.perf_counter() - t0))
    return rates[0], rates[1]


class ProfileTracker(StepTracker):
    """StepTracker that also keeps a resettable window peak (the peak between two block boundaries)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.window_peak = 0

    def forget(self, tensors: list[torch.Tensor]) -> None:
        """Stop counting ``tensors`` (already seeded): memory the profiled step would not have."""
        for t in tensors:
            for st in storages(t):
                info = self._live.get(id(st))
                if info is not None and info[0]:
                    self._live[id(st)] = (0, info[1], info[2])
                    self.current[info[1]] -= info[0]
                    self.baseline[info[1]] = self.current[info[1]]
        self.peak = dict(self.current)

    def reset_window(self) -> int:
        """Return the peak since the last reset, and start a new window at the current level."""
        peak = max(self.window_peak, self.live_bytes())
        self.window_peak = self.live_bytes()
        return peak

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # FLOPs, recompute bytes and storages are counted by StepTracker exactly as `measure`
        # counts them; this adds only the window peak.
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.window_peak = max(self.window_peak, self.live_bytes())
        return out


def _first_grad_tensor(obj: Any) -> torch.Tensor | None:
    for t in tree_flatten(obj)[0]:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return t
    return None


@dataclass
class ProfileRecorder:
    """Hooks and tracker recording block boundaries during one step (used eagerly or lazily)."""

    names: list[str]
    modules: list[nn.Module]
    tracker: ProfileTracker
    pre: dict[int, int] = field(default_factory=dict)
    post: dict[int, int] = field(default_factory=dict)
    fwd_peak: dict[int, int] = field(default_factory=dict)
    event: dict[int, int] = field(
        default_factory=dict
    )  # block -> live when its output grad is ready
    # window peaks keyed by window: ("fwd", i) from block i's start to the next block's,
    # ("head",) from the last block's end to its backward, ("bwd", i) block i's backward,
    # ("tail",) after block 0's backward, ("end",) after the step
    win_peak: dict[tuple[Any, ...], int] = field(default_factory=dict)
    # inputs of the first block of each kind (class and input shapes), for the isolated runs
    captured: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    groups: dict[tuple[Any, ...], int] = field(default_factory=dict)
    rep: dict[int, int] = field(default_factory=dict)
    pre_peak: int = 0
    _window: tuple[Any, ...] = ("pre",)
    _handles: list[Any] = field(default_factory=list)

    def close_window(self, nxt: tuple[Any, ...]) -> None:
        """Record the peak of the window open now and open ``nxt``."""
        self.win_peak[self._window] = self.tracker.reset_window()
        self._window = nxt

    def install(self) -> None:
        n = len(self.modules)
        for i, mod in enumerate(self.modules):

            def pre(_m: nn.Module, args: Any, kwargs: Any, i: int = i) -> None:
                if self.tracker.backward_started or is_recomputing():
                    return
                if i == 0:
                    self.pre_peak = self.tracker.reset_window()
                    self._window = ("fwd", 0)
                else:
                    self.close_window(("fwd", i))
                self.pre[i] = self.tracker.live_bytes()
                key = _group_key(_m, args, kwargs)
                if key not in self.groups:
                    self.groups[key] = i
                    self.captured[i] = (args, kwargs)
                self.rep[i] = self.groups[key]
                x = _first_grad_tensor(args) if i == 0 else None
                if x is not None:
                    x.register_hook(self._grad_hook(-1))

            def post(_m: nn.Module, args: Any, kwargs: Any, out: Any, i: int = i) -> None:
                if self.tracker.backward_started or is_recomputing():
                    return
                self.post[i] = self.tracker.live_bytes()
                y = _first_grad_tensor(out)
                if y is not None:
                    y.register_hook(self._grad_hook(i))
                if i == n - 1:
                    self.close_window(("head",))

            self._handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(mod.register_forward_hook(post, with_kwargs=True))

    def _grad_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(_g: torch.Tensor) -> None:
            if i in self.event:
                return
            self.close_window(("bwd", i) if i >= 0 else ("tail",))
            self.event[i] = self.tracker.live_bytes()

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def finish(self) -> None:
        self.close_window(("end",))


def _isolated(
    name: str,
    block: nn.Module,
    decision: Decision,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: Mapping[str, Any],
    device: torch.device,
) -> dict[str, int]:
    """Forward and backward of one block under ``decision``; bytes relative to its start level."""
    base_forward = block.forward
    wrapper = _decisions.wrapper_for(decision)
    fwd = (
        base_forward
        if decision is Decision.SAVE or wrapper is None
        else wrapper(name, block, base_forward, options)
    )

    leaves: list[torch.Tensor] = []

    def detach(t: Any) -> Any:
        # A fresh leaf, then a clone of it: in the model the block's input is not a leaf (it has
        # a grad_fn), and autograd saves leaves and non-leaves differently.
        if isinstance(t, torch.Tensor) and t.requires_grad:
            leaf = t.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf.clone()
        return t

    a = tuple(detach(t) for t in args)
    kw = {k: detach(v) for k, v in kwargs.items()}
    params = [p for p in block.parameters() if p.requires_grad]
    tracker = ProfileTracker(device_type=device.type, use_allocator=device.type == "cuda")
    # Seed with what the block's forward can view (its weights, buffers and inputs) rather than
    # every live tensor: a gc scan costs ~0.5 s per run with transformers loaded.
    inputs = [t for t in tree_flatten((args, kwargs, a, kw))[0] if isinstance(t, torch.Tensor)]
    tracker.seed([*block.parameters(), *block.buffers(), *inputs])
    # One untracked run first: decisions may learn from a backward (selective stops keeping
    # outputs its recompute never reaches), and the plan will run in that learned state.
    warm = _first_grad_tensor(fwd(*a, **kw))
    if warm is not None:
        torch.autograd.grad([warm], [*params, *leaves], [torch.ones_like(warm)], allow_unused=True)
    del warm
    with tracker:
        l0 = tracker.reset_window()
        h0 = tracker.live_bytes("host")
        out = fwd(*a, **kw)
        # What the block parked in host memory (OFFLOAD) leaves the device in the model, where
        # nothing else holds the block's input; here the caller's copy of it stays alive.
        l1 = tracker.live_bytes() - (tracker.live_bytes("host") - h0)
        pf = tracker.reset_window()
        y = _first_grad_tensor(out)
        if y is None:
            raise BlockError(
                f"block {name!r} returns no tensor that requires grad; it cannot be profiled"
            )
        g = torch.ones_like(y)
        lb = tracker.reset_window()
        grads = torch.autograd.grad([y], [*params, *leaves], [g], allow_unused=True)
        pb = tracker.reset_window()
    del out, y, g, grads
    return {
        "kept": l1 - l0,
        "fwd_extra": pf - l0,
        "bwd_extra": pb - lb,
        "recompute_flops": tracker.flops["recompute"],
        "recompute_bytes": tracker.recompute_bytes,
    }


def _reinstall(model: nn.Module, previous: Any) -> None:
    """Put back the plan ``installed(model)`` returned before profiling (its lazy state is not kept)."""
    if previous is not None:
        install(model, previous.plan, resolve_blocks(model, list(previous.plan.blocks)))


def _group_key(block: nn.Module, args: Any, kwargs: Any) -> tuple[Any, ...]:
    shapes = tuple(
        (tuple(t.shape), t.dtype)
        for t in tree_flatten((args, kwargs))[0]
        if isinstance(t, torch.Tensor)
    )
    return (type(block), shapes)


def profile_step(
    model: nn.Module,
    step_fn: Callable[[], Any],
    blocks: Sequence[tuple[str, nn.Module]],
    *,
    decisions: Sequence[Decision] | None = None,
    options: Mapping[str, Any] | None = None,
    batch: int = 0,
    device: torch.device | None = None,
) -> StepProfile:
    """Run ``step_fn`` once under ``full`` and profile every block for every decision.

    Args:
        model: the model (its gradients, buffers and the RNG are restored afterwards).
        step_fn: one forward and backward (no optimizer step).
        blocks: ``[(name, module)]``, in execution order.
        decisions: the decisions to offer (default: ``available_decisions(device)``).
        options: plan options passed to decision wrappers (e.g. ``save_ops``).
        batch: the micro-batch size of the step (for scaling hints).
        device: the device (default: the model's).

    Returns:
        A ``StepProfile``.
    """
    dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    decs = list(decisions or available_decisions(dev))
    if Decision.RECOMPUTE not in decs:
        decs.append(Decision.RECOMPUTE)
    opts = dict(options or {})
    names = [n for n, _ in blocks]
    mods = [m for _, m in blocks]
    previous = installed(model)
    state = ModelState(model)
    tracker = ProfileTracker(device_type=dev.type, use_allocator=dev.type == "cuda")
    rec = ProfileRecorder(names, mods, tracker)
    try:
        install(
            model,
            Plan(tuple(names), (Decision.RECOMPUTE,) * len(names), policy="full", options=opts),
            blocks,
        )
        rec.install()
        stale = [p.grad for p in model.parameters() if p.grad is not None]
        for p in model.parameters():
            p.grad = None
        gc.collect()
        tracker.seed(live_tensors(fake=any(is_fake(p) for p in model.parameters())))
        # Gradients left from an earlier step are held only to be restored afterwards; a training
        # step starting from zero_grad(set_to_none=True) would not have them.
        tracker.forget(stale)
        del stale
        tracker.window_peak = tracker.live_bytes()
        with tracker:
            step_fn()
        rec.finish()
        rec.remove()
        result = assemble(rec, model, decs, opts, dev, batch)
    finally:
        rec.remove()
        uninstall(model)
        state.restore()
        _reinstall(model, previous)
    return result


def assemble(
    rec: ProfileRecorder,
    model: nn.Module,
    decs: list[Decision],
    opts: dict[str, Any],
    dev: torch.device,
    batch: int,
) -> StepProfile:
    n = len(rec.modules)
    missing = [rec.names[i] for i in range(n) if i not in rec.pre or i not in rec.post]
    if missing:
        raise BlockError(
            f"block {missing[0]!r} did not run in the profiled step; pass blocks= that the step uses"
        )
    kept_r = [rec.post[i] - rec.pre[i] for i in range(n)]
    prefix = [0]
    for k in kept_r:
        prefix.append(prefix[-1] + k)
    fwd_base = [rec.pre[i] - prefix[i] for i in range(n)]
    fwd_extra_r = [rec.win_peak.get(("fwd", i), rec.pre[i]) - rec.pre[i] for i in range(n)]
    # backward events: block i's backward starts when its output's gradient is ready
    bwd_base: list[int] = []
    bwd_extra_r: list[int] = []
    for i in range(n):
        if i not in rec.event:
            raise BlockError(
                f"block {rec.names[i]!r}'s output got no gradient in the profiled step; the planner "
                "needs every block on the path to the loss"
            )
        bwd_base.append(rec.event[i] - prefix[i + 1])
        bwd_extra_r.append(rec.win_peak.get(("bwd", i), rec.event[i]) - rec.event[i])
    head_base = rec.win_peak.get(("head",), 0) - prefix[n]
    # after the step: block 0's backward to the next forward, and the optimizer step's own
    # windows when the lazy profile saw it after accumulated micro-steps (planner/lazy.py)
    tail = max(
        rec.win_peak.get(k, 0) for k in [("tail",), ("end",), ("optimizer",), ("after optimizer",)]
    )

    # isolated runs: one block per kind, every decision; deltas applied to the in-model numbers
    flops_s, bytes_s = device_model(dev)
    rep = rec.rep
    iso: dict[tuple[int, Decision], dict[str, int]] = {}
    previous = installed(model)
    uninstall(model)  # the isolated runs wrap each block's own forward
    try:
        for i in sorted(set(rep.values())):
            args, kwargs = rec.captured[i]
            for d in decs:
                iso[(i, d)] = _isolated(rec.names[i], rec.modules[i], d, args, kwargs, opts, dev)
    finally:
        rec.captured.clear()
        _reinstall(model, previous)

    def cost(flops: int, moved: int) -> int:
        return int(1e9 * (flops / flops_s + moved / bytes_s))

    options: list[dict[Decision, BlockOption]] = []
    for i in range(n):
        r = iso[(rep[i], Decision.RECOMPUTE)]
        per: dict[Decision, BlockOption] = {}
        for d in decs:
            x = iso[(rep[i], d)]
            kept = max(0, kept_r[i] + x["kept"] - r["kept"])
            per[d] = BlockOption(
                kept=kept,
                fwd_extra=max(kept, fwd_extra_r[i] + x["fwd_extra"] - r["fwd_extra"]),
                bwd_extra=max(0, bwd_extra_r[i] + x["bwd_extra"] - r["bwd_extra"]),
                cost=cost(x["recompute_flops"], x["recompute_bytes"]),
                recompute_flops=x["recompute_flops"],
                recompute_bytes=x["recompute_bytes"],
            )
        options.append(per)

    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    fixed = rec.tracker.baseline.get(dev.type, 0) + grads
    prof = StepProfile(
        blocks=tuple(rec.names),
        options=tuple(options),
        fwd_base=tuple(fwd_base),
        bwd_base=tuple(bwd_base),
        pre_peak=rec.pre_peak,
        head_base=head_base,
        tail_peak=tail,
        batch=batch,
        fixed_bytes=fixed,
        flops_per_s=flops_s,
        bytes_per_s=bytes_s,
        device=str(dev),
    )
    return prof
