"""``enable(model, budget=...)`` without an example: profile the first real training step, re-plan at the second.

The first step runs under ``full`` (the leanest standard plan) while a dispatch mode records it
(forward, backward, optimizer step, everything until the next forward). At the start of the
second training forward the profile is solved for the budget and the solved plan is installed
in place of ``full``. While it waits, the ``LazyBudget`` object is the installed handle's
``pending`` (``apply.installed(model).pending``), so other code can tell and re-create it.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._model_io import ModelState
from ..apply import install
from ..errors import BudgetError
from ..measure import live_tensors
from ..plans import Plan
from ..units import format_bytes
from .profile import ProfileRecorder, ProfileTracker, assemble, available_decisions
from .solve import auto_plan

__all__ = ["MAX_MICRO_STEPS", "LazyBudget"]

#: Forwards the lazy profile waits through for an optimizer step (gradient accumulation) before
#: planning anyway: 64 covers the accumulation counts recipes use (torchtune, TRL: 1-32).
MAX_MICRO_STEPS = 64


class LazyBudget:
    """Profiles the first training step (forward, backward, optimizer) and re-plans at the second."""

    def __init__(self, budget: int, blocks: list[tuple[str, nn.Module]], options: dict[str, Any]):
        self.budget = budget
        self.blocks = blocks
        self.options = options
        self.recorder: ProfileRecorder | None = None
        self.result: Plan | None = None
        self.micro_steps = 0  # forwards seen while the profile waits for the optimizer step
        self.stepped = False
        self.has_optimizer = False  # an optimizer over the model's weights existed at step 1
        self._optim_hooks: list[Any] = []

    def install(self, model: nn.Module) -> Callable[[], None]:
        handle = model.register_forward_pre_hook(self._pre(model), with_kwargs=True)

        def remove() -> None:
            handle.remove()
            self._abort()

        return remove

    def _abort(self) -> None:
        self._remove_optim_hooks()
        rec, self.recorder = self.recorder, None
        if rec is not None:
            rec.remove()
            # The dispatch mode was entered by the first forward and is still on the mode stack
            # (this is the only place it is left). Exiting it can fail when another mode was
            # pushed above it since; the step is being abandoned, so that is reported, not raised.
            try:
                rec.tracker.__exit__(None, None, None)
            except RuntimeError as e:
                warnings.warn(
                    f"gradckpt: lazy budget profiler could not be stopped cleanly: {e}",
                    stacklevel=2,
                )

    def _pre(self, model: nn.Module) -> Callable[..., None]:
        def hook(_m: nn.Module, args: Any, kwargs: Any) -> None:
            if not (torch.is_grad_enabled() and model.training):
                return
            if self.recorder is None:
                self._start(model)
            elif self._accumulating(model):
                # Gradient accumulation: this forward is another micro-step of the same
                # optimizer step. The blocks were profiled on the first one; the optimizer
                # step (states created, update transients) is still to come, so wait for it.
                if self.micro_steps == 0:
                    self.recorder.close_window(
                        ("accumulate",)
                    )  # tail ends where micro-step 2 starts
                self.micro_steps += 1
            else:
                self._finish(model)

        return hook

    def _accumulating(self, model: nn.Module) -> bool:
        """True at a forward of the same optimizer step: no step yet, gradients still held."""
        if not self.has_optimizer or self.stepped or self.micro_steps >= MAX_MICRO_STEPS:
            return False
        return any(p.grad is not None for p in model.parameters() if p.requires_grad)

    def _optimizer_hooks(self) -> None:
        # torch.optim's global hooks fire around every optimizer's step(): the profile gets a
        # window of its own for the step (Adam creates its states there, 2 x fp32 per weight).
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        def pre(*_a: Any) -> None:
            if self.recorder is not None and not self.stepped:
                self.recorder.close_window(("optimizer",))

        def post(*_a: Any) -> None:
            if self.recorder is not None and not self.stepped:
                self.stepped = True
                self.recorder.close_window(("after optimizer",))

        self._optim_hooks = [
            register_optimizer_step_pre_hook(pre),
            register_optimizer_step_post_hook(post),
        ]

    def _remove_optim_hooks(self) -> None:
        for h in self._optim_hooks:
            h.remove()
        self._optim_hooks.clear()

    def _start(self, model: nn.Module) -> None:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        tracker = ProfileTracker(device_type=dev.type, use_allocator=dev.type == "cuda")
        rec = ProfileRecorder([n for n, _ in self.blocks], [m for _, m in self.blocks], tracker)
        rec.install()
        gc.collect()
        # Without an optimizer over these weights (a loop that only runs backward), the second
        # forward is the second step; with one, a forward before its step() is a micro-step.
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        self.has_optimizer = any(
            id(p) in trainable
            for o in gc.get_objects()
            if isinstance(o, torch.optim.Optimizer)
            for g in o.param_groups
            for p in g["params"]
        )
        tracker.seed(live_tensors())
        tracker.window_peak = tracker.live_bytes()
        tracker.__enter__()
        self.recorder = rec
        self._optimizer_hooks()

    def _finish(self, model: nn.Module) -> None:
        rec = self.recorder
        if rec is None:
            return
        rec.tracker.__exit__(None, None, None)
        rec.finish()
        rec.remove()
        self._remove_optim_hooks()
        self.recorder = None
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        state = ModelState(model)
        shape = _shape_of(rec.captured.get(0))  # before assemble() clears what was captured
        try:
            first = rec.captured.get(0)
            batch = (
                int(first[0][0].shape[0])
                if first and first[0] and isinstance(first[0][0], torch.Tensor)
                else 0
            )
            prof = assemble(rec, model, available_decisions(dev), self.options, dev, batch)
        finally:
            state.restore()
        try:
            new = auto_plan(prof, self.budget, self.options)
        except BudgetError as e:
            raise BudgetError(f"{e} (measured on the first training step)") from None
        self.result = new
        install(model, new, self.blocks)
        accumulated = (
            f", {self.micro_steps + 1} micro-steps accumulated before the optimizer step"
            if self.micro_steps
            else ""
        )
        warnings.warn(
            f"gradckpt: budget {format_bytes(self.budget)}: profiled the first step (first block "
            f"input {shape}{accumulated}), now using {new.summary()} (predicted peak "
            f"{format_bytes(new.notes['predicted_peak_bytes'])}); the plan fits batches of that "
            "shape: for longer ones, pass example= with the longest batch",
            stacklevel=2,
        )


def _shape_of(captured: Any) -> str:
    if captured and captured[0] and isinstance(captured[0][0], torch.Tensor):
        return "x".join(str(d) for d in captured[0][0].shape)
    return "of unknown shape"
