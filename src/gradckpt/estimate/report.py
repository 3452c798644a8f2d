"""Estimate results as plain data: one ``PolicyEstimate`` per policy inside an ``EstimateReport``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..units import format_bytes

__all__ = ["Alternative", "EstimateReport", "PolicyEstimate", "BREAKDOWN_KEYS"]

#: Breakdown entries, in print order. They add up to ``peak_bytes``.
BREAKDOWN_KEYS = (
    "weights",
    "gradients",
    "optimizer_states",
    "activations",
    "logits_loss",
    "backward_transient",
    "cuda_overhead",
)
BREAKDOWN_HELP = {
    "weights": "parameters and buffers (NF4 codes and constants under QLoRA)",
    "gradients": "gradients alive at the peak (all of them when accumulating)",
    "optimizer_states": "optimizer states of the trainable parameters (steady state)",
    "activations": "tensors kept for backward by the blocks and embeddings, alive at the peak",
    "logits_loss": "logits, their fp32 copy and the loss's saved tensors, alive at the peak",
    "backward_transient": "recomputed activations and gradient temporaries of the block in backward",
    "cuda_overhead": "allowance: CUDA context and workspaces + caching-allocator slack",
}


@dataclass(frozen=True, kw_only=True)
class PolicyEstimate:
    """The predicted cost of one checkpointing policy.

    Attributes:
        policy: the policy name (``"none"``, ``"full"``, ``"every:2"``...).
        plan: one line describing the plan (``"full: 32 recompute"``).
        peak_bytes: predicted peak device memory of a training step, allowance included.
        breakdown: what is alive at that peak, name -> bytes (keys: ``BREAKDOWN_KEYS``);
            the values add up to ``peak_bytes``.
        peak_phase: ``"forward"`` or ``"backward"``: when the peak happens.
        activation_bytes: bytes kept for backward when backward starts (blocks, embeddings,
            logits and loss): the quantity checkpointing reduces.
        step_peak_bytes: peak of the forward+backward alone over the weights, as
            ``gradckpt.measure`` reports it (``peak_bytes - baseline_bytes``): no optimizer
            states, no allowance.
        forward_flops, backward_flops, recompute_flops: FLOPs of one micro-batch.
        recompute_bytes: bytes moved by recomputed ops (pointwise recompute is memory-bound).
        speed_cost: extra step time over the same step without recompute, as a fraction
            (0.25 = 25% slower), from the roofline model on ``speed_gpu``.
        step_time_s: predicted time of one optimizer step on ``speed_gpu`` (seconds).
        tokens_per_s: tokens per second at that step time.
        fits: whether ``peak_bytes`` fits the GPU asked for (None when no GPU was given).
        headroom_bytes: GPU memory minus ``peak_bytes`` (negative: short by that much).
    """

    policy: str
    plan: str
    peak_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    activation_bytes: int
    step_peak_bytes: int
    forward_flops: int
    backward_flops: int
    recompute_flops: int
    recompute_bytes: int
    speed_cost: float
    step_time_s: float
    tokens_per_s: float
    fits: bool | None = None
    headroom_bytes: int | None = None

    def verdict(self, gpu_name: str | None) -> str:
        """``"fits rtx-4090 with 3.10 GiB to spare"`` / ``"does not fit rtx-4090: 5.20 GiB short"``."""
        if self.fits is None or self.headroom_bytes is None:
            return f"needs {format_bytes(self.peak_bytes)}"
        if self.fits:
            return f"fits {gpu_name} with {format_bytes(self.headroom_bytes)} to spare"
        return f"does not fit {gpu_name}: {format_bytes(-self.headroom_bytes)} short"

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "plan": self.plan,
            "peak_bytes": self.peak_bytes,
            "breakdown": dict(self.breakdown),
            "peak_phase": self.peak_phase,
            "activation_bytes": self.activation_bytes,
            "step_peak_bytes": self.step_peak_bytes,
            "forward_flops": self.forward_flops,
            "backward_flops": self.backward_flops,
            "recompute_flops": self.recompute_flops,
            "recompute_bytes": self.recompute_bytes,
            "speed_cost": self.speed_cost,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
        }


@dataclass(frozen=True, kw_only=True)
class Alternative:
    """Another setup that would change the answer (shown when no policy fits the GPU).

    Attributes:
        change: what to change, in words (``"LoRA r=16 instead of a full fine-tune"``).
        settings: the changed ``TrainingSetup`` fields.
        policy: the policy estimated with it (the most memory-frugal one asked for).
        peak_bytes: its predicted peak.
        fits: whether that fits the GPU.
        speed_cost: its speed cost.
    """

    change: str
    settings: dict[str, Any]
    policy: str
    peak_bytes: int
    fits: bool
    speed_cost: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "change": self.change,
            "settings": dict(self.settings),
            "policy": self.policy,
            "peak_bytes": self.peak_bytes,
            "fits": self.fits,
            "speed_cost": self.speed_cost,
        }


@dataclass(frozen=True, kw_only=True)
class EstimateReport:
    """Everything ``gradckpt.estimate`` predicts for one model and training setup.

    Attributes:
        model: the model's name (preset, file path or config type).
        source: where its config values come from.
        params: number of parameters (NF4 weights counted as the values they hold).
        trainable_params: parameters that get gradients.
        layers: number of blocks.
        setup: the training settings (``TrainingSetup.to_dict()``).
        gpu: the GPU checked against (name, memory, throughput) or None.
        speed_gpu: the GPU the speed figures are computed for (``gpu``, or a reference).
        results: one ``PolicyEstimate`` per policy, in the order asked.
        alternatives: when no policy fits the GPU, setups that would (or would come closer).
        notes: how things were modelled (assumptions, extrapolation, allowance).
        elapsed_s: wall time of the estimate.
    """

    model: str
    source: str
    params: int
    trainable_params: int
    layers: int
    setup: dict[str, Any]
    gpu: dict[str, Any] | None
    speed_gpu: str
    results: list[PolicyEstimate]
    alternatives: list[Alternative] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def result(self, policy: str) -> PolicyEstimate:
        """The estimate for ``policy`` (KeyError when it was not asked for)."""
        for r in self.results:
            if r.policy == policy:
                return r
        raise KeyError(f"policy {policy!r} not in this report: {[r.policy for r in self.results]}")

    @property
    def fits_any(self) -> bool | None:
        """Whether some policy fits the GPU (None without a GPU)."""
        if self.gpu is None:
            return None
        return any(r.fits for r in self.results)

    def summary(self) -> dict[str, Any]:
        """The one-glance line: workload | without | with | speed cost.

        "without" is policy ``none`` (or the first policy), "with" the cheapest policy that fits
        the GPU, else the one with the smallest peak.
        """
        base = next((r for r in self.results if r.policy == "none"), self.results[0])
        others = [r for r in self.results if r is not base] or [base]
        fitting = [r for r in others if r.fits]
        chosen = (
            min(fitting, key=lambda r: r.speed_cost)
            if fitting
            else min(others, key=lambda r: r.peak_bytes)
        )
        return {
            "workload": self.workload(),
            "without": base.peak_bytes,
            "without_policy": base.policy,
            "with": chosen.peak_bytes,
            "with_policy": chosen.policy,
            "speed_cost": chosen.speed_cost,
        }

    def workload(self) -> str:
        """Short: ``"mistral-7b full FT b8x2048"``."""
        s = self.setup
        what = {"full": "full FT", "lora": "LoRA", "qlora": "QLoRA"}[s["method"]]
        acc = f"x{s['grad_accum']}" if s["grad_accum"] > 1 else ""
        return f"{self.model} {what} b{s['batch']}{acc}x{s['seq']}"

    def setup_line(self) -> str:
        s = self.setup
        what = {
            "full": "full fine-tune",
            "lora": f"LoRA r={s['lora_rank']}",
            "qlora": f"QLoRA r={s['lora_rank']}",
        }
        acc = f" x{s['grad_accum']} accum" if s["grad_accum"] > 1 else ""
        return f"{what[s['method']]}, {s['precision']}, {s['optimizer']}, batch {s['batch']} x seq {s['seq']}{acc}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source": self.source,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "layers": self.layers,
            "setup": dict(self.setup),
            "gpu": None if self.gpu is None else dict(self.gpu),
            "speed_gpu": self.speed_gpu,
            "results": [r.to_dict() for r in self.results],
            "summary": self.summary(),
            "alternatives": [a.to_dict() for a in self.alternatives],
            "notes": list(self.notes),
            "elapsed_s": self.elapsed_s,
        }
