"""The planner's data: per-block costs of each decision and the step's plan-independent memory terms.

Plain data only (ints and strings), so the solver and the peak model are pure functions that are
tested without torch models. ``profile.py`` fills these from a measured step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PlanError
from ..plans import Decision

__all__ = ["BlockOption", "StepProfile", "predict_cost", "predict_peak"]


@dataclass(frozen=True, slots=True)
class BlockOption:
    """What one decision costs for one block.

    Attributes:
        kept: device bytes the block adds to live memory in forward and holds until its backward
            (its output included).
        fwd_extra: device bytes above the block's start level at the peak of its forward.
        bwd_extra: device bytes above the level at the start of the block's backward, at the peak of
            its backward (recompute, gradient temporaries and its parameter gradients).
        cost: predicted extra time of the decision, in nanoseconds (recompute, transfers).
        host: host bytes held for backward (offload).
        recompute_flops: FLOPs re-run in backward.
        recompute_bytes: bytes read and written by re-run ops.
    """

    kept: int
    fwd_extra: int
    bwd_extra: int
    cost: int = 0
    host: int = 0
    recompute_flops: int = 0
    recompute_bytes: int = 0


@dataclass(frozen=True)
class StepProfile:
    """A training step decomposed so that its peak can be predicted for any per-block plan.

    With ``K(<i)`` the sum of ``kept`` of blocks before ``i`` under the plan, the peak is the
    largest of: ``pre_peak`` (before the first block), ``fwd_base[i] + K(<i) + fwd_extra_i``,
    ``head_base + K(all)`` (after the last block: logits, loss and their backward),
    ``bwd_base[i] + K(<=i) + bwd_extra_i`` (block ``i``'s backward) and ``tail_peak`` (after the
    blocks' backward: embeddings, optimizer step). The bases are what is live that does not depend
    on the plan (weights, inputs, gradients accumulated so far, activations outside blocks).

    Attributes:
        blocks: block names, in execution order.
        options: per block, the cost of each available decision.
        fwd_base, bwd_base: per block, plan-independent live bytes (see above).
        pre_peak, head_base, tail_peak: see above.
        batch: the micro-batch size profiled (for scaling hints in errors).
        fixed_bytes: bytes that do not scale with the batch (weights, gradients, states).
        flops_per_s, bytes_per_s: the device model used for ``cost``.
        device: where it was profiled.
    """

    blocks: tuple[str, ...]
    options: tuple[Mapping[Decision, BlockOption], ...]
    fwd_base: tuple[int, ...]
    bwd_base: tuple[int, ...]
    pre_peak: int
    head_base: int
    tail_peak: int
    batch: int = 0
    fixed_bytes: int = 0
    flops_per_s: float = 0.0
    bytes_per_s: float = 0.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        n = len(self.blocks)
        if not (len(self.options) == len(self.fwd_base) == len(self.bwd_base) == n):
            raise PlanError("profile: blocks, options, fwd_base and bwd_base differ in length")
        for i, opts in enumerate(self.options):
            if not opts:
                raise PlanError(f"profile: block {self.blocks[i]!r} has no decision to choose from")

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": list(self.blocks),
            "options": [{d.value: vars_of(o) for d, o in opts.items()} for opts in self.options],
            "fwd_base": list(self.fwd_base),
            "bwd_base": list(self.bwd_base),
            "pre_peak": self.pre_peak,
            "head_base": self.head_base,
            "tail_peak": self.tail_peak,
            "batch": self.batch,
            "fixed_bytes": self.fixed_bytes,
            "flops_per_s": self.flops_per_s,
            "bytes_per_s": self.bytes_per_s,
            "device": self.device,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepProfile:
        return cls(
            blocks=tuple(data["blocks"]),
            options=tuple(
                {Decision(k): BlockOption(**v) for k, v in opts.items()} for opts in data["options"]
            ),
            fwd_base=tuple(data["fwd_base"]),
            bwd_base=tuple(data["bwd_base"]),
            pre_peak=data["pre_peak"],
            head_base=data["head_base"],
            tail_peak=data["tail_peak"],
            batch=data.get("batch", 0),
            fixed_bytes=data.get("fixed_bytes", 0),
            flops_per_s=data.get("flops_per_s", 0.0),
            bytes_per_s=data.get("bytes_per_s", 0.0),
            device=data.get("device", "cpu"),
        )


def vars_of(o: BlockOption) -> dict[str, int]:
    return {k: getattr(o, k) for k in BlockOption.__slots__}


def _option(profile: StepProfile, i: int, d: Decision) -> BlockOption:
    opt = profile.options[i].get(d)
    if opt is None:
        raise PlanError(f"profile has no {d.value!r} option for block {profile.blocks[i]!r}")
    return opt


def predict_peak(profile: StepProfile, decisions: Sequence[Decision]) -> int:
    """Predicted peak device bytes of a step under per-block ``decisions`` (see StepProfile)."""
    if len(decisions) != len(profile.blocks):
        raise PlanError(f"{len(decisions)} decisions for {len(profile.blocks)} blocks")
    opts = [_option(profile, i, d) for i, d in enumerate(decisions)]
    peak = max(profile.pre_peak, profile.tail_peak)
    cum = 0
    for i, o in enumerate(opts):
        peak = max(peak, profile.fwd_base[i] + cum + o.fwd_extra)
        cum += o.kept
        peak = max(peak, profile.bwd_base[i] + cum + o.bwd_extra)
    return max(peak, profile.head_base + cum)


def predict_cost(profile: StepProfile, decisions: Sequence[Decision]) -> int:
    """Predicted extra step time in nanoseconds (sum of the chosen options' costs)."""
    return sum(_option(profile, i, d).cost for i, d in enumerate(decisions))
