"""Side by side on one model and batch: gradckpt's policies and budget plans, and what users would pick instead.

Peers: Hugging Face ``gradient_checkpointing_enable`` (non-reentrant, reentrant, ``every_n_layers``),
plain ``torch.utils.checkpoint`` per block, torch selective activation checkpointing with
torchtitan's op-level save list, ``torch.compile`` with ``activation_memory_budget``, and
activation offloading (torchtune's ``OffloadActivations``, HF ``offload=True``; CUDA only).
gradckpt runs eagerly and composed with ``torch.compile`` (its ``+compile`` rows); the frontier
check compares eager peers with eager gradckpt rows and compiled peers with compiled ones.

Method (the same as ``gradckpt.bench.run_bench``):
1. Every configuration gets its own copy of one freshly built model; the copies share the
   parameter and buffer tensors, so weights are identical and counted once.
2. One warm step per configuration (compiles, selective checkpointing learns what it can drop),
   then one tracked step from the same RNG seed: exact bytes and FLOPs (``gradckpt.measure``;
   for compiled configurations, which dynamo refuses to run under a dispatch mode, the
   allocator's own events), total bytes read and written by ops, and the gradients, compared
   with ``torch.equal`` to those of no checkpointing.
3. The planner is profiled once and solved at each peer's measured peak, so every peer has a
   gradckpt plan made for exactly its memory.
4. ``warmup + repeats`` interleaved rounds, one step per configuration each (no tracker), the
   order rotated every round; the speed cost is the median of per-round ratios to ``none``, in
   process CPU time on a CPU run (one torch thread), in wall-clock time on CUDA.
5. Outputs: ``benchmarks/results/<machine>-<date>.json``, a Markdown table and a PNG frontier.

Run: .venv/bin/python benchmarks/peers.py            (about 8 minutes on 2 shared CPU cores)
     .venv/bin/python benchmarks/peers.py --quick    (a tiny model, for development)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import functools
import inspect
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gradckpt
from gradckpt.bench import machine_info
from gradckpt.measure import count_flops
from gradckpt.models import BenchModel, build_bench_model, make_batch

aten = torch.ops.aten
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 0
MiB = 2**20

#: The default workload: the Llama preset as built (8 layers, hidden 512), one sequence of 512
#: tokens: activations without checkpointing (~190 MiB) outweigh the weights (~129 MiB), so the
#: configurations spread over memory, and the whole run (cold inductor cache included) takes
#: about 8 minutes on 2 shared CPU cores.
DEFAULTS: dict[str, Any] = {
    "model": "llama",
    "layers": 8,
    "batch": 1,
    "seq": 512,
    "repeats": 7,
    "warmup": 0,
}
QUICK: dict[str, Any] = {
    "model": "llama",
    "layers": 2,
    "batch": 1,
    "seq": 64,
    "repeats": 1,
    "warmup": 0,
}

#: Torch threads on a CPU run. On a 2-core machine shared with other jobs, two threads wait on
#: each other at every parallel region: per-round time ratios of identical configurations
#: swung by +-50% with 2 threads and stay within a few % with 1 (measured here, 2026-11).
CPU_THREADS = 1

#: ``activation_memory_budget`` values for the torch.compile peer (0.5: torch's own example; the
#: compiled baseline without checkpointing is the ``none+compile`` row).
COMPILE_BUDGETS = (0.5,)
#: The compiled baseline: no checkpointing, blocks compiled (what plain ``torch.compile`` gives;
#: its graphs' FLOPs are what compiled rows' extra FLOPs are counted against).
COMPILE_REF = "none+compile"


# -- configurations --------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Config:
    """One way of training the model: a gradckpt policy or plan, or a peer tool's setting.

    Attributes:
        label: short name used in tables and the plot.
        family: ``"gradckpt"`` or ``"peer"``.
        what: one line saying what is applied, as a user would write it.
        model: this configuration's model copy (parameters shared with every other copy).
        context: entered around every step (the compile peer's functorch config).
        compiled: the blocks run through ``torch.compile`` (measured from allocator events).
        graph_flops: FLOPs of each graph inductor compiled (``(is_backward, flops)``).
        plan: the gradckpt plan, when there is one.
        matched_peer: for a planner row, the peer whose measured peak was its budget.
        note: anything a reader of the table must know about this row.
    """

    label: str
    family: str
    what: str
    model: nn.Module
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    compiled: bool = False
    graph_flops: list[tuple[bool, int]] = field(default_factory=list)
    plan: gradckpt.Plan | None = None
    matched_peer: str | None = None
    note: str = ""


def copy_sharing_weights(template: nn.Module) -> nn.Module:
    """A deep copy of ``template`` whose parameters and buffers are the template's own tensors."""
    memo: dict[int, Any] = {id(t): t for t in (*template.parameters(), *template.buffers())}
    return copy.deepcopy(template, memo)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in gradckpt.find_blocks(model)]


def wrap_blocks_with_torch_checkpoint(
    model: nn.Module, context_fn: Callable[[], Any] | None = None
) -> None:
    """Plain ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` around each block's forward.

    This is what users write by hand (or what torch's ``checkpoint_wrapper`` does), with an
    instance-level forward override so that state_dict keys do not change.
    """
    from torch.utils.checkpoint import checkpoint, noop_context_fn

    ctx = context_fn or noop_context_fn
    for block in _blocks(model):
        inner = block.forward

        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=ctx, **kwargs)

        block.forward = forward  # type: ignore[method-assign]


def _ops(*names: str) -> set[Any]:
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            out.add(getattr(op, overload or "default"))
    return out


#: torchtitan's op-level SAC save list (``_save_list`` of its llama3 ``parallelize.py``, 2025):
#: matmuls, the attention kernels, and ``max`` (float8 scaling). torchtitan targets CUDA; the CPU
#: attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) is added so that on this
#: machine attention is kept as the recipe intends, not recomputed.
TORCHTITAN_SAVE = _ops(
    "mm",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_flash_attention_for_cpu",
    "max",
)
with contextlib.suppress(AttributeError):
    TORCHTITAN_SAVE.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)


