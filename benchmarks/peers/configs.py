"""The configurations: gradckpt's policies and the peers' settings, each on a weight-sharing model copy."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradckpt
from gradckpt.measure import count_flops

aten = torch.ops.aten
RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
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


def transformers_version() -> str | None:
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
    tv = transformers_version() or "not installed"
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
