"""What one replayed step costs: the bytes alive at its peak plus the CUDA allowance, and its time.

Pure arithmetic over a ``ReplayedStep`` (``timeline``), the model's ``TensorTotals`` and a
``GPU``: no model, no fake tensors.
"""

from __future__ import annotations

from collections import Counter

from ..plans import Decision, Plan
from ..units import format_bytes
from .allocator import StepAllocation
from .gpus import GPU, MATH_EFFICIENCY, MEMORY_EFFICIENCY
from .offload_cost import offload_cost
from .report import PolicyEstimate
from .timeline import ACT, BWD, GRAD, HEAD, ReplayedStep
from .totals import TensorTotals
from .training import TrainingSetup

__all__ = ["ALLOCATOR_SLACK", "CUDA_CONTEXT_BYTES", "policy_estimate", "static_notes"]

#: CUDA context, cuBLAS/cuDNN workspaces and the kernels torch loads: ~0.3-0.6 GiB with lazy
#: module loading (CUDA >= 11.7) on Ampere/Hopper; 0.5 GiB is the allowance.
CUDA_CONTEXT_BYTES = 512 * 1024**2
#: Caching-allocator slack on top of live tensors at the peak (block rounding, fragmentation)
#: where no allocation replay is at hand (the estimate replays one, see ``allocator``; the
#: planner's budget keeps this flat figure): reserved/allocated ratios of 1.03-1.10 are
#: typical for transformer training.
ALLOCATOR_SLACK = 0.05


def _phase_seconds(costs: Counter[tuple[str, int, int]], gpu: GPU) -> dict[str, float]:
    out = {"forward": 0.0, "backward": 0.0, "recompute": 0.0}
    for (phase, flops, nbytes), n in costs.items():
        out[phase] += n * gpu.op_seconds(flops, nbytes)
    return out


def _optimizer_step_bytes(totals: TensorTotals) -> int:
    """Bytes a fused optimizer step moves: read+write params and states, read gradients."""
    return 2 * totals.grad_bytes + totals.grad_bytes + 2 * totals.optimizer_bytes


def policy_estimate(
    policy: str,
    plan: Plan,
    prof: ReplayedStep,
    tot: TensorTotals,
    st: TrainingSetup,
    the_gpu: GPU | None,
    speed_gpu: GPU,
    fixed_overhead: int | None,
    held: StepAllocation | None = None,
    host_budget: int | None = None,
) -> PolicyEstimate:
    """One policy's ``PolicyEstimate`` from its replayed step and the model's tensor totals.

    The breakdown is what is alive at the step's peak (``prof.peak_parts``) plus the tensors
    that live all step (weights, optimizer states; all gradients when accumulating), plus the
    CUDA allowance; times are the roofline of every op on ``speed_gpu``, plus the offload
    copies that compute does not hide (``offload_cost``). ``host_budget``: host memory the
    offloaded tensors may take (None: not checked); over it, the plan does not fit.
    """
    parts = prof.peak_parts
    accum_grads = tot.grad_bytes if st.grad_accum > 1 else 0
    breakdown = {
        "weights": tot.weight_bytes,
        "gradients": parts[GRAD] + accum_grads,
        "optimizer_states": tot.optimizer_bytes,
        "activations": parts[ACT],
        "logits_loss": parts[HEAD],
        "backward_transient": parts[BWD],
        "shard_buffers": 0,  # data-parallel buffers: estimate.sharding adds them
    }
    tensors = sum(breakdown.values())
    # What the caching allocator holds beyond the live tensors, from the replay of the step's
    # allocations through its model (``allocator``), else the flat allowance: the peak counts
    # the segments that hold a live block (a card short of memory gets the wholly free ones
    # back before an OOM), ``reserved`` everything it keeps when memory is plentiful.
    slack = int(ALLOCATOR_SLACK * tensors)
    reserved = tensors + slack
    if held is not None:
        slack = max(0, held.peak_held_bytes - tensors)
        reserved = max(tensors, held.reserved_bytes)
    overhead = CUDA_CONTEXT_BYTES + slack if fixed_overhead is None else fixed_overhead
    breakdown["cuda_overhead"] = overhead
    peak = tensors + overhead

    secs = _phase_seconds(prof.costs, speed_gpu)
    opt_s = speed_gpu.op_seconds(0, _optimizer_step_bytes(tot))
    base_s = st.grad_accum * (secs["forward"] + secs["backward"]) + opt_s
    link = offload_cost(
        prof.host_peak,
        sum(d is Decision.OFFLOAD for d in plan.decisions),
        secs["forward"],
        secs["backward"],
        speed_gpu,
    )
    step_s = base_s + st.grad_accum * (secs["recompute"] + link.exposed_s)
    fits = headroom = None
    if the_gpu is not None:
        headroom = the_gpu.memory_bytes - peak
        fits = headroom >= 0
    host_fits = None if host_budget is None else link.host_bytes <= host_budget
    if host_fits is False:
        fits = False
    return PolicyEstimate(
        policy=policy,
        plan=plan.summary(),
        peak_bytes=peak,
        reserved_bytes=reserved,
        breakdown=breakdown,
        peak_phase=prof.peak_phase,
        activation_bytes=prof.activation,
        step_peak_bytes=prof.peak,
        forward_flops=prof.flops("forward"),
        backward_flops=prof.flops("backward"),
        recompute_flops=prof.flops("recompute"),
        recompute_bytes=prof.nbytes("recompute"),
        speed_cost=(step_s - base_s) / base_s if base_s > 0 else 0.0,
        step_time_s=step_s,
        tokens_per_s=st.tokens_per_step / step_s if step_s > 0 else 0.0,
        fits=fits,
        headroom_bytes=headroom,
        host_bytes=link.host_bytes,
        offload_s=st.grad_accum * link.exposed_s,
        host_fits=host_fits,
    )