def torchtitan_sac_context(every_other_mm: bool = True) -> Callable[[], Any]:
    """torchtitan's op-level selective AC: keep the save list, recompute every second ``mm``.

    The mm counter is per checkpointed call and per mode (forward vs recompute), as in
    torchtitan, so the recompute makes the same choice as the forward.
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def make() -> Any:
        meta: dict[str, int] = defaultdict(int)

        def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
            key = "recompute_mm" if ctx.is_recompute else "forward_mm"
            if func == aten.mm.default:
                meta[key] += 1
            save = func in TORCHTITAN_SAVE and not (
                every_other_mm and func == aten.mm.default and meta[key] % 2 == 0
            )
            return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    return make


def graph_flops(gm: torch.fx.GraphModule) -> int:
    """FLOPs of one FX graph's aten ops (from the fake values inductor attached to each node).

    Random ops in a compiled checkpoint region (SDPA takes a dropout probability) are wrapped
    in the ``run_and_save_rng_state`` / ``run_with_rng_state`` higher-order ops, which carry
    the real op as an argument: they are counted as that op.
    """
    total = 0

    def val(a: Any) -> Any:
        return a.meta.get("val") if isinstance(a, torch.fx.Node) else a

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        op, args, out = node.target, node.args, node.meta.get("val")
        if str(op) == "run_and_save_rng_state" and args:
            op, args = args[0], args[1:]
            out = out[1] if isinstance(out, (tuple, list)) and len(out) == 2 else None
        elif str(op) == "run_with_rng_state" and len(args) > 1:
            op, args = args[1], args[2:]
        if not isinstance(op, torch._ops.OpOverload):
            continue
        total += count_flops(
            op,
            torch.fx.node.map_aggregate(args, val),
            torch.fx.node.map_aggregate(node.kwargs, val),
            out,
        )
    return total


def _counting_backend(cfg: Config) -> Callable[..., Any]:
    """Inductor, with the FLOPs of each partitioned graph noted in ``cfg.graph_flops``."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def inner(gm: torch.fx.GraphModule, example_inputs: Any, **kw: Any) -> Any:
        cfg.graph_flops.append((bool(kw.get("is_backward")), graph_flops(gm)))
        return compile_fx_inner(gm, example_inputs, **kw)

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        return compile_fx(gm, example_inputs, inner_compile=inner)

    return backend


def compile_blocks(cfg: Config, budget: float) -> None:
    """Compile each block with inductor under ``activation_memory_budget=budget`` (torchtitan style).

    torchtitan compiles per transformer block; every block shares one graph. Dynamo caches by
    code object and does not guard on functorch's config, so each budget gets its own entry
    function (its own code object), else a second budget would silently reuse the first one's
    graphs. FLOPs are counted on the partitioned forward and backward graphs as inductor
    receives them (recomputed ops are in the backward graph).
    """
    backend = _counting_backend(cfg)
    ns: dict[str, Any] = {}
    src = "def call_block(block, *args, **kwargs):\n    return type(block).forward(block, *args, **kwargs)\n"
    exec(compile(src, f"<peers: compiled blocks, budget {budget}>", "exec"), ns)
    compiled = torch.compile(ns["call_block"], backend=backend, fullgraph=True)
    for block in _blocks(cfg.model):

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return compiled(self, *args, **kwargs)

        block.forward = types.MethodType(forward, block)  # type: ignore[method-assign]
    _compile_context(cfg, budget)


def compiled_step_flops(cfg: Config, n_blocks: int) -> int | None:
    """FLOPs of the compiled block graphs over one step (the blocks only), from ``cfg.graph_flops``.

    Blocks with the same decision share one compiled graph. Forward graphs are compiled in the
    order their decision first appears in the blocks, backward graphs in the reverse order
    (backward runs the last block first); so each block's pair of graphs is found from its
    decision. Returns None when the graphs do not match that (a recompile for another reason).

    Example:
        >>> cfg.graph_flops = [(False, 10), (True, 20)]   # one decision for all 8 blocks
        >>> compiled_step_flops(cfg, 8)
        240
    """
    fw = [f for bwd, f in cfg.graph_flops if not bwd]
    bw = [f for bwd, f in cfg.graph_flops if bwd]
    decisions = list(cfg.plan.decisions) if cfg.plan is not None else ["one graph"] * n_blocks
    if len(decisions) != n_blocks:
        return None
    fw_order = list(dict.fromkeys(decisions))
    bw_order = list(dict.fromkeys(reversed(decisions)))
    if len(fw) != len(fw_order) or len(bw) != len(bw_order):
        return None
    return sum(fw[fw_order.index(d)] + bw[bw_order.index(d)] for d in decisions)


def _compile_context(cfg: Config, budget: float) -> None:
    def context() -> contextlib.AbstractContextManager[Any]:
        # The budget is read when the graphs are partitioned; keeping it set around every step
        # means a recompile (should one happen) sees it too. The AOTAutograd cache is off so that
        # the partition (and the FLOP count) really runs for each configuration.
        return torch._functorch.config.patch(
            activation_memory_budget=budget, enable_autograd_cache=False
        )

    cfg.context = context
    cfg.compiled = True


def gradckpt_then_compile(
    cfg: Config, *, policy: str | None = None, plan: gradckpt.Plan | None = None
) -> None:
    """gradckpt first (a policy or a plan), then ``block.compile()`` per block (DESIGN.md's order)."""
    if plan is not None:
        cfg.plan = gradckpt.enable(cfg.model, plan=plan)
    else:
        cfg.plan = gradckpt.enable(cfg.model, policy=policy)
    backend = _counting_backend(cfg)
    for block in _blocks(cfg.model):
        block.compile(backend=backend)
    _compile_context(cfg, 1.0)


def _hf_supports(model: nn.Module, option: str) -> bool:
    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        fn = getattr(model, name, None)
        if fn is not None and option in inspect.signature(fn).parameters:
            return True
    return False


