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
from ..plan import Plan
from ..units import format_bytes
from .profile import ProfileRecorder, ProfileTracker, assemble, available_decisions
from .solve import auto_plan

__all__ = ["LazyBudget"]


class LazyBudget:
    """Profiles the first training step (forward, backward, optimizer) and re-plans at the second."""

    def __init__(self, budget: int, blocks: list[tuple[str, nn.Module]], options: dict[str, Any]):
        self.budget = budget
        self.blocks = blocks
        self.options = options
        self.recorder: ProfileRecorder | None = None
        self.result: Plan | None = None

    def install(self, model: nn.Module) -> Callable[[], None]:
        handle = model.register_forward_pre_hook(self._pre(model), with_kwargs=True)

        def remove() -> None:
            handle.remove()
            self._abort()

        return remove

    def _abort(self) -> None:
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
            else:
                self._finish(model)

        return hook

    def _start(self, model: nn.Module) -> None:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        tracker = ProfileTracker(device_type=dev.type, use_allocator=dev.type == "cuda")
        rec = ProfileRecorder([n for n, _ in self.blocks], [m for _, m in self.blocks], tracker)
        rec.install()
        gc.collect()
        tracker.seed(live_tensors())
        tracker.window_peak = tracker.live_bytes()
        tracker.__enter__()
        self.recorder = rec

    def _finish(self, model: nn.Module) -> None:
        rec = self.recorder
        if rec is None:
            return
        rec.tracker.__exit__(None, None, None)
        rec.finish()
        rec.remove()
        self.recorder = None
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        state = ModelState(model)
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
        warnings.warn(
            f"gradckpt: budget {format_bytes(self.budget)}: profiled the first step, now using "
            f"{new.summary()} (predicted peak {format_bytes(new.notes['predicted_peak_bytes'])})",
            stacklevel=2,
        )
