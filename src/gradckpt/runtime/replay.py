"""Keep a forward's data-dependent decisions (topk, argmax, sort, nonzero...) and replay them in recompute.

A recompute re-runs the forward's code; where that code decides something from the data (which
experts a mixture-of-experts router picks, which positions ``nonzero`` finds, an ``.item()``
read) the recompute can decide differently: nondeterministic kernels round the router logits
differently, or the decision reads state that changed since forward (DeepSeek-V3-style routing
bias updated in between, a Python-side counter). torch's determinism check compares only the
count, shapes and dtypes of saved tensors, so a token sent to another expert of the same shape
passes it and the gradients are silently wrong. Here the forward keeps the integer outputs of
such ops (and, for ops that return values with their indices, such as ``topk``, the values too)
and the recompute gets exactly those back instead of running the op again.

Cost: only those outputs are kept: for Mixtral's router per block ``tokens x top_k`` int64
indices plus their values, plus the few index tensors of expert dispatch; nothing for a dense
block that makes no such decision (measured in tests/test_replay.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import CheckpointMismatchError

__all__ = [
    "DecisionLog",
    "Kept",
    "decision_contexts",
    "is_data_dependent",
    "pause_recording",
    "recorders",
]

aten = torch.ops.aten


def _ops(*names: str) -> frozenset[Any]:
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


# Ops whose results are decisions made from the data (which expert, which index). Ops tagged
# dynamic_output_shape (nonzero, unique, masked_select) or data_dependent_output (.item()) are
# added by tag.
_DATA_DEPENDENT = _ops(
    "topk",
    "sort",
    "argsort",
    "argmax",
    "argmin",
    "max",
    "min",
    "kthvalue",
    "mode",
    "median",
    "nanmedian",
    "msort",
    "bincount",
    "searchsorted",
    "bucketize",
)

# Ops returning (values, indices) where the values are the input's elements at the indices: the
# values are kept with the indices, so a replayed decision comes with its own values (Mixtral
# weights each chosen expert by topk's values) rather than with values of another choice.
_VALUES_WITH_INDICES = _ops("topk", "sort", "kthvalue", "mode", "median", "nanmedian", "max", "min")


def _tags(func: Any) -> tuple[Any, ...]:
    return tuple(getattr(func, "tags", ()))


_KNOWN: dict[Any, bool] = {}  # per op overload; every op of a checkpointed forward asks


def is_data_dependent(func: Any) -> bool:
    """Whether aten op ``func`` makes a decision from its input's values (kept and replayed)."""
    known = _KNOWN.get(func)
    if known is None:
        tags = _tags(func)
        known = _KNOWN[func] = (
            getattr(func, "overloadpacket", None) in _DATA_DEPENDENT
            or torch.Tag.dynamic_output_shape in tags
            or torch.Tag.data_dependent_output in tags
        )
    return known


def _is_decision(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex())


def _fresh(x: Any) -> Any:
    # A copy each time: the block may modify what it gets back in place, and a second backward
    # (retain_graph) must see the forward's values again.
    return x.clone() if isinstance(x, torch.Tensor) else x


@dataclass
class Kept:
    """The outputs of one data-dependent op call that the recompute gets back (None: recomputed)."""

    func: Any
    leaves: list[Any]
    spec: Any

    @classmethod
    def of(cls, func: Any, out: Any) -> Kept:
        leaves, spec = tree_flatten(out)
        with_values = getattr(func, "overloadpacket", None) in _VALUES_WITH_INDICES and any(
            _is_decision(x) for x in leaves
        )
        kept: list[Any] = []
        for x in leaves:
            if isinstance(x, torch.Tensor) and (with_values or _is_decision(x)):
                kept.append(x.detach().clone())
            elif isinstance(x, (bool, int, float)):
                kept.append(x)  # .item() results
            else:
                kept.append(None)
        return cls(func, kept, spec)

    @property
    def complete(self) -> bool:
        return all(x is not None for x in self.leaves)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.leaves if isinstance(x, torch.Tensor))

    def materialize(self) -> Any:
        return tree_unflatten([_fresh(x) for x in self.leaves], self.spec)

    def substitute(self, out: Any) -> Any:
        leaves, spec = tree_flatten(out)
        if len(leaves) != len(self.leaves):
            return out
        return tree_unflatten(
            [o if k is None else _fresh(k) for o, k in zip(leaves, self.leaves)], spec
        )