def _hf_enable(model: nn.Module, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        # transformers 5 renamed it activation_checkpointing_enable; users still type this one.
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(**kwargs)  # type: ignore[operator]


@dataclass(slots=True)
class Skipped:
    label: str
    reason: str


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return str(transformers.__version__)


def make_configs(
    template: nn.Module,
    device: torch.device,
    *,
    compile_budgets: Sequence[float] = COMPILE_BUDGETS,
    only: Sequence[str] | None = None,
) -> tuple[list[Config], list[Skipped]]:
    """Every gradckpt policy and every peer that can run here; the rest as ``Skipped`` with why.

    Args:
        template: the freshly built model; each configuration gets a weight-sharing copy.
        device: where the step runs (peers that only make sense on CUDA are skipped elsewhere).
        compile_budgets: ``activation_memory_budget`` values for the torch.compile peer.
        only: labels to keep (for development); ``none`` is always kept.
    """
    cuda = device.type == "cuda"
    configs: list[Config] = []
    skipped: list[Skipped] = []
    wanted = None if only is None else {*only, "none"}
    tv = _transformers_version() or "not installed"
    is_hf = hasattr(template, "gradient_checkpointing_enable")

    def add(label: str, family: str, what: str, setup: Callable[[Config], None]) -> None:
        if wanted is not None and label not in wanted:
            return
        cfg = Config(label=label, family=family, what=what, model=copy_sharing_weights(template))
        setup(cfg)
        configs.append(cfg)

    def skip(label: str, reason: str) -> None:
        if wanted is None or label in wanted:
            skipped.append(Skipped(label, reason))

    def policy(name: str, **options: Any) -> Callable[[Config], None]:
        def setup(cfg: Config) -> None:
            cfg.plan = gradckpt.enable(cfg.model, policy=name, **options)

        return setup

    # gradckpt's named policies ----------------------------------------------------------------
    add(
        "none",
        "gradckpt",
        'gradckpt.enable(model, policy="none") (no checkpointing)',
        policy("none"),
    )
    add("full", "gradckpt", 'gradckpt.enable(model, policy="full")', policy("full"))
    add("every:2", "gradckpt", 'gradckpt.enable(model, policy="every:2")', policy("every:2"))
    add("sqrt", "gradckpt", 'gradckpt.enable(model, policy="sqrt")', policy("sqrt"))
    add("selective", "gradckpt", 'gradckpt.enable(model, policy="selective")', policy("selective"))
    if cuda:
        add("offload", "gradckpt", 'gradckpt.enable(model, policy="offload")', policy("offload"))
        add(
            "none+offload_saved",
            "gradckpt",
            'gradckpt.enable(model, policy="none", offload_saved=True)',
            policy("none", offload_saved=True),
        )
    else:
        skip("offload", "CPU-only run: no device memory to offload from; identical to full here")
        skip("none+offload_saved", "CPU-only run: no device memory to offload from")

    # Hugging Face ------------------------------------------------------------------------------
    if is_hf:
        add(
            "hf",
            "peer",
            'model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})'
            f" (transformers {tv}; also its default)",
            lambda c: _hf_enable(c.model, gradient_checkpointing_kwargs={"use_reentrant": False}),
        )
        add(
            "hf-reentrant",
            "peer",
            'model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})'
            " (what torch's own default gives with gradient_checkpointing_kwargs={})",
            lambda c: _hf_enable(c.model, gradient_checkpointing_kwargs={"use_reentrant": True}),
        )
        if _hf_supports(template, "every_n_layers"):
            add(
                "hf-every2",
                "peer",
                "model.gradient_checkpointing_enable(every_n_layers=2)",
                lambda c: _hf_enable(c.model, every_n_layers=2),
            )
        else:
            skip("hf-every2", f"transformers {tv} has no every_n_layers option")
        if not _hf_supports(template, "offload"):
            skip("hf-offload", f"transformers {tv} has no offload option")
        elif cuda:
            add(
                "hf-offload",
                "peer",
                "model.activation_checkpointing_enable(offload=True)",
                _hf_offload,
            )
        else:
            skip(
                "hf-offload",
                "CPU-only run: save_on_cpu copies CPU tensors to CPU (and pins them), nothing is freed",
            )
    else:
        for label in ("hf", "hf-reentrant", "hf-every2", "hf-offload"):
            skip(label, "not a Hugging Face model")

    # torch -------------------------------------------------------------------------------------
    add(
        "torch-ckpt",
        "peer",
        "torch.utils.checkpoint.checkpoint(block.forward, ..., use_reentrant=False) per block",
        lambda c: wrap_blocks_with_torch_checkpoint(c.model),
    )
    add(
        "torch-sac-titan",
        "peer",
        "torch SAC, torchtitan op list (mm, SDPA, max), every 2nd mm recomputed, per block",
        lambda c: wrap_blocks_with_torch_checkpoint(c.model, torchtitan_sac_context(True)),
    )
    add(
        "torch-sac-mm",
        "peer",
        "torch SAC, torchtitan op list, every mm kept, per block",
        lambda c: wrap_blocks_with_torch_checkpoint(c.model, torchtitan_sac_context(False)),
    )
    if compile_budgets:
        for name in ("none", "full", "selective"):
            add(
                f"{name}+compile",
                "gradckpt",
                f'gradckpt.enable(model, policy="{name}"), then block.compile() per block (inductor)'
                + (" = plain torch.compile per block, no checkpointing" if name == "none" else ""),
                functools.partial(gradckpt_then_compile, policy=name),
            )
    for b in sorted(compile_budgets, reverse=True):
        label = f"compile@{b:g}"
        add(
            label,
            "peer",
            f"torch.compile per block (inductor), torch._functorch.config.activation_memory_budget={b:g}",
            functools.partial(_compile_setup, budget=b),
        )
    if cuda:
        add(
            "offload-acts",
            "peer",
            "torch.autograd.graph.save_on_cpu(pin_memory=True) around forward "
            "(torchtune's OffloadActivations without its side streams)",
            _offload_acts,
        )
    else:
        skip(
            "offload-acts",
            "torchtune OffloadActivations / save_on_cpu: CUDA-only value; on a CPU-only host the "
            "'device' is host memory, so offloading frees nothing (and pinning doubles it)",
        )
    return configs, skipped


def _hf_offload(cfg: Config) -> None:
    model: Any = cfg.model
    model.activation_checkpointing_enable(offload=True)


def _compile_setup(cfg: Config, *, budget: float) -> None:
    compile_blocks(cfg, budget)


def _offload_acts(cfg: Config) -> None:
    def context() -> contextlib.AbstractContextManager[Any]:
        return torch.autograd.graph.save_on_cpu(pin_memory=True)

    cfg.context = context


# -- measuring ---------------------------------------------------------------------------------


class OpBytes(TorchDispatchMode):
    """Counts bytes read and written by every non-view op (inputs plus outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False):
            for t in tree_flatten((args, kwargs or {}, out))[0]:
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(cfg: Config, batch: dict[str, torch.Tensor]) -> None:
    """Forward and backward (gradients set to None first, outside any measurement)."""
    with cfg.context():
        with torch.profiler.record_function("peers::forward"):
            loss = cfg.model(**batch).loss
        with torch.profiler.record_function("peers::backward"):
            loss.backward()


def allocator_step(
    cfg: Config, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[int, int]:
    """(peak, activation) bytes above the step's start, from the allocator itself.

    On CUDA: the caching allocator's statistics. On CPU: the profiler's allocation events
    (every ``c10`` CPU allocation and free, in order), summed; the activation bytes are the sum
    when the backward marker starts. This sees inductor's buffers, which bypass the dispatcher.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with cfg.context():
            loss = cfg.model(**batch).loss
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - base
            loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, held
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(cfg, batch)
    events = list(prof.profiler.kineto_results.events())  # type: ignore[union-attr]
    bwd = min((e.start_ns() for e in events if e.name() == "peers::backward"), default=None)
    mem = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    cur = peak = 0
    act: int | None = None
    for e in mem:
        if act is None and bwd is not None and e.start_ns() >= bwd:
            act = cur
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, act if act is not None else cur


@dataclass(slots=True, kw_only=True)
class Tracked:
    """What one tracked step of one configuration cost (bytes above the step's start)."""

    peak_delta: int
    activation_bytes: int
    source: str
    total_flops: int | None = None
    recompute_flops: int | None = None
    recompute_bytes: int | None = None
    op_bytes: int | None = None
    grads_equal: bool | None = None
    grad_max_abs_diff: float | None = None
    alloc_peak_delta: int | None = None


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def _compare(
    grads: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor | None]
) -> tuple[bool, float]:
    equal, diff = True, 0.0
    for name, g in grads.items():
        r = ref.get(name)
        if g is None or r is None:
            if g is not r:
                equal, diff = False, float("inf")
            continue
        if not torch.equal(g, r):
            equal = False
            diff = max(diff, float((g.double() - r.double()).abs().max()))
    return equal, diff


