"""``estimate()``: a fine-tune's peak memory and checkpointing cost from its config alone.

No weights, no GPU: every policy runs one forward+backward of the real model code on fake tensors
(``fake_model``, ``timeline``), optimizer states are added from the trainable parameters, and a
CUDA allowance on top; speed is a per-op roofline on a GPU preset (``gpus``).

Example:
    >>> import gradckpt
    >>> report = gradckpt.estimate("mistral-7b", method="lora", batch=1, seq=2048, gpu="rtx-4090")
    >>> [(r.policy, r.peak_bytes, r.fits) for r in report.results]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ConfigError, PlanError
from ..plans import Decision, Plan
from ..policies import get_policy, make_plan
from ..runtime.chunked_loss import HEAD_NAME
from ..units import format_bytes, parse_size
from . import fake_model, periodic
from .allocator import step_allocation
from .alternatives import alternatives as _alternatives
from .auto import AUTO_TRIES, plan_until_it_fits
from .compat import deprecated_csv
from .gpus import GPU, GPU_PRESETS, get_gpu
from .presets import ModelSpec, resolve_model
from .report import Alternative, EstimateReport, PolicyEstimate
from .sharding import Sharding, ShardTotals, shard_totals, sharding
from .step_cost import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, policy_estimate, static_notes
from .timeline import replay
from .totals import replayed_totals
from .training import CHUNKED_LOSSES, TrainingSetup
from .vision import check_images

__all__ = [
    "ALLOCATOR_SLACK",
    "CUDA_CONTEXT_BYTES",
    "DEFAULT_POLICIES",
    "REFERENCE_GPU",
    "check_positions",
    "estimate",
    "estimate_one",
    "policy_list",
]

DEFAULT_POLICIES = ("none", "full")
#: Speed figures use this GPU when none with throughput figures is given.
REFERENCE_GPU = "a100-80gb"


def policy_list(policies: Sequence[str] | str | None) -> list[str]:
    """Policy names checked and normalized (``"every:2"`` kept with its argument), no repeats.

    Args:
        policies: a name or a list of names; None: ``DEFAULT_POLICIES``. A comma-separated
            string (``"none,full"``) is still split, with a DeprecationWarning, until the next
            release.

    Raises:
        ConfigError: an empty list or a name that is not a string.
        PolicyError: an unknown policy.
    """
    if policies is None:
        return list(DEFAULT_POLICIES)
    if isinstance(policies, str):
        if "," in policies:
            policies = deprecated_csv(policies, "policies", "['none', 'full']")
        else:
            policies = [policies]
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
    adapter_dtype: str | None = None,
    kbit_prep: bool | None = None,
    nf4_keeps_input: bool | None = None,
    nf4_double_quant: bool | None = None,
    hf_loss: str | None = None,
    image_size: int | str | tuple[int, int] | None = None,
    images: int | None = None,
    setup: TrainingSetup | None = None,
    overhead: int | str | None = None,
    alternatives: bool = True,
    full_depth: bool = False,
    gpus: int | None = None,
    shard: str | None = None,
    host_budget: int | str | None = None,
    max_positions: int | None = None,
) -> EstimateReport:
    """Predict peak memory and checkpointing cost of fine-tuning ``model``, without weights or a GPU.

    The model's real ``transformers`` code runs one forward+backward on fake tensors per policy
    (see ``gradckpt.estimate.fake_model``); optimizer states are added analytically, plus an
    allowance for the CUDA context and allocator slack. Sweeps (sequence lengths, batch sizes, GPUs) are
    loops over this function: fake models are cached between calls, so only the step reruns.

    Args:
        model: a preset name (``MODEL_PRESETS``: ``"mistral-7b"``, ``"llama-3-8b"``...), a path
            to a Hugging Face ``config.json``, or a ``transformers`` config object.
        method: ``"full"`` (default), ``"lora"`` or ``"qlora"``.
        batch: micro-batch size (default 1).
        seq: sequence length in tokens (default 2048).
        policies: checkpointing policies to compare, a name or a list of names; any of
            ``gradckpt.policy_names()`` with its argument (``"every:2"``), or ``"auto"``: the
            memory-budget planner's cheapest plan that fits ``gpu``. Default: ``none`` and
            ``full``, plus ``auto`` when a GPU is given.
        gpu: a preset (``GPU_PRESETS``: ``"rtx-4090"``, ``"a100-80gb"``...) or a size
            (``"24GB"``); sets ``fits`` and the speed figures (without throughput figures,
            speed uses ``REFERENCE_GPU``).
        precision: ``"bf16"`` (default: bf16 weights, gradients, states, bf16 autocast),
            ``"mixed"`` (fp32 master weights + bf16 autocast), ``"fp32"`` (no autocast) or
            ``"bf16-true"`` (bf16 weights, no autocast: a model loaded in bf16 and run as is).
        optimizer: ``"adamw"`` (default), ``"adamw-8bit"``, ``"sgd"``, ``"sgd-momentum"``.
        grad_accum: micro-batches per optimizer step (default 1).
        attention: ``"sdpa"`` (default), ``"flash"`` or ``"eager"``.
        lora_rank, lora_alpha, lora_dropout, lora_targets: LoRA settings (16, 32, 0.0,
            ``"all-linear"``; ``lora_targets`` also takes a list of module names).
        adapter_dtype: LoRA adapters in ``"fp32"`` (default, peft's ``autocast_adapter_dtype``)
            or in the base ``"weights"``' dtype.
        kbit_prep: QLoRA: run peft's ``prepare_model_for_kbit_training`` (default True: fp32
            embeddings, norms and ``lm_head``, as peft's and TRL's QLoRA recipes do).
        nf4_keeps_input: QLoRA: 4-bit layers keep their input until backward, as bitsandbytes
            up to 0.43 did (default False: bitsandbytes >= 0.44).
        nf4_double_quant: QLoRA: ``bnb_4bit_use_double_quant`` (default True).
        hf_loss: ``"transformers"`` (default: the installed release's loss) or ``"shift-copy"``
            (transformers before 4.49, which also kept an fp32 copy of the shifted logits).
        image_size, images: vision-language models: the images' size in pixels (``448``,
            ``"448x336"`` or ``(448, 336)``) and how many per sequence (default 1); required
            for a VLM (see ``gradckpt.estimate.vision``: which families, what their processors
            make of an image).
        setup: a ``TrainingSetup`` to start from; the keyword arguments above override it.
        overhead: the CUDA allowance in bytes or as a size (``"1GiB"``); default
            ``CUDA_CONTEXT_BYTES`` + what the caching allocator holds beyond the live tensors
            (``allocator``: a replay of the step's allocations); ``0`` for none.
        alternatives: when a GPU is given and no policy fits, estimate what would (LoRA, QLoRA,
            8-bit AdamW, smaller batch or sequence) and report it.
        full_depth: run every block instead of replaying a few (slower; same numbers).
        gpus: data-parallel GPUs (default 1); every figure is then per GPU, each running
            ``batch`` sequences (see ``gradckpt.estimate.sharding``).
        shard: how weights, gradients and optimizer states are split over ``gpus``: ``"ddp"``
            (default with ``gpus``), ``"fsdp2"``, ``"zero1"``, ``"zero2"`` or ``"zero3"``.
        host_budget: host RAM the offloaded tensors may use (bytes or ``"128GiB"``); a policy
            whose offloaded bytes exceed it does not fit (``host_fits``). Default: not checked;
            every result reports ``host_bytes`` either way.
        max_positions: the context the fine-tune extends the model to (RoPE scaling), in place
            of the config's ``max_position_embeddings``: an explicit statement that sequences
            past the config's limit are meant (memory does not depend on the field).

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
    changes = dict(
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
        adapter_dtype=adapter_dtype,
        kbit_prep=kbit_prep,
        nf4_keeps_input=nf4_keeps_input,
        nf4_double_quant=nf4_double_quant,
        hf_loss=hf_loss,
        image_size=image_size,
        images=images,
    )
    inputs = _inputs(
        model,
        policies=policies,
        gpu=gpu,
        changes=changes,
        setup=setup,
        overhead=overhead,
        alternatives=alternatives,
        full_depth=full_depth,
        gpus=gpus,
        shard=shard,
        host_budget=host_budget,
        max_positions=max_positions,
    )
    report, skipped = _estimate(inputs, t0)
    if report is None:
        raise PlanError("no policy could be estimated: " + "; ".join(skipped))
    return report


def check_positions(spec: ModelSpec, seq: int, extended: int | None = None) -> int | None:
    """The model's maximum sequence length (None when its config states none), checked against ``seq``.

    ``extended``: the ``max_positions`` the caller gave (a context extension), used instead of
    the config's limit.

    Raises:
        ConfigError: ``seq`` is longer. Memory does not depend on the limit, so a fine-tune that
            extends the context gives a config.json with a larger ``max_position_embeddings``.
    """
    if extended is not None:
        if isinstance(extended, bool) or not isinstance(extended, int) or extended < 1:
            raise ConfigError(f"max_positions must be a number of tokens >= 1, got {extended!r}")
        max_pos: int | None = extended
    else:
        max_pos = fake_model.max_positions(spec.config)
    if max_pos is not None and seq > max_pos:
        raise ConfigError(
            f"sequence length {seq} exceeds {spec.name}'s maximum of {max_pos} positions "
            f"(max_position_embeddings{'' if extended is None else ', as max_positions says'}); "
            f"use at most {max_pos} tokens, or say the fine-tune extends the context: "
            "max_positions= (--max-positions), or a config.json with a larger "
            "max_position_embeddings"
        )
    return max_pos


def estimate_one(
    model: Any, policy: str, *, batch: int, seq: int, gpu: str | GPU | None, **settings: Any
) -> PolicyEstimate | None:
    """One policy's estimate at one batch and sequence length on one GPU: what a sweep probes.

    Args:
        model, batch, seq, gpu: as ``estimate`` takes them.
        policy: one policy name, or ``"auto"``.
        **settings: the rest of ``estimate``'s keyword arguments, ``alternatives`` aside.

    Returns:
        The ``PolicyEstimate``, or None when ``policy`` is ``"auto"`` and the planner finds no
        plan for ``gpu`` (an answer, not a mistake: the sweep leaves that point out).
    """
    resolved = {k: settings.pop(k) for k in _RESOLVED if k in settings}
    changes = {**settings, "batch": batch, "seq": seq}
    inputs = _inputs(
        model, policies=[policy], gpu=gpu, changes=changes, alternatives=False, **resolved
    )
    report, _ = _estimate(inputs, time.perf_counter())
    return None if report is None else report.results[0]


@dataclass(frozen=True)
class _Inputs:
    """One estimate's inputs, checked: what ``_estimate`` runs."""

    spec: ModelSpec
    setup: TrainingSetup
    policies: list[str]
    gpu: GPU | None
    #: the CUDA allowance in bytes; None: CUDA_CONTEXT_BYTES + the allocator replay's slack
    overhead: int | None
    alternatives: bool
    full_depth: bool
    #: data parallelism over several GPUs (None: one GPU, nothing sharded)
    sharding: Sharding | None = None
    #: host RAM offloaded tensors may use, bytes; None: not checked
    host_budget: int | None = None
    #: the context extension asked for (instead of max_position_embeddings); None: the config's
    max_positions: int | None = None

    @property
    def speed_gpu(self) -> GPU:
        """The GPU the speed figures are for: ``gpu``, or ``REFERENCE_GPU`` without throughput."""
        g = self.gpu
        return g if g is not None and g.has_speed else GPU_PRESETS[REFERENCE_GPU]


def _with_loss(plan: Plan, st: TrainingSetup) -> Plan:
    """``plan`` with the chunked loss head when the setup's loss is chunked (``CHUNKED_LOSSES``)."""
    if st.hf_loss not in CHUNKED_LOSSES or "loss_head" in plan.options:
        return plan
    head = {"loss_head": HEAD_NAME, "loss_head_optional": True}
    return replace(plan, options={**plan.options, **head})


#: plans the budget planner makes at most for policy 'auto' (each one lower by the excess)
# estimate()'s keyword arguments that are not TrainingSetup fields
_RESOLVED = ("setup", "overhead", "full_depth", "gpus", "shard", "host_budget", "max_positions")


def _inputs(
    model: Any,
    *,
    policies: Sequence[str] | str | None,
    gpu: str | GPU | None,
    changes: dict[str, Any],
    setup: TrainingSetup | None = None,
    overhead: int | str | None = None,
    alternatives: bool = True,
    full_depth: bool = False,
    gpus: int | None = None,
    shard: str | None = None,
    host_budget: int | str | None = None,
    max_positions: int | None = None,
) -> _Inputs:
    """``estimate``'s arguments checked and resolved (setup, GPU, policies, allowance, model).

    ``changes`` are the ``TrainingSetup`` fields given (None: not given), applied over ``setup``.
    """
    changes = {k: v for k, v in changes.items() if v is not None}
    if setup is not None and not isinstance(setup, TrainingSetup):
        raise ConfigError(f"setup must be a TrainingSetup, got {type(setup).__name__}")
    st = (setup or TrainingSetup()).with_(**changes) if changes or setup is None else setup
    the_gpu = get_gpu(gpu) if gpu is not None else None
    names = policy_list(policies)
    split = sharding(gpus, shard)
    if split is not None:
        split.check(st)
    if policies is None and the_gpu is not None:
        names.append("auto")  # the cheapest plan that fits the GPU (each GPU, when sharded)
    fixed_overhead = None
    if overhead is not None:
        try:
            fixed_overhead = 0 if overhead == 0 else parse_size(overhead, what="overhead")
        except ValueError as e:  # a size typo is a bad setting, not a budget
            raise ConfigError(str(e)) from None
    host = None
    if host_budget is not None:
        try:
            host = parse_size(host_budget, what="host_budget")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return _Inputs(
        spec=resolve_model(model),
        setup=st,
        policies=names,
        gpu=the_gpu,
        overhead=fixed_overhead,
        alternatives=alternatives,
        full_depth=full_depth,
        sharding=split,
        host_budget=host,
        max_positions=max_positions,
    )


def _shard_totals(cfg: Any, setup: TrainingSetup, sess: Any, step_tot: Any, step_st: Any) -> Any:
    static = step_tot if step_st == setup else fake_model.model_totals(cfg, setup)
    whole, per_block = sess.totals(step_st.optimizer)
    return shard_totals(static, step_tot, whole, per_block + sess.extra_totals(step_st.optimizer))


def _estimate(inp: _Inputs, t0: float) -> tuple[EstimateReport | None, list[str]]:
    """Run every policy of ``inp``: ``(report, why policies were skipped)``.

    The report is None when no policy could be estimated (``"auto"`` alone, with no plan).
    """
    spec, names, the_gpu, split = inp.spec, inp.policies, inp.gpu, inp.sharding
    st = inp.setup if split is None else split.step_setup(inp.setup)
    speed_gpu, fixed_overhead, full_depth = inp.speed_gpu, inp.overhead, inp.full_depth
    cfg = spec.config
    L = fake_model.num_layers(cfg)
    types = fake_model.layer_types(cfg)
    if L < 1:
        raise ConfigError(f"{spec.name} has {L} layers; nothing to estimate")
    check_positions(spec, st.seq, inp.max_positions)
    notes = list(spec.notes)
    images_note = check_images(cfg, spec.name, st.image_size, st.images, st.seq)
    if images_note is not None:
        notes.append(images_note)
    if inp.max_positions is not None:
        notes.append(
            f"context extended to {inp.max_positions} positions (max_positions; the config says "
            f"{fake_model.max_positions(cfg)}): memory does not depend on the field"
        )
    force_full = (
        full_depth
        or bool(fake_model.per_layer_lists(cfg))
        or fake_model.layers_differ_by_index(cfg)
    )

    # A small build tells the block names; the full-depth names follow their pattern.
    n0 = min(L, 3)
    idx0 = [0, 1, L - 1][:n0] if L >= 3 else list(range(L))
    probe = fake_model.get_session(cfg, st, n0, None if types is None else [types[i] for i in idx0])
    # other block lists (a VLM's vision tower) keep their depth: they come first, as they are
    extra = [n for n, _ in probe.extra_blocks]
    text_names = periodic.block_names_at_depth([n for n, _ in probe.blocks], L)
    if text_names is None:
        force_full = True
        full = fake_model.get_session(cfg, st, L, types)
        text_names = [n for n, _ in full.blocks]
        del full
    full_names = [*extra, *text_names]
    notes.extend(probe.notes)
    # Hold no session here: the 'auto' planner counts every live tensor as already in memory,
    # so a small build kept alive by this frame would be counted as weights (3 blocks of an 8B
    # model: +3.0 GiB, and 'auto' refused budgets that 'full' fits).
    del probe

    results: list[PolicyEstimate] = []
    skipped: list[str] = []
    totals_full = None
    shard_tot: ShardTotals | None = None
    replayed: set[str] = set()
    offloaded: list[str] = []

    def run_policy(policy: str, plan: Plan) -> tuple[PolicyEstimate, Any]:
        # A function, so that no session outlives it in this frame (see ``del probe``).
        # The language model's blocks are the plan's last L; the other lists run as they are.
        k = len(extra)
        text_plan = Plan(plan.blocks[k:], plan.decisions[k:], policy=plan.policy)
        layout = None
        if not force_full and not plan.segments:
            layout = periodic.reduced_layout(text_plan, types)
        if layout is None:
            sess = fake_model.get_session(cfg, st, L, types)
            order = list(range(L))
            run_plan = Plan(
                tuple(sess.block_names), plan.decisions, plan.segments, plan.policy, plan.options
            )
        else:
            order, decisions, small_types = layout
            sess = fake_model.get_session(cfg, st, len(decisions), small_types)
            run_plan = Plan(
                tuple(sess.block_names),
                (*plan.decisions[:k], *decisions),
                (),
                plan.policy,
                plan.options,
            )
            replayed.add(f"{policy}: ran {len(decisions)} of {L} blocks")
        key = (
            run_plan.decisions,
            run_plan.segments,
            repr(run_plan.options),
            tuple(order),
            st.batch,
            st.seq,
            st.grad_accum,
            st.optimizer,
        )

        def step() -> Any:
            timeline = sess.run(run_plan, st.batch, st.seq, grad_accum=st.grad_accum)
            whole, per_block = sess.totals(st.optimizer)
            held = step_allocation(timeline, order, sess.model, sess.blocks, st.optimizer)
            return replay(timeline, order), replayed_totals(whole, per_block, order), held

        # asking again with another GPU (or overhead) is instant
        prof, tot, held = sess.steps.get(key, step)
        res = policy_estimate(
            policy, plan, prof, tot, st, the_gpu, speed_gpu, fixed_overhead, held, inp.host_budget
        )
        if split is not None:
            nonlocal shard_tot
            if shard_tot is None:
                shard_tot = _shard_totals(cfg, inp.setup, sess, tot, st)
            memory = None if the_gpu is None else the_gpu.memory_bytes
            res = split.apply(res, shard_tot, inp.setup, memory)
        return res, tot

    for policy in names:
        if policy != "auto":
            plan = _with_loss(make_plan(policy, full_names), st)
            if Decision.OFFLOAD in plan.decisions:
                offloaded.append(policy)
            result, totals_full = run_policy(policy, plan)
            results.append(result)
            continue
        sharded = None
        if split is not None:  # each GPU holds its share of the static tensors and the buffers
            if shard_tot is None:
                probe_sess = fake_model.get_session(cfg, st, L, types)
                whole_tot, _ = probe_sess.totals(st.optimizer)
                shard_tot = _shard_totals(cfg, inp.setup, probe_sess, whole_tot, st)
                del probe_sess
            sharded = split.planner_share(shard_tot, inp.setup)
        auto, why, (result, tot) = plan_until_it_fits(
            cfg, st, L, types, the_gpu, fixed_overhead, lambda p: run_policy("auto", p), sharded
        )
        if auto is None:
            skipped.append(str(why))
            continue
        if result.fits is False and the_gpu is not None:
            notes.append(
                f"'auto': the planner's plan is over {the_gpu.name} by "
                f"{format_bytes(-(result.headroom_bytes or 0))} in this estimate after "
                f"{AUTO_TRIES} tries"
            )
        if Decision.OFFLOAD in auto.decisions:
            offloaded.append(policy)
        results.append(result)
        totals_full = tot

    if totals_full is None:
        return None, skipped
    notes.extend(skipped)
    if offloaded:
        link = speed_gpu.host_link_gbs
        notes.append(
            f"{', '.join(offloaded)}: offloaded block inputs leave device memory (the offload "
            "code ran on the fake tensors) and take host_bytes of host RAM"
            + ("" if inp.host_budget is None else f" (host_budget {format_bytes(inp.host_budget)})")
            + (
                f"; copies over the host link at {link:g} GB/s each way ({speed_gpu.name}), "
                "overlapped with compute: the part compute does not hide is in the step time"
                if link
                else f"; {speed_gpu.name} has no host link figure: copies not priced"
            )
        )
    if replayed:
        notes.append(
            "blocks are identical, so each policy ran on a few blocks (the first period of its "
            "plan, one more period, the last block) and the middle ones were replayed to full depth ("
            + "; ".join(sorted(replayed))
            + "); full_depth=True runs every block, same numbers"
        )
    notes.extend(static_notes(st, fixed_overhead, speed_gpu, the_gpu))
    if split is not None:
        notes.extend(split.notes(inp.setup))

    report_alts: list[Alternative] = []
    if the_gpu is not None and results and not any(r.fits for r in results):
        fixed = totals_full.weight_bytes + totals_full.grad_bytes + totals_full.optimizer_bytes
        if split is not None and shard_tot is not None:
            fixed = split.fixed_bytes(shard_tot, st.optimizer)
        if (
            fixed + (fixed_overhead if fixed_overhead is not None else CUDA_CONTEXT_BYTES)
            > the_gpu.memory_bytes
        ):
            notes.append(
                f"no checkpointing policy can make this fit {the_gpu.name}: weights, gradients and "
                f"optimizer states alone take {format_bytes(fixed)} of {format_bytes(the_gpu.memory_bytes)}"
            )
        if inp.alternatives:
            frugal = min(results, key=lambda r: (r.peak_bytes, r.activation_bytes)).policy

            def run(alt: TrainingSetup) -> PolicyEstimate | None:
                changed = replace(inp, setup=alt, policies=[frugal], alternatives=False)
                try:
                    report, _ = _estimate(changed, time.perf_counter())
                except ConfigError:  # e.g. a sequence too short for the VLM's images
                    return None
                return None if report is None else report.results[0]

            report_alts = _alternatives(
                inp.setup, frugal, run, fixed_fits=fixed + CUDA_CONTEXT_BYTES < the_gpu.memory_bytes
            )

    return EstimateReport(
        model=spec.name,
        source=spec.source,
        params=totals_full.params,
        trainable_params=totals_full.trainable,
        layers=L,
        setup=inp.setup.to_dict() if split is None else {**inp.setup.to_dict(), **split.to_dict()},
        gpu=None if the_gpu is None else the_gpu.to_dict(),
        speed_gpu=speed_gpu.name,
        results=results,
        alternatives=report_alts,
        notes=notes,
        elapsed_s=time.perf_counter() - t0,
    ), skipped
