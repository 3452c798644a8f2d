"""Bytes and counts of a model's own tensors: weights, parameters, gradients, optimizer states."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .timeline import storage_of
from .training import optimizer_state_bytes

__all__ = ["TensorTotals", "replayed_totals", "tensor_totals"]


def _logical_numel(mod: nn.Module, p: torch.Tensor, name: str) -> int:
    from .nf4 import NF4Linear

    if isinstance(mod, NF4Linear) and name == "weight":
        return mod.in_features * mod.out_features
    return p.numel()


@dataclass
class TensorTotals:
    """Bytes and counts of a set of modules' tensors (shared storages counted once)."""

    weight_bytes: int = 0
    params: int = 0
    trainable: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    trainable_tensors: list[torch.Tensor] = field(default_factory=list)

    def __add__(self, o: TensorTotals) -> TensorTotals:
        return TensorTotals(
            self.weight_bytes + o.weight_bytes,
            self.params + o.params,
            self.trainable + o.trainable,
            self.grad_bytes + o.grad_bytes,
            self.optimizer_bytes + o.optimizer_bytes,
        )

    def __sub__(self, o: TensorTotals) -> TensorTotals:
        return TensorTotals(
            self.weight_bytes - o.weight_bytes,
            self.params - o.params,
            self.trainable - o.trainable,
            self.grad_bytes - o.grad_bytes,
            self.optimizer_bytes - o.optimizer_bytes,
        )


def tensor_totals(module: nn.Module, optimizer: str) -> TensorTotals:
    """Weights (parameters + buffers), trainable parameters, gradient and optimizer bytes."""
    seen: set[int] = set()
    tot = TensorTotals()
    trainable: list[torch.Tensor] = []
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            st = storage_of(p)
            key = id(st) if st is not None else id(p)
            if key in seen:
                continue
            seen.add(key)
            tot.weight_bytes += p.numel() * p.element_size()
            n = _logical_numel(mod, p, name)
            tot.params += n
            if p.requires_grad:
                tot.trainable += n
                tot.grad_bytes += p.numel() * p.element_size()
                trainable.append(p)
        for b in mod.buffers(recurse=False):
            st = storage_of(b)
            key = id(st) if st is not None else id(b)
            if key in seen:
                continue
            seen.add(key)
            tot.weight_bytes += b.numel() * b.element_size()
    tot.optimizer_bytes = optimizer_state_bytes(trainable, optimizer)
    tot.trainable_tensors = trainable
    return tot


def replayed_totals(
    whole: TensorTotals, per_block: Sequence[TensorTotals], order: Sequence[int]
) -> TensorTotals:
    """Totals of the full-depth model from a small build's: its tensors outside the blocks, plus
    block ``order[i]`` of the small build for each block ``i`` of the deep one.

    Example:
        >>> replayed_totals(whole, [first, middle, last], [0, 1, 1, 1, 2])  # a 5-block model
    """
    outside = whole - sum(per_block[1:], per_block[0])
    return sum((per_block[k] for k in order[1:]), outside + per_block[order[0]])