def track(
    cfg: Config,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    ref_grads: dict[str, torch.Tensor | None] | None,
    *,
    calibrate: bool = False,
) -> Tracked:
    """One warm step, then one tracked step from seed ``SEED``; gradients compared to ``ref_grads``."""
    cfg.model.zero_grad(set_to_none=True)
    _step(cfg, batch)  # warm: compiles, lazily-created state, selective learning
    cfg.model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    if cfg.compiled:
        peak, act = allocator_step(cfg, batch, device)
        out = Tracked(peak_delta=peak, activation_bytes=act, source="allocator")
    else:
        counter = OpBytes()

        def step() -> None:
            with counter:
                _step(cfg, batch)

        st = gradckpt.measure(step, model=cfg.model, device=device)
        out = Tracked(
            peak_delta=st.peak_bytes - st.baseline_bytes,
            activation_bytes=st.activation_bytes,
            source="gradckpt.measure",
            total_flops=st.total_flops,
            recompute_flops=st.recompute_flops,
            recompute_bytes=st.recompute_bytes,
            op_bytes=counter.bytes,
        )
        if calibrate:  # the allocator's view of the same step, to show both methods agree
            cfg.model.zero_grad(set_to_none=True)
            torch.manual_seed(SEED)
            out.alloc_peak_delta = allocator_step(cfg, batch, device)[0]
    if ref_grads is not None:
        out.grads_equal, out.grad_max_abs_diff = _compare(_grads(cfg.model), ref_grads)
    return out


def time_rounds(
    configs: Sequence[Config],
    batch: dict[str, torch.Tensor],
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    progress: Callable[[str], None],
) -> dict[str, dict[str, list[float]]]:
    """``warmup + repeats`` rounds, one step per configuration each, order rotated per round.

    Returns:
        ``{"wall": ..., "cpu": ...}``: per configuration label, its steps' wall-clock and process
        CPU seconds, in round order.
    """
    times: dict[str, list[float]] = {c.label: [] for c in configs}
    cpu: dict[str, list[float]] = {c.label: [] for c in configs}
    n = len(configs)
    for r in range(warmup + repeats):
        k = r % n
        progress(f"round {r + 1}/{warmup + repeats}" + (" (warmup)" if r < warmup else ""))
        for cfg in [*configs[k:], *configs[:k]]:
            cfg.model.zero_grad(set_to_none=True)
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            _step(cfg, batch)
            _sync(device)
            if r >= warmup:
                times[cfg.label].append(time.perf_counter() - t0)
                cpu[cfg.label].append(time.process_time() - c0)
    return {"wall": times, "cpu": cpu}


# -- the planner at each peer's memory -----------------------------------------------------------


def budget_configs(
    template: nn.Module,
    batch: dict[str, torch.Tensor],
    targets: Sequence[tuple[str, int, bool]],
    existing: Sequence[Config],
    progress: Callable[[str], None],
) -> tuple[list[Config], list[dict[str, Any]], list[Skipped]]:
    """gradckpt's auto plan at each peer's measured peak (bytes above the step's start).

    The planner's budgets are absolute (it counts what was live when it profiled); the peer's
    peak above its step's start is moved into that frame by adding the planner's own start
    level. For a compiled peer (``targets`` entries are ``(label, peak, compiled)``) the plan
    is applied, then the blocks are compiled; the planner profiles eager code, so when the
    compiled peer's peak is below anything eager can reach (fused kernels leave smaller
    temporaries), the planner's leanest plan is used instead. A plan identical to an existing
    configuration's is not measured twice: it is recorded as an alias.

    Returns:
        (new configurations, aliases ``{"label", "same_as", "peer"}``, budgets nothing fits).
    """
    from gradckpt.errors import BudgetError
    from gradckpt.planner.api import auto_plan, profile_model
    from gradckpt.planner.solve import min_peak

    model = copy_sharing_weights(template)
    progress("profile for the planner")
    prof = profile_model(model, batch, blocks=gradckpt.find_blocks(model))
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    start = prof.fixed_bytes - grads  # live bytes when the planner's step started
    out: list[Config] = []
    aliases: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    known: dict[tuple[Any, ...], str] = {}
    for c in existing:
        if c.plan is not None and not c.plan.options:
            known[(c.plan.decisions, c.plan.segments, c.compiled)] = c.label
    for peer, delta, compiled in targets:
        label = f"auto@{peer}" + ("+compile" if compiled else "")
        asked = f"budget=<{peer}'s peak>"
        try:
            plan = auto_plan(prof, start + delta)
        except BudgetError:
            sol = min_peak(prof)
            if not compiled:
                skipped.append(
                    Skipped(
                        label,
                        f"no plan fits {peer}'s peak ({delta / MiB:.2f} MiB above the step's "
                        f"start): the planner's leanest plan is predicted at "
                        f"{(sol.peak - start) / MiB:.2f} MiB ({(sol.peak - start - delta) / 2**10:.0f} KiB more)",
                    )
                )
                continue
            plan = gradckpt.Plan(
                prof.blocks,
                sol.decisions,
                policy="auto",
                notes={"predicted_peak_bytes": sol.peak},
            )
            asked = "the planner's leanest plan"
        key = (plan.decisions, plan.segments, compiled)
        if key in known:
            aliases.append({"label": label, "same_as": known[key], "peer": peer})
            continue
        cfg = Config(
            label=label,
            family="gradckpt",
            what=f"gradckpt.enable(model, {asked}) -> {plan.summary()}"
            + (", then block.compile() per block (inductor)" if compiled else ""),
            model=copy_sharing_weights(template),
            matched_peer=peer,
        )
        if compiled:
            gradckpt_then_compile(cfg, plan=plan)
        else:
            cfg.plan = gradckpt.enable(cfg.model, plan=plan)
        predicted = plan.notes.get("predicted_peak_bytes")
        if isinstance(predicted, int):
            cfg.note = f"planner predicted peak {(predicted - start) / MiB:.1f} MiB above start"
            if compiled:
                cfg.note += " (eager)"
        known[key] = label
        out.append(cfg)
    del model
    return out, aliases, skipped


# -- analysis ------------------------------------------------------------------------------------


