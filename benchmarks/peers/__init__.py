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
   exactly to those of no checkpointing (``gradckpt.verify.compare_grads``).
3. The planner is profiled once and solved at each peer's measured peak, so every peer has a
   gradckpt plan made for exactly its memory.
4. ``warmup + repeats`` interleaved rounds, one step per configuration each (no tracker), the
   order rotated every round (``gradckpt.bench.time_interleaved``); the speed cost is the median of per-round ratios to ``none``, in
   process CPU time on a CPU run (one torch thread), in wall-clock time on CUDA.
5. Outputs: ``benchmarks/results/<machine>-<date>.json``, a Markdown table and a PNG frontier.

Run: .venv/bin/python -m benchmarks.peers            (about 8 minutes on 2 shared CPU cores)
     .venv/bin/python -m benchmarks.peers --quick    (a tiny model, for development)
"""

from __future__ import annotations

from .analysis import frontier_verdicts, pareto, refresh
from .configs import (
    COMPILE_BUDGETS,
    COMPILE_REF,
    CPU_THREADS,
    DEFAULTS,
    QUICK,
    RESULTS_DIR,
    SEED,
    TORCHTITAN_SAVE,
    Config,
    Skipped,
    compile_blocks,
    compiled_step_flops,
    copy_sharing_weights,
    gradckpt_then_compile,
    graph_flops,
    make_configs,
    torchtitan_sac_context,
    wrap_blocks_with_torch_checkpoint,
)
from .measure import (
    Tracked,
    allocator_step,
    budget_configs,
    time_rounds,
    track,
)
from .report import closing_notes, plot, render_markdown, write_outputs
from .run import Row, machine_slug, max_dropout, run_peers

__all__ = [
    "COMPILE_BUDGETS",
    "COMPILE_REF",
    "CPU_THREADS",
    "DEFAULTS",
    "QUICK",
    "RESULTS_DIR",
    "SEED",
    "TORCHTITAN_SAVE",
    "Config",
    "Row",
    "Skipped",
    "Tracked",
    "allocator_step",
    "budget_configs",
    "closing_notes",
    "compile_blocks",
    "compiled_step_flops",
    "copy_sharing_weights",
    "frontier_verdicts",
    "graph_flops",
    "gradckpt_then_compile",
    "machine_slug",
    "make_configs",
    "max_dropout",
    "pareto",
    "plot",
    "refresh",
    "render_markdown",
    "run_peers",
    "time_rounds",
    "torchtitan_sac_context",
    "track",
    "wrap_blocks_with_torch_checkpoint",
    "write_outputs",
]
