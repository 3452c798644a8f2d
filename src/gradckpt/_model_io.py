"""Calling a model on an example and reading its loss: the one rule shared by plan, verify and bench.

- ``call_model``: a dict is keyword inputs, a tuple or list positional ones, anything else the one input.
- ``default_loss``: ``output.loss`` (attribute or ``"loss"`` key) when the model returns one;
  otherwise the sum of every output tensor that requires grad (tuples, lists, dicts, dataclasses
  and ``ModelOutput`` searched; a KV cache in ``past_key_values`` left out), each summed in
  float32. An output ``(x, y)`` with
  ``x = ones(2)`` and ``y = full((3,), 2.)`` gives 2 + 6 = 8.
- ``ModelState``: gradients, buffers and RNG states, remembered and put back, so profiling or
  verifying a model leaves it as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "ModelState",
    "batch_of",
    "call_model",
    "clone_example",
    "KV_CACHE_FIELDS",
    "default_loss",
    "output_tensors",
]


def call_model(model: nn.Module, example: Any) -> Any:
    """``model(**example)`` for a mapping, ``model(*example)`` for a tuple/list, else ``model(example)``."""
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)


#: Output fields holding a KV cache. gradckpt keeps the cache off while gradients are recorded
#: (``guards.hf``), so a step with a plan returns none; transformers 5 returns it as a ``Cache``
#: object (never searched for tensors here), 4.x (4.46) as tuples of (key, value) tensors.
KV_CACHE_FIELDS = frozenset({"past_key_values"})


def output_tensors(
    obj: Any, path: str = "", *, kv_cache: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside an output (tensors, tuples, lists, dicts, dataclasses, ModelOutput).

    ``kv_cache=False`` leaves out the fields named in ``KV_CACHE_FIELDS``: not a result of the
    step, and absent when gradckpt's plan is on.
    """

    def inner(v: Any, p: str) -> Iterator[tuple[str, torch.Tensor]]:
        return output_tensors(v, p, kv_cache=kv_cache)

    if isinstance(obj, torch.Tensor):
        yield path or "output", obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            if kv_cache or k not in KV_CACHE_FIELDS:
                yield from inner(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from inner(v, f"{path}[{i}]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if kv_cache or f.name not in KV_CACHE_FIELDS:
                yield from inner(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)


def default_loss(out: Any) -> torch.Tensor:
    """The loss of a model output when the caller gives no ``loss_fn`` (see the module docstring).

    Raises:
        ConfigError: the output has no loss and no tensor that requires grad.
    """
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    parts = [t.float().sum() for _, t in output_tensors(out, kv_cache=False) if t.requires_grad]
    if not parts:
        raise ConfigError(
            "the model's output has no loss and no tensor that requires grad: pass loss_fn= "
            "(output -> scalar tensor) or an example that makes the model return a loss"
        )
    return torch.stack(parts).sum()


def batch_of(example: Any) -> int:
    """The batch size of an example: dim 0 of its first tensor with at least one dim (0 if none)."""
    values = (
        example.values()
        if isinstance(example, Mapping)
        else example
        if isinstance(example, (tuple, list))
        else [example]
    )
    for t in values:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return 0


def clone_example(example: Any) -> Any:
    """A fresh copy of the example's tensors, so that runs on it cannot affect each other."""
    if isinstance(example, torch.Tensor):
        y = example.detach().clone()
        return y.requires_grad_(example.requires_grad) if y.is_floating_point() else y
    if isinstance(example, Mapping):
        return {k: clone_example(v) for k, v in example.items()}
    if isinstance(example, tuple):
        return tuple(clone_example(v) for v in example)
    if isinstance(example, list):
        return [clone_example(v) for v in example]
    return example


class ModelState:
    """A model's gradients and buffers and the RNG states at one moment; ``restore`` puts them back.

    Example:
        >>> state = ModelState(model)
        >>> model(**batch).loss.backward()   # profile, verify...
        >>> state.restore()                  # grads, buffers and RNG as they were
    """

    def __init__(self, model: nn.Module) -> None:
        self.grads = {p: p.grad for p in model.parameters()}
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for b, v in self.buffers:
                b.copy_(v)

    def restore(self) -> None:
        for p, g in self.grads.items():
            p.grad = g
        self.restore_buffers()
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