def _iqr(xs: Sequence[float]) -> float:
    if len(xs) < 4:
        return (max(xs) - min(xs)) if len(xs) > 1 else 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def frontier_verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each peer point: the cheapest gradckpt point that fits its memory, and the verdict.

    Like is compared with like: an eager peer with gradckpt's eager rows, a compiled peer
    (``compiled: True``) with gradckpt's compiled rows (gradckpt then ``torch.compile``), since
    compiling is a separate choice a user makes with or without gradckpt.
    The best such point is the one with the least speed cost. The margin is how much slower it
    is than the peer: the median over rounds of the difference of the two per-round ratios
    (paired: both ran in the same round) when the rows carry ``ratios``, else the difference of
    their speed costs; the noise is half the interquartile range of those paired differences
    (else half the sum of the two rows' ``speed_cost_iqr``). A peer is *dominated* when the
    margin is <= 0, *within noise* when it is at most the noise, else *not dominated*. Pure.

    Args:
        rows: result rows with ``label``, ``family``, ``peak_bytes``, ``speed_cost``,
            ``speed_cost_iqr``, optionally ``compiled`` and ``ratios`` (per round, to ``none``).

    Returns:
        One dict per peer row: ``peer``, ``peer_peak_bytes``, ``peer_cost``, ``best`` (label or
        None), ``best_peak_bytes``, ``best_cost``, ``margin``, ``noise``, ``paired`` and
        ``verdict`` (``"dominated"``, ``"within noise"``, ``"not dominated"``,
        ``"nothing fits"``).

    Example:
        >>> frontier_verdicts([
        ...     {"label": "full", "family": "gradckpt", "peak_bytes": 10, "speed_cost": 0.3, "speed_cost_iqr": 0},
        ...     {"label": "hf", "family": "peer", "peak_bytes": 10, "speed_cost": 0.35, "speed_cost_iqr": 0},
        ... ])[0]["verdict"]
        'dominated'
    """
    ours = [r for r in rows if r["family"] == "gradckpt"]
    out = []
    for p in rows:
        if p["family"] != "peer":
            continue
        fits = [
            g
            for g in ours
            if g["peak_bytes"] <= p["peak_bytes"]
            and bool(g.get("compiled")) == bool(p.get("compiled"))
        ]
        v: dict[str, Any] = {
            "peer": p["label"],
            "peer_peak_bytes": p["peak_bytes"],
            "peer_cost": p["speed_cost"],
            "best": None,
            "best_peak_bytes": None,
            "best_cost": None,
            "margin": None,
            "noise": None,
            "paired": False,
            "verdict": "nothing fits",
        }
        if fits:
            best = min(fits, key=lambda g: (g["speed_cost"], g["peak_bytes"]))
            rb, rp = best.get("ratios"), p.get("ratios")
            paired = bool(rb and rp and len(rb) == len(rp) and len(rb) >= 2)
            if paired:
                diffs = [a - b for a, b in zip(rb, rp)]  # type: ignore[arg-type]
                margin = statistics.median(diffs)
                noise = _iqr(diffs) / 2
            else:
                margin = best["speed_cost"] - p["speed_cost"]
                noise = (best.get("speed_cost_iqr", 0.0) + p.get("speed_cost_iqr", 0.0)) / 2
            verdict = (
                "dominated"
                if margin <= 0
                else "within noise"
                if margin <= noise
                else "not dominated"
            )
            v.update(
                best=best["label"],
                best_peak_bytes=best["peak_bytes"],
                best_cost=best["speed_cost"],
                margin=margin,
                noise=noise,
                paired=paired,
                verdict=verdict,
            )
        out.append(v)
    return out


def pareto(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both peak bytes and speed cost, by increasing cost."""
    best: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda r: (r["speed_cost"], r["peak_bytes"])):
        if not best or p["peak_bytes"] < best[-1]["peak_bytes"]:
            best.append(p)
    return best


# -- the run -------------------------------------------------------------------------------------


def _state_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    seen: set[int] = set()
    n = 0
    for t in (*model.parameters(), *model.buffers(), *batch.values()):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            n += st.nbytes()
    return n


def max_dropout(model: nn.Module) -> float:
    """The largest dropout probability the model applies in training (modules and HF config)."""
    ps = [float(m.p) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)):
            ps.append(float(v))
    return max(ps, default=0.0)