def static_notes(
    st: TrainingSetup, fixed_overhead: int | None, speed_gpu: GPU, the_gpu: GPU | None
) -> list[str]:
    """How the numbers were made, for the report's notes: allowance, optimizer, autocast, speed."""
    notes = []
    if fixed_overhead is None:
        notes.append(
            f"cuda_overhead = {format_bytes(CUDA_CONTEXT_BYTES)} (CUDA context, cuBLAS/cuDNN "
            "workspaces) + what PyTorch's caching allocator holds beyond the live tensors at "
            "worst (block rounding, free space in segments that hold live blocks), from a replay "
            "of the step's allocations through a model of its rules (gradckpt.estimate.allocator); "
            "reserved_bytes adds the wholly free segments it keeps cached when memory is plentiful"
        )
    else:
        notes.append(f"cuda_overhead set to {format_bytes(fixed_overhead)}")
    opt = {
        "adamw": "fused AdamW: 2 states per trainable parameter in its dtype, no step temporaries",
        "adamw-8bit": "bitsandbytes AdamW8bit: 2 bytes per parameter + fp32 absmax per 256 (32-bit states below 4096 values)",
        "sgd": "SGD without momentum: no state",
        "sgd-momentum": "SGD with momentum: 1 state per trainable parameter",
    }[st.optimizer]
    notes.append(f"optimizer: {opt}")
    if st.hf_loss == "chunked":
        notes.append(
            "loss: gradckpt's chunked loss head under every policy (loss_head='chunked'): full "
            "logits never exist; one more lm_head forward in backward"
        )
    elif st.hf_loss == "liger":
        notes.append(
            "loss: Liger-Kernel's fused linear cross-entropy, estimated as gradckpt's chunked "
            "loss head (one chunk's logits at a time, as Liger holds); Liger computes the head's "
            "gradients in forward and runs no second lm_head forward, so its step time is up "
            "to one lm_head forward below this estimate's"
        )
    if st.autocast:
        notes.append(
            "forward ran under bf16 autocast (as Trainer(bf16=True)), CPU autocast's op lists; "
            "CUDA's differ slightly (e.g. which ops it keeps in fp32)"
        )
    src = the_gpu if the_gpu is not None and the_gpu.has_speed else None
    notes.append(
        f"speed on {speed_gpu.name}{'' if src else ' (reference GPU)'}: per-op roofline "
        f"max(FLOPs / ({MATH_EFFICIENCY:.0%} of {speed_gpu.bf16_tflops} TFLOPS), bytes / "
        f"({MEMORY_EFFICIENCY:.0%} of {speed_gpu.bandwidth_gbs} GB/s)), kernel launch gaps ignored; "
        "speed_cost = recompute time / time of the step without it"
    )
    notes.append(
        "kernels are torch's CPU kernels on fake tensors: SDPA keeps output + logsumexp like "
        "CUDA flash/efficient attention"
    )
    return notes
