"""Results as plain data: ``PolicyEstimate`` per policy in an ``EstimateReport``; a sweep's ``SweepReport``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError
from ..units import format_bytes

__all__ = [
    "BREAKDOWN",
    "BREAKDOWN_HELP",
    "BREAKDOWN_KEYS",
    "Alternative",
    "EstimateReport",
    "GpuOption",
    "LargestFit",
    "PolicyEstimate",
    "SweepPoint",
    "SweepReport",
    "setup_words",
]

#: What is alive at the peak, in print order: key -> (table label, what it counts). The
#: entries add up to ``peak_bytes``.
BREAKDOWN: dict[str, tuple[str, str]] = {
    "weights": ("weights", "parameters and buffers (NF4 codes and constants under QLoRA)"),
    "gradients": ("gradients", "gradients alive at the peak (all of them when accumulating)"),
    "optimizer_states": (
        "optimizer states",
        "optimizer states of the trainable parameters (steady state)",
    ),
    "activations": (
        "activations kept",
        "tensors kept for backward by the blocks and embeddings, alive at the peak",
    ),
    "logits_loss": (
        "logits & loss",
        "logits, their fp32 copy and the loss's saved tensors, alive at the peak",
    ),
    "backward_transient": (
        "backward transient",
        "recomputed activations and gradient temporaries of the block in backward",
    ),
    "shard_buffers": (
        "shard buffers",
        "data parallel: parameters all-gathered (one block + one prefetched, FSDP2's root), "
        "gradients before reduce-scatter, DDP's gradient buckets (0 on one unsharded GPU)",
    ),
    "cuda_overhead": (
        "CUDA overhead",
        "allowance: CUDA context and workspaces + caching-allocator slack",
    ),
}
#: The breakdown's keys, in print order.
BREAKDOWN_KEYS = tuple(BREAKDOWN)
#: key -> what it counts.
BREAKDOWN_HELP = {key: help for key, (_label, help) in BREAKDOWN.items()}


def setup_words(setup: Mapping[str, Any], *, shape: bool = True) -> str:
    """A setup (``TrainingSetup.to_dict()``) in words, for headers and titles.

    Example:
        >>> setup_words(TrainingSetup(batch=4).to_dict())
        'full fine-tune, bf16, adamw, batch 4 x seq 2048, sdpa attention'
        >>> setup_words(TrainingSetup(method="lora", grad_accum=2).to_dict(), shape=False)
        'LoRA r=16, bf16, adamw, sdpa attention, x2 accum'
    """
    what = {
        "full": "full fine-tune",
        "lora": f"LoRA r={setup['lora_rank']}",
        "qlora": f"QLoRA r={setup['lora_rank']}",
    }[setup["method"]]
    accum = f"x{setup['grad_accum']} accum" if setup["grad_accum"] > 1 else ""
    parts = [what, setup["precision"], setup["optimizer"]]
    if shape:  # batch and sequence, with the accumulation
        parts.append(
            f"batch {setup['batch']} x seq {setup['seq']}" + (f" {accum}" if accum else "")
        )
    parts.append(f"{setup['attention']} attention")
    if setup.get("image_size"):  # a VLM's images, per sequence
        h, w = setup["image_size"]
        n = setup.get("images", 1)
        parts.append(f"{n} image{'s' if n > 1 else ''} of {h}x{w} per sequence")
    if "gpus" in setup:  # a sharded estimate: every figure is per GPU
        parts.append(f"per GPU of {setup['gpus']} ({setup['shard']})")
    if accum and not shape:
        parts.append(accum)
    return ", ".join(parts)


@dataclass(frozen=True, kw_only=True)
class PolicyEstimate:
    """The predicted cost of one checkpointing policy.

    Attributes:
        policy: the policy name (``"none"``, ``"full"``, ``"every:2"``...).
        plan: one line describing the plan (``"full: 32 recompute"``).
        peak_bytes: predicted peak device memory of a training step, allowance included.
        reserved_bytes: what PyTorch's CUDA caching allocator holds at the end of a step
            (``torch.cuda.memory_reserved``: the live tensors at the peak plus its block
            rounding and cached free blocks, from a replay of the step's allocations through
            a model of the allocator; no CUDA context).
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
        host_bytes: most host memory the step's offloaded tensors take (0 without offload).
        offload_s: seconds of the step spent waiting for offload copies over the host link
            (the part compute does not hide; in ``step_time_s`` and ``speed_cost``).
        host_fits: whether ``host_bytes`` fits the host budget (None: no budget given);
            False makes ``fits`` False.
    """

    policy: str
    plan: str
    peak_bytes: int
    reserved_bytes: int
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
    host_bytes: int = 0
    offload_s: float = 0.0
    host_fits: bool | None = None

    def verdict(self, gpu_name: str | None) -> str:
        """``"fits rtx-4090 with 3.10 GiB to spare"`` / ``"does not fit rtx-4090: 5.20 GiB short"``."""
        if self.host_fits is False:
            return (
                f"does not fit: host memory would run out (offload needs "
                f"{format_bytes(self.host_bytes)} of host RAM, more than host_budget)"
            )
        if self.fits is None or self.headroom_bytes is None:
            return f"needs {format_bytes(self.peak_bytes)}"
        if self.fits:
            return f"fits {gpu_name} with {format_bytes(self.headroom_bytes)} to spare"
        return f"does not fit {gpu_name}: {format_bytes(-self.headroom_bytes)} short"

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready data."""
        return asdict(self)


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
        """The fields as JSON-ready data."""
        return asdict(self)


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
        """The setup in words: ``"full fine-tune, bf16, adamw, batch 4 x seq 2048, sdpa attention"``."""
        return setup_words(self.setup)

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


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    """Every policy's estimate at one (batch, sequence length).

    Attributes:
        batch: micro-batch size.
        seq: sequence length in tokens.
        tokens_per_step: batch x seq x gradient accumulation.
        results: one ``PolicyEstimate`` per policy (speed and ``fits`` for
            ``SweepReport.speed_gpu``, or for the first GPU asked when none has throughput figures).
        fits: policy -> GPU name -> whether the peak fits that GPU's memory.
    """

    batch: int
    seq: int
    tokens_per_step: int
    results: list[PolicyEstimate]
    fits: dict[str, dict[str, bool]] = field(default_factory=dict)

    def result(self, policy: str) -> PolicyEstimate:
        """The estimate for ``policy`` at this point (KeyError when it was not estimated)."""
        for r in self.results:
            if r.policy == policy:
                return r
        raise KeyError(f"policy {policy!r} not estimated at batch {self.batch} x seq {self.seq}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "seq": self.seq,
            "tokens_per_step": self.tokens_per_step,
            "results": [
                {**r.to_dict(), "fits_gpus": dict(self.fits.get(r.policy, {}))}
                for r in self.results
            ],
        }