def machine_slug(device: torch.device) -> str:
    """A file-name-safe name for the machine kind, e.g. ``cpu2-x86_64`` or ``nvidia-a100-...``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    return f"cpu{os.cpu_count()}-{platform.machine()}"


def run_peers(
    *,
    model: str = DEFAULTS["model"],
    layers: int | None = DEFAULTS["layers"],
    batch: int = DEFAULTS["batch"],
    seq: int = DEFAULTS["seq"],
    repeats: int = DEFAULTS["repeats"],
    warmup: int = DEFAULTS["warmup"],
    compile_budgets: Sequence[float] = COMPILE_BUDGETS,
    only: Sequence[str] | None = None,
    device: str | None = None,
    threads: int | None = None,
    clock: str | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Measure every configuration; return the results as plain data (what the JSON holds).

    Args:
        model, layers, batch, seq: the workload (a ``gradckpt.models`` bench preset).
        repeats, warmup: timed and untimed interleaved rounds.
        compile_budgets: ``activation_memory_budget`` values for the compile peer (``()``: no
            compiled configuration at all).
        only: configuration labels to keep (development).
        device: ``"cpu"`` or ``"cuda"`` (default: CUDA when available).
        threads: torch threads (default on CPU: ``CPU_THREADS``).
        clock: ``"cpu"`` (process CPU time) or ``"wall"`` for the speed cost (default: CPU time
            on a CPU run, where with one thread it is the compute time and is not inflated by
            other processes' time slices; wall clock on CUDA).
        progress: called with a short status line.

    Example:
        >>> res = run_peers(layers=2, batch=1, seq=32, repeats=1, warmup=0, compile_budgets=())
        >>> [r["label"] for r in res["rows"]][:2]
        ['none', 'full']
    """
    t_start = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads is None and dev.type == "cpu":
        threads = CPU_THREADS
    if threads is not None:
        torch.set_num_threads(threads)
    bm: BenchModel = build_bench_model(model, layers=layers, seed=SEED)
    template = bm.model.to(dev).train()
    data = make_batch(bm, batch, seq)
    configs, skipped = make_configs(template, dev, compile_budgets=compile_budgets, only=only)
    if configs[0].label != "none":
        raise RuntimeError("the first configuration must be 'none' (the reference)")

    tracked: dict[str, Tracked] = {}
    ref: dict[str, torch.Tensor | None] | None = None
    for cfg in configs:
        progress(f"measure {cfg.label}")
        t = track(cfg, data, dev, ref, calibrate=cfg.label == "none")
        tracked[cfg.label] = t
        if ref is None:
            ref = {
                n: (g.detach().clone() if g is not None else None)
                for n, g in _grads(cfg.model).items()
            }
            t.grads_equal, t.grad_max_abs_diff = True, 0.0
    compile_ref = COMPILE_REF
    compile_grads = None
    if compile_ref in tracked:  # the compiled baseline's grads, to compare compiled budgets with
        c = next(c for c in configs if c.label == compile_ref)
        c.model.zero_grad(set_to_none=True)
        torch.manual_seed(SEED)
        _step(c, data)
        compile_grads = {
            n: (g.detach().clone() if g is not None else None) for n, g in _grads(c.model).items()
        }

    targets = sorted(
        ((c.label, tracked[c.label].peak_delta, c.compiled) for c in configs if c.family == "peer"),
        key=lambda x: x[1],
    )
    aliases: list[dict[str, Any]] = []
    if targets:
        extra, aliases, budget_skipped = budget_configs(template, data, targets, configs, progress)
        skipped.extend(budget_skipped)
        for cfg in extra:
            progress(f"measure {cfg.label}")
            tracked[cfg.label] = track(cfg, data, dev, ref)
        configs.extend(extra)

    vs_compiled: dict[str, tuple[bool, float]] = {}
    for cfg in configs:
        if cfg.compiled and compile_grads is not None and cfg.label != compile_ref:
            cfg.model.zero_grad(set_to_none=True)
            torch.manual_seed(SEED)
            _step(cfg, data)
            vs_compiled[cfg.label] = _compare(_grads(cfg.model), compile_grads)
    ref = compile_grads = None

    times = time_rounds(configs, data, dev, repeats=repeats, warmup=warmup, progress=progress)
    for cfg in configs:
        cfg.model.zero_grad(set_to_none=True)
    if clock is None:
        clock = "cpu" if dev.type == "cpu" else "wall"
    if clock not in times:
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")

    state = _state_bytes(template, data)
    base = tracked["none"]
    flops_of_compiled_ref = None
    if compile_ref in tracked:
        c = next(c for c in configs if c.label == compile_ref)
        flops_of_compiled_ref = compiled_step_flops(c, len(gradckpt.find_blocks(template)))
    n_blocks = len(gradckpt.find_blocks(template))

    def ratios(label: str, clk: str, ref_label: str = "none") -> list[float]:
        return [a / b for a, b in zip(times[clk][label], times[clk][ref_label])]

    rows = []
    for cfg in configs:
        t = tracked[cfg.label]
        extra_flops: int | None = None
        extra_bytes: int | None = None
        if t.total_flops is not None and base.total_flops is not None:
            extra_flops = t.total_flops - base.total_flops
        elif cfg.compiled and flops_of_compiled_ref is not None:
            own = compiled_step_flops(cfg, n_blocks)
            extra_flops = None if own is None else own - flops_of_compiled_ref
        if t.op_bytes is not None and base.op_bytes is not None:
            extra_bytes = t.op_bytes - base.op_bytes
        note = cfg.note
        if cfg.compiled:
            vs = ""
            if compile_ref in tracked and cfg.label != compile_ref:
                r_c = statistics.median(ratios(cfg.label, clock, compile_ref)) - 1
                vs = f"speed cost vs {compile_ref}: {r_c * 100:+.1f}%"
            note = "; ".join(
                x
                for x in (
                    "memory from the allocator's events (dynamo does not run under gradckpt.measure's dispatch mode)",
                    f"extra FLOPs counted on the compiled block graphs, relative to {compile_ref}'s",
                    "bytes moved not counted (fused kernels)",
                    vs,
                    note,
                )
                if x
            )
        same_c, diff_c = vs_compiled.get(cfg.label, (None, None))
        rows.append(
            {
                "label": cfg.label,
                "family": cfg.family,
                "what": cfg.what,
                "plan": cfg.plan.summary() if cfg.plan is not None else None,
                "matched_peer": cfg.matched_peer,
                "compiled": cfg.compiled,
                "peak_bytes": state + t.peak_delta,
                "peak_delta_bytes": t.peak_delta,
                "activation_bytes": t.activation_bytes,
                "memory_source": t.source,
                "alloc_peak_delta_bytes": t.alloc_peak_delta,
                "time_s": statistics.median(times["wall"][cfg.label]),
                "cpu_time_s": statistics.median(times["cpu"][cfg.label]),
                "speed_cost": statistics.median(ratios(cfg.label, clock)) - 1.0,
                "ratios": ratios(cfg.label, clock),
                "speed_cost_iqr": _iqr(ratios(cfg.label, clock)),
                "speed_cost_wall": statistics.median(ratios(cfg.label, "wall")) - 1.0,
                "speed_cost_cpu": statistics.median(ratios(cfg.label, "cpu")) - 1.0,
                "extra_flops": extra_flops,
                "extra_bytes": extra_bytes,
                "recompute_bytes": t.recompute_bytes if cfg.family == "gradckpt" else None,
                "grads_equal": t.grads_equal,
                "grad_max_abs_diff": t.grad_max_abs_diff,
                "compiled_graph_flops": [list(x) for x in cfg.graph_flops],
                "grads_equal_compile_ref": same_c,
                "grad_max_abs_diff_compile_ref": diff_c,
                "note": note,
                "times_s": times["wall"][cfg.label],
                "cpu_times_s": times["cpu"][cfg.label],
            }
        )
    mi = machine_info()
    mi["transformers"] = _transformers_version()
    mi["cpu_count"] = os.cpu_count()
    mi["slug"] = machine_slug(dev)
    return {
        "schema": 1,
        "date": dt.date.today().isoformat(),
        "machine": mi,
        "settings": {
            "model": bm.name,
            "layers": n_blocks,
            "batch": batch,
            "seq": seq,
            "repeats": repeats,
            "warmup": warmup,
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "clock": clock,
            "parameters": sum(p.numel() for p in template.parameters()),
            "state_bytes": state,
            "dropout": max_dropout(template),
            "seed": SEED,
        },
        "rows": rows,
        "aliases": aliases,
        "skipped": [{"label": s.label, "reason": s.reason} for s in skipped],
        "frontier": frontier_verdicts(rows),
        "runtime_s": time.perf_counter() - t_start,
    }


# -- output --------------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / MiB:.1f}"


