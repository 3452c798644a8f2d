"""FLOPs of aten ops: torch's FlopCounterMode formulas, plus the CPU flash-attention kernels it misses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["count_flops"]

aten = torch.ops.aten


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