@dataclass(frozen=True, kw_only=True)
class LargestFit:
    """The largest micro-batch (or sequence length) one policy fits on one GPU.

    Attributes:
        policy: the policy.
        gpu: the GPU's name.
        vary: ``"batch"`` or ``"seq"``: what was searched (the other stays as given).
        batch, seq: the setting found (``vary`` at its largest fitting value); when nothing fits,
            the smallest value tried (batch 1, or ``SEQ_STEP`` tokens).
        found: whether any value fits.
        peak_bytes: predicted peak at that setting.
        headroom_bytes: GPU memory minus that peak.
        next_peak_bytes: predicted peak one step further (batch + 1, or seq + ``seq_step``),
            which does not fit; None when the search stopped at ``limited_by``.
        limited_by: None when memory is the limit; else what stopped the search
            (``"max_position_embeddings"`` or ``"search limit"``).
        tokens_per_step: batch x seq x gradient accumulation at that setting.
        step_time_s: predicted time of one optimizer step on the GPU (None without throughput figures).
        tokens_per_s: predicted tokens per second (None without throughput figures).
        speed_cost: the policy's recompute time over the step without it (fraction).
        batch1_tokens_per_s: for a batch search, the same policy's tokens/s at batch 1 (what
            the larger batch is compared with); None for a sequence search.
        price_per_hour: the hourly price given for the GPU, if any.
        cost_per_mtok: price per million tokens at that throughput, if a price was given.
        probes: settings estimated by the search.
    """

    policy: str
    gpu: str
    vary: str
    batch: int
    seq: int
    found: bool
    peak_bytes: int
    headroom_bytes: int
    next_peak_bytes: int | None
    limited_by: str | None
    tokens_per_step: int
    step_time_s: float | None
    tokens_per_s: float | None
    speed_cost: float
    batch1_tokens_per_s: float | None = None
    price_per_hour: float | None = None
    cost_per_mtok: float | None = None
    probes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class GpuOption:
    """One policy on one GPU at a fixed setup: does it fit, how fast, at what cost.

    Attributes:
        gpu: the GPU's name.
        memory_bytes: its memory.
        policy: the policy.
        batch, seq: the setup.
        fits: whether the peak fits.
        peak_bytes, headroom_bytes: the peak and the memory left (negative: short).
        step_time_s, tokens_per_s: predicted on this GPU (None for a bare size without throughput).
        speed_cost: recompute time over the step without it (fraction).
        price_per_hour, cost_per_mtok: the price given and the cost per million tokens (only
            when it fits and a price was given).
    """

    gpu: str
    memory_bytes: int
    policy: str
    batch: int
    seq: int
    fits: bool
    peak_bytes: int
    headroom_bytes: int
    step_time_s: float | None
    tokens_per_s: float | None
    speed_cost: float
    price_per_hour: float | None = None
    cost_per_mtok: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class SweepReport:
    """What ``sweep`` found: the grid, the largest settings that fit, the GPU comparison.

    Attributes:
        model: the model's name.
        setup: the training settings besides batch and sequence (``TrainingSetup.to_dict()``
            at the first grid point).
        policies: the policies compared.
        gpus: the GPUs asked for (name, memory, throughput, price per hour or None); the
            GPU table may cover more (every preset when none was asked).
        speed_gpu: the GPU the grid's speed figures are for (the first GPU asked with throughput
            figures, else the estimator's reference).
        points: one ``SweepPoint`` per (batch, seq), batch-major, in increasing order.
        prices: the hourly prices given, by GPU preset name.
        largest: ``LargestFit`` per (searched dimension, GPU, grid value, policy), if asked.
        gpu_table: ``GpuOption`` per (grid point, GPU, policy), if asked.
        notes: how the numbers were made.
        elapsed_s: wall time.
    """

    model: str
    setup: dict[str, Any]
    policies: list[str]
    gpus: list[dict[str, Any]]
    speed_gpu: str
    points: list[SweepPoint]
    prices: dict[str, float] = field(default_factory=dict)
    largest: list[LargestFit] = field(default_factory=list)
    gpu_table: list[GpuOption] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def seqs(self) -> list[int]:
        return sorted({p.seq for p in self.points})

    @property
    def batches(self) -> list[int]:
        return sorted({p.batch for p in self.points})

    def series(
        self, policy: str, *, batch: int | None = None, seq: int | None = None
    ) -> list[tuple[int, int]]:
        """``[(x, peak_bytes), ...]`` for one policy along sequence length (``batch`` fixed) or
        along batch (``seq`` fixed).

        Example:
            >>> report.series("full", batch=1)   # [(512, ...), (1024, ...), ...]
        """
        if (batch is None) == (seq is None):
            raise ConfigError("series: fix exactly one of batch= or seq=")
        out = []
        for p in self.points:
            r = next((r for r in p.results if r.policy == policy), None)
            if r is None:  # 'auto' without a plan there
                continue
            if batch is not None and p.batch == batch:
                out.append((p.seq, r.peak_bytes))
            elif seq is not None and p.seq == seq:
                out.append((p.batch, r.peak_bytes))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "setup": dict(self.setup),
            "policies": list(self.policies),
            "gpus": [dict(g) for g in self.gpus],
            "speed_gpu": self.speed_gpu,
            "prices": dict(self.prices),
            "points": [p.to_dict() for p in self.points],
            "largest": [f.to_dict() for f in self.largest],
            "gpu_table": [g.to_dict() for g in self.gpu_table],
            "notes": list(self.notes),
            "elapsed_s": self.elapsed_s,
        }