def _grads_cell(r: dict[str, Any], dropout: float = 0.0) -> str:
    if r["grads_equal"]:
        return "yes"
    if r["grads_equal"] is None:
        return "n/a"
    diff = f"max abs diff {r['grad_max_abs_diff']:.2g}"
    if not r.get("compiled"):
        return f"**NO** ({diff})"
    same = r.get("grads_equal_compile_ref")
    if dropout > 0:
        # inductor draws dropout masks from its own generator, seeded per compiled graph
        tail = "" if same is None else f"; == `{COMPILE_REF}`: " + ("yes" if same else "no (RNG)")
        return f"not comparable: {diff} (inductor's own dropout RNG){tail}"
    tail = "" if same is None else f"; == `{COMPILE_REF}`: " + ("yes" if same else "**NO**")
    return f"no: {diff} (inductor's rounding){tail}"


_CLOCKS = {
    "cpu": "process CPU time (one torch thread: the compute time, not inflated by other "
    "processes' time slices on this shared machine; wall-clock ratios are in the JSON)",
    "wall": "wall-clock time (synchronized)",
}


def closing_notes(res: dict[str, Any]) -> list[str]:
    """One line per peer that gradckpt's frontier does not dominate, with the measured facts. Pure."""
    rows = {r["label"]: r for r in res["rows"]}
    notes = []
    for v in res["frontier"]:
        if v["verdict"] == "dominated":
            continue
        p = rows[v["peer"]]
        mode = "compiled" if p.get("compiled") else "eager"
        where = f"`{v['peer']}` ({_mib(v['peer_peak_bytes'])} MiB, {v['peer_cost'] * 100:+.1f}%): "
        how = "per round, paired" if v.get("paired") else "by median"
        if v["verdict"] == "within noise":
            notes.append(
                where + f"`{v['best']}` fits its memory and is {v['margin'] * 100:.1f} points "
                f"slower ({how}), within the timing noise (± {v['noise'] * 100:.1f} points)."
            )
            continue
        same = [
            r
            for r in res["rows"]
            if r["family"] == "gradckpt" and bool(r.get("compiled")) == bool(p.get("compiled"))
        ]
        facts = []
        if v["best"] is None:
            low = min(same, key=lambda r: r["peak_bytes"], default=None)
            facts.append(
                f"no {mode} gradckpt row is as small"
                + (
                    ""
                    if low is None
                    else f" (the smallest is `{low['label']}`, "
                    f"{_mib(low['peak_bytes'] - p['peak_bytes'])} MiB more)"
                )
            )
        else:
            b = rows[v["best"]]
            facts.append(
                f"the cheapest {mode} gradckpt row that fits is `{v['best']}` at "
                f"{v['best_cost'] * 100:+.1f}%, {v['margin'] * 100:.1f} points slower ({how}, "
                f"noise ± {v['noise'] * 100:.1f})"
            )
            if (
                p["extra_flops"] is not None
                and b["extra_flops"] is not None
                and b["extra_flops"] > p["extra_flops"]
            ):
                facts.append(
                    f"it recomputes {b['extra_flops'] / 1e9:.2f} GFLOP where `{v['peer']}` "
                    f"recomputes {p['extra_flops'] / 1e9:.2f}"
                )
        notes.append(where + "; ".join(facts) + ".")
    return notes


