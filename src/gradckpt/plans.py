"""A Plan: plain data, one decision per block, that apply() installs and JSON round-trips."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import PlanError

__all__ = ["Decision", "Plan"]

_VERSION = 1


class Decision(str, enum.Enum):
    """What happens to one block's activations between forward and backward."""

    SAVE = "save"
    """No checkpoint: every tensor the block's backward needs is kept (fastest, most memory)."""
    RECOMPUTE = "recompute"
    """Checkpoint the whole block: keep its input, recompute the rest during backward."""
    SELECTIVE = "selective"
    """Checkpoint, but keep the outputs of expensive ops (matmuls, attention); recompute the cheap ones."""
    OFFLOAD = "offload"
    """Checkpoint, and keep the block's input in host memory (same as RECOMPUTE on a CPU-only run)."""


def _index(x: Any) -> int:
    # int("3") or int(2.7) would quietly accept a malformed plan.
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"not an integer: {x!r}")
    return x


@dataclass(frozen=True)
class Plan:
    """One decision per block, plus the segments that are checkpointed as one unit.

    Attributes:
        blocks: qualified module names of the blocks, in execution order.
        decisions: one ``Decision`` per block.
        segments: ``(start, stop)`` index ranges of consecutive blocks (stop exclusive, at least
            two blocks) that are checkpointed as one unit: only the first block's input is kept.
            Every block of a segment must be ``RECOMPUTE``.
        policy: the name this plan was made from (``"full"``, ``"every:2"``, ``"auto"``...).
        options: policy options (e.g. ``save_ops`` of ``selective``), JSON-serialisable.
        notes: free-form predictions or provenance (e.g. the planner's predicted peak), JSON-serialisable.
    """

    blocks: tuple[str, ...]
    decisions: tuple[Decision, ...]
    segments: tuple[tuple[int, int], ...] = ()
    policy: str = "custom"
    options: Mapping[str, Any] = field(default_factory=dict)
    notes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.blocks, str) or not isinstance(self.blocks, Iterable):
            raise PlanError(f"blocks must be a sequence of block names, got {self.blocks!r}")
        blocks = tuple(self.blocks)
        if not all(isinstance(b, str) and b for b in blocks):
            raise PlanError("every block name must be a non-empty str")
        if isinstance(self.decisions, str) or not isinstance(self.decisions, Iterable):
            raise PlanError(f"decisions must be a sequence of Decision, got {self.decisions!r}")
        try:
            decisions = tuple(Decision(d) for d in self.decisions)
        except ValueError as e:
            valid = ", ".join(d.value for d in Decision)
            raise PlanError(f"{e}; a decision is one of: {valid}") from None
        for what in ("options", "notes"):
            if not isinstance(getattr(self, what), Mapping):
                raise PlanError(
                    f"{what} must be a mapping (a JSON object), got {getattr(self, what)!r}"
                )
        if not isinstance(self.policy, str):
            raise PlanError(f"policy must be a str, got {type(self.policy).__name__}")
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "decisions", decisions)
        if len(blocks) != len(decisions):
            raise PlanError(f"plan has {len(blocks)} blocks but {len(decisions)} decisions")
        if len(set(blocks)) != len(blocks):
            raise PlanError("plan names a block twice")
        try:
            segs = tuple((_index(a), _index(b)) for a, b in self.segments)
        except (TypeError, ValueError):
            raise PlanError(
                f"segments must be (start, stop) pairs of block indices, got {self.segments!r}"
            ) from None
        object.__setattr__(self, "segments", segs)
        last = 0
        for a, b in sorted(segs):
            if not (0 <= a < b <= len(blocks)) or b - a < 2 or a < last:
                raise PlanError(
                    f"segment {(a, b)} is not a range of >= 2 blocks within 0..{len(blocks)} "
                    "that does not overlap another"
                )
            if any(decisions[i] is not Decision.RECOMPUTE for i in range(a, b)):
                raise PlanError(f"segment {(a, b)} holds blocks that are not RECOMPUTE")
            last = b
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "notes", dict(self.notes))

    # -- queries -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.blocks)

    def decision(self, block: str) -> Decision:
        """The decision for the block named ``block``."""
        try:
            return self.decisions[self.blocks.index(block)]
        except ValueError:
            raise PlanError(f"block {block!r} is not in this plan") from None

    def counts(self) -> dict[Decision, int]:
        """Number of blocks per decision."""
        out = {d: 0 for d in Decision}
        for d in self.decisions:
            out[d] += 1
        return out

    def summary(self) -> str:
        """One line: ``"full: 8 recompute"`` or ``"auto: 3 save, 5 selective"``."""
        parts = [f"{n} {d.value}" for d, n in self.counts().items() if n]
        if self.segments:
            parts.append(f"in {len(self.segments)} segments")
        if self.options.get("tile_tokens"):
            parts.append(f"tiles of {self.options['tile_tokens']} tokens")
        if self.options.get("loss_head"):
            parts.append(f"{self.options['loss_head']} loss head")
        return f"{self.policy}: " + (", ".join(parts) if parts else "no blocks")

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "policy": self.policy,
            "blocks": [
                {"name": b, "decision": d.value} for b, d in zip(self.blocks, self.decisions)
            ],
            "segments": [list(s) for s in self.segments],
            "options": dict(self.options),
            "notes": dict(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan is a JSON object, got {type(data).__name__}")
        version = data.get("version", _VERSION)
        if version != _VERSION:
            raise PlanError(
                f"plan version {version!r} is not supported (this gradckpt reads {_VERSION})"
            )
        entries = data.get("blocks")
        if not isinstance(entries, Sequence) or isinstance(entries, str):
            raise PlanError("a plan needs a 'blocks' list of {'name': ..., 'decision': ...}")
        try:
            names = [str(e["name"]) for e in entries]
            decisions = [Decision(e["decision"]) for e in entries]
            segments = tuple((int(a), int(b)) for a, b in data.get("segments", ()))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed plan entry: {e}") from None
        return cls(
            blocks=tuple(names),
            decisions=tuple(decisions),
            segments=segments,
            policy=str(data.get("policy", "custom")),
            options=data.get("options", {}),
            notes=data.get("notes", {}),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        except (TypeError, UnicodeDecodeError) as e:
            raise PlanError(f"plan JSON must be text: {e}") from None
        return cls.from_dict(data)

    # -- printing ------------------------------------------------------------------------
    def segment_of(self, index: int) -> tuple[int, int] | None:
        for a, b in self.segments:
            if a <= index < b:
                return (a, b)
        return None

    def table(self) -> str:
        """A fixed-width table, one row per block."""
        w = max([5, *(len(b) for b in self.blocks)])
        rows = [f"{'block':<{w}}  decision   segment", f"{'-' * w}  ---------  -------"]
        for i, (b, d) in enumerate(zip(self.blocks, self.decisions)):
            seg = self.segment_of(i)
            rows.append(
                f"{b:<{w}}  {d.value:<9}  {'' if seg is None else f'{seg[0]}-{seg[1] - 1}'}"
            )
        rows.append(self.summary())
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()
