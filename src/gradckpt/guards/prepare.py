"""``prepare_model``: run every guard before a plan is installed; return the function that undoes them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..plans import Plan
from .deepspeed import check_zero3
from .fsdp import check_wrapping
from .hf import HFGuard

__all__ = ["prepare_model"]


def prepare_model(
    model: nn.Module,
    blocks: Sequence[tuple[str, nn.Module]] = (),
    plan: Plan | None = None,
) -> Callable[[], None]:
    """Make ``model`` ready for ``plan`` on ``blocks``; return the function that undoes it.

    Called by ``apply.install`` before any block is touched, so a refusal here leaves the
    model as it was. Three things happen:

    - the order of wrappers is checked (``fsdp.check_wrapping``): a plan whose segments span
      blocks that FSDP2 already sharded one by one is refused with a ``GradCkptError``;
    - a DeepSpeed ZeRO-3 model with frozen parameters on DeepSpeed < 0.19.3 is refused with a
      ``ConfigError`` naming the version that fixes its recompute (``deepspeed.check_zero3``);
    - Hugging Face-style models (any module with a ``gradient_checkpointing`` flag or a
      ``config.use_cache``, found by duck typing so transformers is not imported) get their own
      checkpointing turned off and no KV cache while gradients are recorded (``hf.HFGuard``).
    """
    check_wrapping(model, blocks, plan)
    check_zero3(model)
    guard = HFGuard.install(model, blocks, plan)
    return (lambda: None) if guard is None else guard.remove