def render_markdown(res: dict[str, Any], *, png: str | None = None) -> str:
    """The results as Markdown: settings, table, skipped peers, frontier verdicts, notes. Pure."""
    s, m = res["settings"], res["machine"]
    clock = s.get("clock", "wall")
    lines = [
        f"Measured {res['date']} on `{m['slug']}` ({m['processor']}, {m['cpu_count']} cores"
        + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"), torch {m['torch']}, transformers {m.get('transformers')}, Python {m['python']}.",
        f"Model: `{s['model']}` preset, {s['layers']} layers, {s['parameters'] / 1e6:.1f} M "
        f"parameters; batch {s['batch']} x seq {s['seq']}, fp32, dropout "
        f"{s.get('dropout', 0.0):g}, {s['device']}, "
        f"{_threads(s.get('threads', m['threads']))}; {s['repeats']} timed rounds "
        f"(+{s['warmup']} warmup), every configuration once per round, order rotated. "
        f"Peak = weights, buffers and batch ({_mib(s['state_bytes'])} MiB) + the step's peak "
        "above them (gradients included). Speed cost = median over rounds of (step time / "
        f"`none`'s step time in the same round) - 1, from {_CLOCKS.get(clock, clock)}; "
        "± is half the interquartile range of those ratios.",
        "",
    ]
    if png:
        lines += [f"![memory vs speed cost]({png})", ""]
    lines += [
        "| configuration | peak MiB | activations MiB | step s (wall) | speed cost | extra GFLOP "
        "| extra MiB moved | grads == none |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        name = f"`{r['label']}`" + (" (peer)" if r["family"] == "peer" else "")
        gflop = "" if r["extra_flops"] is None else f"{r['extra_flops'] / 1e9:.2f}"
        lines.append(
            f"| {name} | {_mib(r['peak_bytes'])} | {_mib(r['activation_bytes'])} | "
            f"{r['time_s']:.2f} | {r['speed_cost'] * 100:+.1f}% ± {r['speed_cost_iqr'] * 50:.1f} "
            f"| {gflop} | {_mib(r['extra_bytes'])} | {_grads_cell(r, s.get('dropout', 0.0))} |"
        )
    lines += ["", "What each row runs:", ""]
    by = {r["label"]: r for r in res["rows"]}
    for r in res["rows"]:
        extra = f" {r['note']}." if r["note"] else ""
        full = by.get("full")
        if (
            r["label"].startswith("torch-sac")
            and full is not None
            and r["extra_bytes"] is not None
            and r["extra_bytes"] == full["extra_bytes"]
        ):
            extra += (
                " On this model the save list matches none of the block's ops, so it recomputes "
                "exactly what `full` does."
            )
        lines.append(f"- `{r['label']}`: {r['what']}.{extra}")
    for a in res.get("aliases", []):
        lines.append(
            f"- `{a['label']}`: the planner's plan at `{a['peer']}`'s peak is the same plan as "
            f"`{a['same_as']}` (measured once)."
        )
    if res["skipped"]:
        lines += ["", "Skipped here:", ""]
        lines += [f"- `{x['label']}`: {x['reason'].rstrip('.')}." for x in res["skipped"]]
    lines += [
        "",
        "Frontier check: for each peer, the cheapest gradckpt policy or plan whose peak is no "
        "larger (*dominated*: it is also no slower):",
        "",
        "| peer | peer peak MiB | peer cost | cheapest gradckpt that fits | its peak MiB "
        "| its cost | verdict |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for v in res["frontier"]:
        best = f"`{v['best']}`" if v["best"] else "none fits"
        cost = "" if v["best_cost"] is None else f"{v['best_cost'] * 100:+.1f}%"
        lines.append(
            f"| `{v['peer']}` | {_mib(v['peer_peak_bytes'])} | {v['peer_cost'] * 100:+.1f}% | "
            f"{best} | {_mib(v['best_peak_bytes'])} | {cost} | {v['verdict']} |"
        )
    notes = closing_notes(res)
    if notes:
        lines += ["", "Where gradckpt's frontier is not below a peer:", ""]
        lines += [f"- {n}" for n in notes]
    else:
        lines += ["", "gradckpt's frontier is at or below every peer point."]
    flags = (
        ""
        if _is_default(res)
        else f" --model {s['model']} --layers {s['layers']} --batch {s['batch']} "
        f"--seq {s['seq']} --repeats {s['repeats']} --warmup {s['warmup']}"
    )
    readme = (
        ", then `python benchmarks/render_readme.py`" if s["model"] == DEFAULTS["model"] else ""
    )
    lines += [
        "",
        f"Whole run: {res['runtime_s'] / 60:.1f} min. Reproduce: "
        f"`python benchmarks/peers.py{flags}`{readme}.",
    ]
    return "\n".join(lines) + "\n"


def _threads(n: int) -> str:
    return f"{n} torch thread" + ("" if n == 1 else "s")


def _is_default(res: dict[str, Any]) -> bool:
    s = res["settings"]
    return all(
        s[k] == DEFAULTS[k] for k in ("model", "layers", "batch", "seq", "repeats", "warmup")
    )


def plot(res: dict[str, Any], path: Path) -> Path:
    """Peak memory against speed cost: gradckpt's frontiers as lines, peers as points.

    Eager and compiled rows are drawn separately (filled vs hollow markers, solid vs dashed
    frontier), as the frontier check compares them separately.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for compiled, style, mode in ((False, "-", "eager"), (True, "--", "+ torch.compile")):
        ours = [
            r for r in rows if r["family"] == "gradckpt" and bool(r.get("compiled")) == compiled
        ]
        peers = [r for r in rows if r["family"] == "peer" and bool(r.get("compiled")) == compiled]
        face = "none" if compiled else None
        front = pareto(ours)
        # staircase: a point's memory holds until the next (cheaper in memory) point's cost
        xs: list[float] = []
        ys: list[float] = []
        for i, p in enumerate(front):
            xs.append(p["speed_cost"] * 100)
            ys.append(p["peak_bytes"] / MiB)
            if i + 1 < len(front):
                xs.append(front[i + 1]["speed_cost"] * 100)
                ys.append(p["peak_bytes"] / MiB)
        if xs:
            ax.plot(xs, ys, style, color="tab:blue", alpha=0.6, zorder=2)
            ax.scatter(
                [r["speed_cost"] * 100 for r in ours],
                [r["peak_bytes"] / MiB for r in ours],
                edgecolors="tab:blue",
                facecolors=face or "tab:blue",
                s=32,
                zorder=3,
                label=f"gradckpt ({mode}) and its frontier",
            )
        if peers:
            ax.scatter(
                [r["speed_cost"] * 100 for r in peers],
                [r["peak_bytes"] / MiB for r in peers],
                edgecolors="tab:red",
                facecolors=face or "tab:red",
                marker="s",
                s=36,
                zorder=3,
                label=f"peers ({mode})",
            )
    for r in rows:
        ax.annotate(
            r["label"],
            (r["speed_cost"] * 100, r["peak_bytes"] / MiB),
            textcoords="offset points",
            xytext=(4, 3),
            fontsize=7,
            color="tab:red" if r["family"] == "peer" else "tab:blue",
        )
    s, m = res["settings"], res["machine"]
    ax.set_title(
        f"{s['model']} {s['layers']} layers, batch {s['batch']} x {s['seq']}, fp32, "
        f"{m['slug']}, torch {m['torch']}",
        fontsize=9,
    )
    clock = "CPU time" if s.get("clock") == "cpu" else "wall clock"
    ax.set_xlabel(f"speed cost vs no checkpointing (%, median of paired {clock} ratios)")
    ax.set_ylabel("peak memory (MiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def refresh(res: dict[str, Any]) -> dict[str, Any]:
    """Recompute what is derived from the measurements (per-round ratios, frontier verdicts)."""
    clock = res["settings"].get("clock", "wall")
    key = "cpu_times_s" if clock == "cpu" else "times_s"
    base = next(r for r in res["rows"] if r["label"] == "none")[key]
    for r in res["rows"]:
        r["ratios"] = [t / b for t, b in zip(r[key], base)]
    res["frontier"] = frontier_verdicts(res["rows"])
    return res


def write_outputs(res: dict[str, Any], out_dir: Path, stem: str | None = None) -> list[Path]:
    """Write ``<stem>.json``, ``.md`` and ``.png`` into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if stem is None:
        stem = f"{res['machine']['slug']}-{res['date']}"
        if res["settings"]["model"] != DEFAULTS["model"]:
            stem += f"-{res['settings']['model']}"
    js, md, png = (out_dir / f"{stem}{ext}" for ext in (".json", ".md", ".png"))
    js.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, png)
    md.write_text(f"# gradckpt vs peers: {stem}\n\n" + render_markdown(res, png=png.name))
    return [js, md, png]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 1 round: for development")
    p.add_argument("--model", help=f"bench preset (default {DEFAULTS['model']}; gpt2 also works)")
    p.add_argument("--layers", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument(
        "--compile-budgets",
        default=",".join(f"{b:g}" for b in COMPILE_BUDGETS),
        help="activation_memory_budget values for the compile peer; '' to leave it out",
    )
    p.add_argument("--only", help="comma-separated configuration labels (development)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help=f"torch threads (default on CPU: {CPU_THREADS})")
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        help="time the speed cost is computed from (default: cpu on a CPU run, else wall)",
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--stem", help="output file name without extension (default <machine>-<date>)")
    p.add_argument(
        "--from-json",
        type=Path,
        help="do not measure: write the Markdown and PNG again from this results file",
    )
    a = p.parse_args(argv)
    if a.from_json is not None:
        res = refresh(json.loads(a.from_json.read_text()))
        paths = write_outputs(res, a.from_json.parent, a.from_json.stem)
        for path in paths:
            print(f"wrote {path}", file=sys.stderr)
        return 0
    base = dict(QUICK if a.quick else DEFAULTS)
    for k in ("model", "layers", "batch", "seq", "repeats", "warmup"):
        v = getattr(a, k)
        if v is not None:
            base[k] = v
    budgets = [float(x) for x in a.compile_budgets.split(",") if x.strip()]
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    res = run_peers(
        model=base["model"],
        layers=base["layers"],
        batch=base["batch"],
        seq=base["seq"],
        repeats=base["repeats"],
        warmup=base["warmup"],
        compile_budgets=budgets,
        only=a.only.split(",") if a.only else None,
        device=a.device,
        threads=a.threads,
        clock=a.clock,
        progress=progress,
    )
    paths = write_outputs(res, a.out_dir, a.stem)
    print(render_markdown(res))
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
