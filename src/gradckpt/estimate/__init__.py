"""Estimate a fine-tune's peak memory and checkpointing cost from a config alone: no weights, no GPU.

Example:
    >>> import gradckpt
    >>> report = gradckpt.estimate("mistral-7b", method="lora", batch=1, seq=2048, gpu="rtx-4090")
    >>> [(r.policy, r.peak_bytes, r.fits) for r in report.results]
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError, GradCkptError
from ..units import format_bytes, parse_bytes
from .gpus import GPU, GPU_PRESETS, MATH_EFFICIENCY, MEMORY_EFFICIENCY, get_gpu
from .presets import MODEL_PRESETS, ModelPreset, ModelSpec, resolve_model
from .report import BREAKDOWN_HELP, BREAKDOWN_KEYS, Alternative, EstimateReport, PolicyEstimate
from .setup import METHODS, OPTIMIZERS, PRECISIONS, TrainingSetup

__all__ = [
    "BREAKDOWN_HELP",
    "BREAKDOWN_KEYS",
    "CUDA_CONTEXT_BYTES",
    "DEFAULT_POLICIES",
    "GPU",
    "GPU_PRESETS",
    "METHODS",
    "MODEL_PRESETS",
    "OPTIMIZERS",
    "PRECISIONS",
    "REFERENCE_GPU",
    "Alternative",
    "EstimateReport",
    "ModelPreset",
    "ModelSpec",
    "PolicyEstimate",
    "TrainingSetup",
    "estimate",
    "get_gpu",
    "resolve_model",
]

DEFAULT_POLICIES = ("none", "full")
#: CUDA context, cuBLAS/cuDNN workspaces and the kernels torch loads: ~0.3-0.6 GiB with lazy
#: module loading (CUDA >= 11.7) on Ampere/Hopper; 0.5 GiB is the allowance.
CUDA_CONTEXT_BYTES = 512 * 1024**2
#: Caching-allocator slack on top of live tensors at the peak (block rounding, fragmentation):
#: reserved/allocated ratios of 1.03-1.10 are typical for transformer training; 5% allowed.
ALLOCATOR_SLACK = 0.05
#: Speed figures use this GPU when none with throughput figures is given.
REFERENCE_GPU = "a100-80gb"

# Step profiles already computed, so that asking again with another GPU (or overhead) is
# instant: (session, plan, order, batch, seq, accumulation, optimizer) -> (session, profile, totals).
_PROFILES: dict[Any, Any] = {}
_PROFILES_SIZE = 64


def _policy_list(policies: Sequence[str] | str | None) -> list[str]:
    from ..policies import get_policy

    if policies is None:
        return list(DEFAULT_POLICIES)
    if isinstance(policies, str):
        policies = [p for p in policies.split(",")]
    out: list[str] = []
    for p in policies:
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(
                f"policies must be names such as 'none', 'full', 'every:2'; got {p!r}"
            )
        p = p.strip()
        if p != "auto":
            spec, arg = get_policy(p)
            p = f"{spec.name}:{arg}" if arg is not None else spec.name
        if p not in out:
            out.append(p)
    if not out:
        raise ConfigError("policies is empty: name at least one, e.g. 'none,full'")
    return out


def _phase_seconds(costs: Counter[tuple[str, int, int]], gpu: GPU) -> dict[str, float]:
    out = {"forward": 0.0, "backward": 0.0, "recompute": 0.0}
    for (phase, flops, nbytes), n in costs.items():
        out[phase] += n * gpu.op_seconds(flops, nbytes)
    return out


def _optimizer_step_bytes(totals: Any, optimizer: str) -> int:
    """Bytes a fused optimizer step moves: read+write params and states, read gradients."""
    return 2 * totals.grad_bytes + totals.grad_bytes + 2 * totals.optimizer_bytes


def estimate(
    model: Any,
    *,
    method: str | None = None,
    batch: int | None = None,
    seq: int | None = None,
    policies: Sequence[str] | str | None = None,
    gpu: str | GPU | None = None,
    precision: str | None = None,
    optimizer: str | None = None,
    grad_accum: int | None = None,
    attention: str | None = None,
    lora_rank: int | None = None,
    lora_alpha: int | None = None,
    lora_dropout: float | None = None,
    lora_targets: Sequence[str] | str | None = None,
    setup: TrainingSetup | None = None,
    overhead: int | str | None = None,
    alternatives: bool = True,
    full_depth: bool = False,
) -> EstimateReport:
    """Predict peak memory and checkpointing cost of fine-tuning ``model``, without weights or a GPU.

    The model's real ``transformers`` code runs one forward+backward on fake tensors per policy
    (see ``gradckpt.estimate.fake``); optimizer states are added analytically, plus an allowance
    for the CUDA context and allocator slack. Sweeps (sequence lengths, batch sizes, GPUs) are
    loops over this function: fake models are cached between calls, so only the step reruns.

    Args:
        model: a preset name (``MODEL_PRESETS``: ``"mistral-7b"``, ``"llama-3-8b"``...), a path
            to a Hugging Face ``config.json``, or a ``transformers`` config object.
        method: ``"full"`` (default), ``"lora"`` or ``"qlora"``.
        batch: micro-batch size (default 1).
        seq: sequence length in tokens (default 2048).
        policies: checkpointing policies to compare; any of ``gradckpt.policy_names()`` with
            its argument (``"every:2"``), or ``"auto"``: the memory-budget planner's cheapest
            plan that fits ``gpu``. Default: ``none`` and ``full``, plus ``auto`` when a GPU is
            given (and the planner is part of this build).
        gpu: a preset (``GPU_PRESETS``: ``"rtx-4090"``, ``"a100-80gb"``...) or a size
            (``"24GB"``); sets ``fits`` and the speed figures (without throughput figures,
            speed uses ``REFERENCE_GPU``).
        precision: ``"bf16"`` (default: bf16 weights, gradients, states, bf16 autocast),
            ``"mixed"`` (fp32 master weights + bf16 autocast) or ``"fp32"`` (no autocast).
        optimizer: ``"adamw"`` (default), ``"adamw-8bit"``, ``"sgd"``, ``"sgd-momentum"``.
        grad_accum: micro-batches per optimizer step (default 1).
        attention: ``"sdpa"`` (default), ``"flash"`` or ``"eager"``.
        lora_rank, lora_alpha, lora_dropout, lora_targets: LoRA settings (16, 32, 0.0, "all-linear").
        setup: a ``TrainingSetup`` to start from; the keyword arguments above override it.
        overhead: the CUDA allowance in bytes or as a size (``"1GiB"``); default
            ``CUDA_CONTEXT_BYTES`` + ``ALLOCATOR_SLACK`` of the tensors' peak; ``0`` for none.
        alternatives: when a GPU is given and no policy fits, estimate what would (LoRA, QLoRA,
            8-bit AdamW, smaller batch or sequence) and report it.
        full_depth: run every block instead of replaying a few (slower; same numbers).

    Returns:
        An ``EstimateReport``: ``.results`` has one ``PolicyEstimate`` per policy
        (``policy``, ``peak_bytes``, ``breakdown``, ``speed_cost``, ``fits``...); ``to_dict()``
        gives it as JSON-ready data.

    Raises:
        ConfigError: unknown model (with the closest preset), malformed config, bad setting
            (batch or sequence < 1, unknown method/precision/optimizer), unknown GPU.
        PolicyError: unknown policy.

    Example:
        >>> r = gradckpt.estimate("llama-3-8b", method="qlora", batch=4, seq=2048, gpu="rtx-4090")
        >>> r.result("full").fits, f"{r.result('full').speed_cost:.0%}"
    """
    t0 = time.perf_counter()
    changes = {
        k: v
        for k, v in dict(
            method=method,
            batch=batch,
            seq=seq,
            precision=precision,
            optimizer=optimizer,
            grad_accum=grad_accum,
            attention=attention,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_targets=lora_targets,
        ).items()
        if v is not None
    }
    if setup is not None and not isinstance(setup, TrainingSetup):
        raise ConfigError(f"setup must be a TrainingSetup, got {type(setup).__name__}")
    st = (setup or TrainingSetup()).with_(**changes) if changes or setup is None else setup
    if st is None:  # pragma: no cover
        st = TrainingSetup()
    the_gpu = get_gpu(gpu) if gpu is not None else None
    speed_gpu = the_gpu if the_gpu is not None and the_gpu.has_speed else GPU_PRESETS[REFERENCE_GPU]
    names = _policy_list(policies)
    if policies is None and the_gpu is not None and _planner_available():
        names.append("auto")  # the cheapest plan that fits the GPU
    fixed_overhead = (
        None
        if overhead is None
        else (0 if overhead == 0 else parse_bytes(overhead, what="overhead"))
    )
    spec = resolve_model(model)
    return _estimate(
        spec, st, names, the_gpu, speed_gpu, fixed_overhead, alternatives, full_depth, t0
    )


def _estimate(
    spec: ModelSpec,
    st: TrainingSetup,
    names: list[str],
    the_gpu: GPU | None,
    speed_gpu: GPU,
    fixed_overhead: int | None,
    alternatives: bool,
    full_depth: bool,
    t0: float,
) -> EstimateReport:
    from ..plan import Decision, Plan
    from ..policies import make_plan
    from . import fake

    cfg = spec.config
    L = fake.num_layers(cfg)
    types = fake.layer_types(cfg)
    if L < 1:
        raise ConfigError(f"{spec.name} has {L} layers; nothing to estimate")
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(max_pos, int) and st.seq > max_pos:
        raise ConfigError(
            f"sequence length {st.seq} exceeds {spec.name}'s maximum of {max_pos} positions "
            "(max_position_embeddings); use --seq <= that"
        )
    notes = list(spec.notes)
    force_full = full_depth or bool(fake._per_layer_lists(cfg)) or fake.layers_differ_by_index(cfg)

    # A small build tells the block names; the full-depth names follow their pattern.
    n0 = min(L, 3)
    idx0 = [0, 1, L - 1][:n0] if L >= 3 else list(range(L))
    probe = fake.get_session(cfg, st, n0, None if types is None else [types[i] for i in idx0])
    full_names = fake.block_names_at_depth([n for n, _ in probe.blocks], L)
    if full_names is None:
        force_full = True
        full = fake.get_session(cfg, st, L, types)
        full_names = [n for n, _ in full.blocks]
    notes.extend(probe.notes)

    results: list[PolicyEstimate] = []
    totals_full = None
    replayed: set[str] = set()
    offloaded: list[str] = []
    for policy in names:
        if policy == "auto":
            plan, why = _planner_plan(cfg, st, L, types, the_gpu, fixed_overhead)
            if plan is None:
                notes.append(str(why))
                continue
        else:
            plan = make_plan(policy, full_names)
        if Decision.OFFLOAD in plan.decisions:
            offloaded.append(policy)
        layout = None if force_full else fake.reduced_layout(plan, types)
        if layout is None:
            sess = fake.get_session(cfg, st, L, types)
            order = list(range(L))
            run_plan = Plan(
                tuple(n for n, _ in sess.blocks),
                plan.decisions,
                plan.segments,
                plan.policy,
                plan.options,
            )
        else:
            order, decisions, small_types = layout
            sess = fake.get_session(cfg, st, len(decisions), small_types)
            run_plan = Plan(
                tuple(n for n, _ in sess.blocks), tuple(decisions), (), plan.policy, plan.options
            )
            replayed.add(f"{policy}: ran {len(decisions)} of {L} blocks")
        key = (
            id(sess),
            run_plan.decisions,
            run_plan.segments,
            repr(run_plan.options),
            tuple(order),
            st.batch,
            st.seq,
            st.grad_accum,
            st.optimizer,
        )
        cached = _PROFILES.pop(key, None)
        if cached is None or cached[0] is not sess:
            timeline = sess.run(run_plan, st.batch, st.seq, grad_accum=st.grad_accum)
            prof = fake.replay(timeline, order)
            whole, per_block = sess.totals(st.optimizer)
            outside = whole - sum(per_block[1:], per_block[0])
            tot = sum((per_block[k] for k in order[1:]), outside + per_block[order[0]])
            cached = (sess, prof, tot)
        _PROFILES[key] = cached  # most recent last
        while len(_PROFILES) > _PROFILES_SIZE:
            _PROFILES.pop(next(iter(_PROFILES)))
        _, prof, tot = cached
        totals_full = tot
        results.append(
            _policy_estimate(policy, plan, prof, tot, st, the_gpu, speed_gpu, fixed_overhead)
        )

    if totals_full is None:
        raise GradCkptError("no policy could be estimated")
    if offloaded:
        notes.append(
            f"{', '.join(offloaded)}: estimated as on a CPU-only run, where offloaded block inputs "
            "stay in device memory (like 'full'); on a GPU they move to host memory, so the "
            "device peak is lower by up to the block inputs' bytes"
        )
    if replayed:
        notes.append(
            "blocks are identical, so each policy ran on a few blocks (the first period of its "
            "plan, one more period, the last block) and the middle ones were replayed to full depth ("
            + "; ".join(sorted(replayed))
            + "); full_depth=True runs every block, same numbers"
        )
    notes.extend(_static_notes(st, fixed_overhead, speed_gpu, the_gpu))

    report_alts: list[Alternative] = []
    if the_gpu is not None and results and not any(r.fits for r in results):
        fixed = totals_full.weight_bytes + totals_full.grad_bytes + totals_full.optimizer_bytes
        if (
            fixed + (fixed_overhead if fixed_overhead is not None else CUDA_CONTEXT_BYTES)
            > the_gpu.memory_bytes
        ):
            notes.append(
                f"no checkpointing policy can make this fit {the_gpu.name}: weights, gradients and "
                f"optimizer states alone take {format_bytes(fixed)} of {format_bytes(the_gpu.memory_bytes)}"
            )
        if alternatives:
            frugal = min(results, key=lambda r: (r.peak_bytes, r.activation_bytes)).policy
            report_alts = _alternatives(
                spec,
                st,
                frugal,
                the_gpu,
                speed_gpu,
                fixed_overhead,
                full_depth,
                fixed_fits=fixed + CUDA_CONTEXT_BYTES < the_gpu.memory_bytes,
            )

    return EstimateReport(
        model=spec.name,
        source=spec.source,
        params=totals_full.params,
        trainable_params=totals_full.trainable,
        layers=L,
        setup=st.to_dict(),
        gpu=None
        if the_gpu is None
        else {
            "name": the_gpu.name,
            "memory_bytes": the_gpu.memory_bytes,
            "bf16_tflops": the_gpu.bf16_tflops,
            "bandwidth_gbs": the_gpu.bandwidth_gbs,
        },
        speed_gpu=speed_gpu.name,
        results=results,
        alternatives=report_alts,
        notes=notes,
        elapsed_s=time.perf_counter() - t0,
    )


def _policy_estimate(
    policy: str,
    plan: Any,
    prof: Any,
    tot: Any,
    st: TrainingSetup,
    the_gpu: GPU | None,
    speed_gpu: GPU,
    fixed_overhead: int | None,
) -> PolicyEstimate:
    from .fake import ACT, BWD, GRAD, HEAD

    parts = prof.peak_parts
    accum_grads = tot.grad_bytes if st.grad_accum > 1 else 0
    breakdown = {
        "weights": tot.weight_bytes,
        "gradients": parts[GRAD] + accum_grads,
        "optimizer_states": tot.optimizer_bytes,
        "activations": parts[ACT],
        "logits_loss": parts[HEAD],
        "backward_transient": parts[BWD],
    }
    tensors = sum(breakdown.values())
    if fixed_overhead is None:
        overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * tensors)
    else:
        overhead = fixed_overhead
    breakdown["cuda_overhead"] = overhead
    peak = tensors + overhead

    secs = _phase_seconds(prof.costs, speed_gpu)
    opt_s = speed_gpu.op_seconds(0, _optimizer_step_bytes(tot, st.optimizer))
    base_s = st.grad_accum * (secs["forward"] + secs["backward"]) + opt_s
    step_s = base_s + st.grad_accum * secs["recompute"]
    fits = headroom = None
    if the_gpu is not None:
        headroom = the_gpu.memory_bytes - peak
        fits = headroom >= 0
    return PolicyEstimate(
        policy=policy,
        plan=plan.summary(),
        peak_bytes=peak,
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
    )


def _static_notes(
    st: TrainingSetup, fixed_overhead: int | None, speed_gpu: GPU, the_gpu: GPU | None
) -> list[str]:
    notes = []
    if fixed_overhead is None:
        notes.append(
            f"cuda_overhead = {format_bytes(CUDA_CONTEXT_BYTES)} (CUDA context, cuBLAS/cuDNN "
            f"workspaces) + {ALLOCATOR_SLACK:.0%} of the tensors' peak (caching-allocator slack)"
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


def _alternatives(
    spec: ModelSpec,
    st: TrainingSetup,
    policy: str,
    gpu: GPU,
    speed_gpu: GPU,
    fixed_overhead: int | None,
    full_depth: bool,
    fixed_fits: bool = True,
) -> list[Alternative]:
    """Single changes to the setup that make it fit (or come closest), each with its numbers.

    Smaller batches and sequences are tried only when the weights, gradients and optimizer
    states fit (``fixed_fits``): otherwise no batch or sequence length can help.
    """
    cands: list[tuple[str, dict[str, Any]]] = []
    if st.method == "full" and st.optimizer == "adamw":
        cands.append(("8-bit AdamW (bitsandbytes) instead of AdamW", {"optimizer": "adamw-8bit"}))
    if st.method == "full" and st.precision != "bf16":
        cands.append(
            (
                "bf16 weights and optimizer states instead of fp32 master weights",
                {"precision": "bf16"},
            )
        )
    if st.method == "full":
        cands.append(
            (
                f"LoRA r={st.lora_rank} on all linear layers instead of a full fine-tune",
                {"method": "lora"},
            )
        )
    if st.method != "qlora":
        cands.append(
            (f"QLoRA (NF4 base) r={st.lora_rank} instead of {st.method}", {"method": "qlora"})
        )
    out: list[Alternative] = []

    def run(change: str, settings: dict[str, Any]) -> Alternative:
        alt = st.with_(**settings)
        r = _estimate(
            spec,
            alt,
            [policy],
            gpu,
            speed_gpu,
            fixed_overhead,
            False,
            full_depth,
            time.perf_counter(),
        )
        pe = r.results[0]
        return Alternative(
            change=change,
            settings=settings,
            policy=policy,
            peak_bytes=pe.peak_bytes,
            fits=bool(pe.fits),
            speed_cost=pe.speed_cost,
        )

    for change, settings in cands:
        out.append(run(change, settings))
    if not fixed_fits:
        return out
    # The same setup with a smaller micro-batch (more accumulation keeps tokens per step), then
    # a shorter sequence: halve until it fits or reaches 1 / 128 tokens.
    b, last = st.batch, None
    while b > 1:
        b //= 2
        accum = st.grad_accum * (st.batch // b)
        last = run(
            f"micro-batch {b} with {accum}x gradient accumulation (same tokens per step)",
            {"batch": b, "grad_accum": accum},
        )
        if last.fits:
            break
    if last is not None:
        out.append(last)
    if last is None or not last.fits:
        s, last_s = st.seq, None
        while s > 128:
            s //= 2
            last_s = run(f"sequence length {s} (batch 1)", {"seq": s, "batch": 1})
            if last_s.fits:
                break
        if last_s is not None:
            out.append(last_s)
    return out


def _planner_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("gradckpt.planner.api") is not None
    except ImportError:
        return False


def _planner_plan(
    cfg: Any, st: TrainingSetup, L: int, types: Any, gpu: GPU | None, fixed_overhead: int | None
) -> tuple[Any, str | None]:
    """Hook for the memory-budget planner (``gradckpt.planner``): the cheapest plan that fits ``gpu``.

    Returns ``(plan, None)``, or ``(None, why)`` when there is no GPU, no planner in this build,
    or the planner cannot plan this model. The planner profiles the full-depth fake model; its
    budget is what the GPU leaves for the step: memory minus the CUDA allowance (context and
    allocator slack) minus the optimizer states, which the fake step does not hold. The planner
    counts every live CPU tensor of the process as already in memory (as ``gradckpt.measure``
    does), so cached fake models are dropped first; large real CPU tensors the caller keeps
    alive make its plan more conservative. The plan it returns is then estimated like any other.
    """
    if gpu is None:
        return None, "policy 'auto' needs a GPU (--gpu): the memory it plans for"
    try:
        from ..planner.api import plan as planner_plan
    except ImportError:
        return (
            None,
            "policy 'auto' skipped: the memory-budget planner (gradckpt.planner) is not in this build",
        )
    import torch

    from . import fake

    sess = fake.get_session(cfg, st, L, types)
    # The planner measures like gradckpt.measure: every live tensor of the process is baseline.
    # Fake models cached from earlier estimates would count as weights: let them go.
    fake.keep_only(sess)
    for key in [k for k, v in _PROFILES.items() if v[0] is not sess]:
        del _PROFILES[key]
    gc.collect()
    whole, _ = sess.totals(st.optimizer)
    if fixed_overhead is None:
        room = int((gpu.memory_bytes - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_SLACK))
    else:
        room = gpu.memory_bytes - fixed_overhead
    budget = room - whole.optimizer_bytes
    if budget <= 0:
        return None, f"policy 'auto' skipped: the optimizer states alone exceed {gpu.name}"
    with sess.mode:
        ids = torch.randint(0, sess.vocab, (st.batch, st.seq))
    try:
        with sess.mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=st.autocast):
            return planner_plan(
                sess.model,
                budget,
                {"input_ids": ids, "labels": ids},
                blocks=[n for n, _ in sess.blocks],
            ), None
    except GradCkptError as e:
        return None, f"policy 'auto' (planner, {format_bytes(budget)} for the step): {e}"
