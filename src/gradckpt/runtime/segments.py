"""Segments: several consecutive blocks checkpointed as one region (policy ``sqrt``).

The region opens when the segment's first block starts and closes when its last block
returns; each later block's inputs are recorded with placeholders for the previous block's
output tensors, so the recompute replays the blocks one after another from the first input.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import GradCkptError
from .checkpoint import abort_region, close_region, open_region
from .decisions import refuse_lazy_output, run_checkpointed

__all__ = ["SegmentRun", "closer", "segment_forward"]


class _Ref:
    """Placeholder for a tensor of the previous block's output, found again at recompute time."""

    __slots__ = ("path",)

    def __init__(self, path: tuple[Any, ...]) -> None:
        self.path = path


def _tensor_paths(obj: Any, path: tuple[Any, ...] = ()) -> dict[int, tuple[Any, ...]]:
    if isinstance(obj, torch.Tensor):
        return {id(obj): path}
    out: dict[int, tuple[Any, ...]] = {}
    if isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            out.update(_tensor_paths(v, (*path, i)))
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_tensor_paths(v, (*path, k)))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _substitute(obj: Any, paths: dict[int, tuple[Any, ...]], found: list[int]) -> Any:
    if isinstance(obj, torch.Tensor) and id(obj) in paths:
        found.append(1)
        return _Ref(paths[id(obj)])
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_substitute(v, paths, found) for v in obj)
    if isinstance(obj, list):
        return [_substitute(v, paths, found) for v in obj]
    if type(obj) is dict:
        return {k: _substitute(v, paths, found) for k, v in obj.items()}
    return obj


def _fill(obj: Any, out: Any) -> Any:
    if isinstance(obj, _Ref):
        return _get(out, obj.path)
    if isinstance(obj, tuple):
        return tuple(_fill(v, out) for v in obj)
    if isinstance(obj, list):
        return [_fill(v, out) for v in obj]
    if type(obj) is dict:
        return {k: _fill(v, out) for k, v in obj.items()}
    return obj


@dataclass
class SegmentRun:
    names: list[str]
    forwards: list[Callable[..., Any]]
    stateful: list[nn.Module]
    early_stop: bool = True
    gen: Generator[None, None, None] | None = None
    prev: Any = None
    expect: int = 0
    records: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)

    def abort(self) -> None:
        if self.gen is not None:
            abort_region(self.gen)
        self.gen, self.prev, self.expect = None, None, 0

    def forward(self, j: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fwd = self.forwards[j]
        if j == 0:
            self.abort()  # a region left open by an exception outside the blocks
            if not torch.is_grad_enabled():
                return fwd(*args, **kwargs)
            records: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
            forwards = self.forwards

            def replay(*a: Any, **kw: Any) -> Any:
                out = forwards[0](*a, **kw)
                for k, (ra, rkw) in enumerate(records, start=1):
                    out = forwards[k](*_fill(ra, out), **_fill(rkw, out))
                return out

            self.records = records
            label = f"segment of blocks {self.names[0]!r} to {self.names[-1]!r}"
            self.gen = open_region(
                replay,
                args,
                kwargs,
                stateful=self.stateful,
                name=label,
                early_stop=self.early_stop,
            )
        elif self.gen is None:
            return fwd(*args, **kwargs)
        else:
            if j != self.expect:
                self.abort()
                raise GradCkptError(
                    f"block {self.names[j]!r} ran out of order inside a checkpointed segment "
                    f"(expected {self.names[self.expect]!r}); the sqrt policy needs its blocks "
                    "called one after another: use policy='full' for this model"
                )
            found: list[int] = []
            paths = _tensor_paths(self.prev)
            rec = (_substitute(args, paths, found), _substitute(kwargs, paths, found))
            if not found:
                self.abort()
                raise GradCkptError(
                    f"block {self.names[j]!r} does not take block {self.names[j - 1]!r}'s output "
                    "as input, so they cannot be checkpointed as one segment: use policy='full' "
                    "or 'every:K' for this model"
                )
            self.records.append(rec)
        self.prev = None
        try:
            out = fwd(*args, **kwargs)
            refuse_lazy_output(f"block {self.names[j]!r}", out)
        except BaseException:
            self.abort()
            raise
        if j == len(self.forwards) - 1:
            gen, self.gen = self.gen, None
            if gen is not None:
                close_region(gen)
            self.expect = 0
        else:
            self.prev, self.expect = out, j + 1
        return out


def closer(runs: list[SegmentRun]) -> Callable[..., None]:
    def close_open_segments(_model: nn.Module, _args: Any, _out: Any) -> None:
        for run in runs:
            if run.gen is not None:
                run.abort()

    return close_open_segments


def segment_forward(run: SegmentRun, j: int) -> Callable[..., Any]:
    own_forward = run.forwards[j]  # bound here: indexing by j inside would make dynamo guard on j

    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # A segment's region stays open across blocks, which compiled frames (one per block)
            # cannot share: its recompute would replay eager code against a compiled forward's
            # saved tensors. Under torch.compile each block of a segment is checkpointed alone
            # (the memory of policy 'full', same gradients).
            if not torch.is_grad_enabled():
                return own_forward(*args, **kwargs)
            return run_checkpointed(
                own_forward, args, kwargs, stateful=[], early_stop=run.early_stop
            )
        return run.forward(j, args, kwargs)

    return forward
