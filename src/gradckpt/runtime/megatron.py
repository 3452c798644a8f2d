"""The ``megatron`` preset of SELECTIVE: keep everything a block keeps, recompute only its attention core.

What Megatron-LM's ``--recompute-granularity selective`` does by default: each
``scaled_dot_product_attention`` call is checkpointed on its own (its q, k, v inputs kept, its
output and softmax statistics recomputed), the rest of the block saves as without checkpointing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .checkpoint import checkpoint

__all__ = ["attention_recomputed"]

_SDPA = F.scaled_dot_product_attention
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


class _AttentionCore(TorchFunctionMode):
    """Checkpoint every ``scaled_dot_product_attention`` call made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA and torch.is_grad_enabled():
            self.calls += 1
            # Its inputs (q, k, v, mask) are kept, as without checkpointing; its output and
            # log-sum-exp (or, on the math path, the seq x seq scores) are recomputed.
            return checkpoint(func, *args, **kwargs)
        return func(*args, **kwargs)


def attention_recomputed(name: str, forward: Callable[..., Any]) -> Callable[..., Any]:
    """Block ``name``'s forward with only its attention core checkpointed (preset megatron)."""

    def attention_recomputed_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        mode = _AttentionCore()
        with mode:
            out = forward(*args, **kwargs)
        if mode.calls == 0:
            _warn_once(
                f"megatron:{name}",
                f"gradckpt: block {name!r} calls no scaled_dot_product_attention, so the "
                "megatron preset recomputes nothing there (same as Decision.SAVE); use "
                "attn_implementation='sdpa' or the default selective preset",
            )
        return out

    return attention_recomputed_forward