class DecisionLog:
    """The decisions one checkpointed call made in forward, in order, and the replay position.

    Args:
        label: how errors name the checkpointed code (``block 'layers.3'``).
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.kept: list[Kept] = []
        self.position = 0

    @property
    def nbytes(self) -> int:
        """Bytes of tensors kept for the recompute."""
        return sum(k.nbytes for k in self.kept)

    def record(self, func: Any, out: Any) -> None:
        self.kept.append(Kept.of(func, out))

    def rewind(self) -> None:
        self.position = 0

    def replay(self, func: Any, call: Callable[[], Any]) -> Any:
        """The result the forward got from this call of ``func`` (``call`` runs it, if needed)."""
        if self.position >= len(self.kept):
            raise self.mismatch("more data-dependent ops (topk, sort, nonzero...) than the forward")
        kept = self.kept[self.position]
        self.position += 1
        if kept.func != func:
            raise self.mismatch(f"{func} where the forward ran {kept.func}")
        if kept.complete:
            return kept.materialize()
        return kept.substitute(call())

    def mismatch(self, what: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"{self.label}: the recompute during backward ran {what}, so the forward's "
            "decisions (which expert, which index) cannot be replayed; the forward is not "
            "deterministic (control flow or sizes that depend on Python-side state or a call "
            "counter): make it deterministic, or keep this block's activations (Decision.SAVE)"
        )


class _RecordDecisions(TorchDispatchMode):
    """Forward: keep the outputs of data-dependent ops (none while ``paused``)."""

    def __init__(self, log: DecisionLog) -> None:
        super().__init__()
        self.log = log
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.paused and is_data_dependent(func):
            self.log.record(func, out)
        return out


def recorders() -> list[TorchDispatchMode]:
    """The decision recorders (forward modes of ``decision_contexts``) active now, bottom first."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return [m for m in _get_current_dispatch_mode_stack() if isinstance(m, _RecordDecisions)]


def pause_recording(modes: list[TorchDispatchMode], paused: bool) -> None:
    """Stop (or restart) ``modes`` keeping decisions, leaving them on the mode stack.

    A checkpointed segment steps aside between its blocks: the model's own code there (LayerDrop's
    ``bool(torch.rand([]) < p)``, an ``.item()``) is not replayed by the recompute, so its
    decisions must not enter the segment's log, or the replay hands them to the next block's
    ops (the same op, ``_local_scalar_dense``: another value, silently).
    """
    for m in modes:
        if isinstance(m, _RecordDecisions):
            m.paused = paused


class _ReplayDecisions(TorchDispatchMode):
    """Recompute: hand back what the forward's data-dependent ops returned."""

    def __init__(self, log: DecisionLog) -> None:
        super().__init__()
        self.log = log

    def __enter__(self) -> Any:
        self.log.rewind()  # every recompute (retain_graph, double backward) starts over
        if not self.log.kept:
            # Nothing to hand back (a dense block): no mode, no per-op cost in the recompute.
            # A recompute that now makes decisions the forward did not is left to torch's check.
            return self
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.log.kept:
            super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kw: Mapping[str, Any] = kwargs or {}
        if is_data_dependent(func):
            return self.log.replay(func, lambda: func(*args, **kw))
        return func(*args, **kw)


def decision_contexts(label: str) -> tuple[TorchDispatchMode, TorchDispatchMode]:
    """A (forward, recompute) pair of modes sharing one ``DecisionLog``; both may be re-entered.

    Example:
        >>> record, replay = decision_contexts("block 'layers.0'")
        >>> torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False,
        ...                                   context_fn=lambda: (record, replay))
    """
    log = DecisionLog(label)
    return _RecordDecisions(log), _ReplayDecisions(log)
