"""``gradckpt plan``: will this fine-tune fit, and what will checkpointing cost? (no GPU, no weights)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import ConfigError

__all__ = ["add_parser", "run"]

_ROWS = (
    ("weights", "weights"),
    ("gradients", "gradients"),
    ("optimizer_states", "optimizer states"),
    ("activations", "activations kept"),
    ("logits_loss", "logits & loss"),
    ("backward_transient", "backward transient"),
    ("cuda_overhead", "CUDA overhead"),
)


def add_parser(subparsers: Any) -> None:
    from ..estimate.setup import ATTENTION, METHODS, OPTIMIZERS, PRECISIONS

    p = subparsers.add_parser(
        "plan",
        help="estimate peak memory and checkpointing cost of a fine-tune (no GPU, no weights)",
        description=(
            "Run the model's real transformers code on fake tensors and predict the peak memory "
            "of one training step for each checkpointing policy, broken down, with the speed cost "
            "of recomputation on a GPU and whether it fits."
        ),
    )
    p.add_argument("model", nargs="?", help="a preset (see --list-models) or a path to config.json")
    p.add_argument(
        "--method", default="full", choices=METHODS, help="what is trained (default: full)"
    )
    p.add_argument("--batch", type=int, default=1, help="micro-batch size (default: 1)")
    p.add_argument(
        "--seq", type=int, default=2048, help="sequence length in tokens (default: 2048)"
    )
    p.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)"
    )
    p.add_argument(
        "--precision",
        default="bf16",
        choices=PRECISIONS,
        help="bf16 weights/grads/states, mixed (fp32 master weights), or fp32; bf16 and mixed run "
        "under bf16 autocast like Trainer(bf16=True) (default: bf16)",
    )
    p.add_argument(
        "--optimizer", default="adamw", choices=OPTIMIZERS, help="optimizer (default: adamw)"
    )
    p.add_argument(
        "--attention", default="sdpa", choices=ATTENTION, help="attention kernel (default: sdpa)"
    )
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (default: 32)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: 0.0)")
    p.add_argument(
        "--lora-targets",
        default="all-linear",
        help="modules to adapt: all-linear or a comma list such as q_proj,v_proj (default: all-linear)",
    )
    p.add_argument(
        "--policy",
        default=None,
        help="comma-separated policies to compare, e.g. none,full,every:2,sqrt,auto (default: "
        "none,full, plus auto, the planner's cheapest plan that fits, when --gpu is given)",
    )
    p.add_argument("--gpu", help="GPU preset (see --list-gpus) or a memory size such as 24GB")
    p.add_argument(
        "--overhead", help="CUDA allowance as a size (default: 512MiB + 5%% of the tensors' peak)"
    )
    p.add_argument(
        "--no-alternatives",
        action="store_true",
        help="do not estimate alternatives when nothing fits",
    )
    p.add_argument(
        "--full-depth",
        action="store_true",
        help="run every block instead of replaying a few (slower)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--list-models", action="store_true", help="list the model presets and exit")
    p.add_argument("--list-gpus", action="store_true", help="list the GPU presets and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.list_models or args.list_gpus:
        return _lists(args)
    if not args.model:
        raise ConfigError("name a model: gradckpt plan MODEL (see gradckpt plan --list-models)")
    from ..estimate import estimate

    alpha = int(args.lora_alpha) if float(args.lora_alpha).is_integer() else args.lora_alpha
    report = estimate(
        args.model,
        method=args.method,
        batch=args.batch,
        seq=args.seq,
        grad_accum=args.grad_accum,
        precision=args.precision,
        optimizer=args.optimizer,
        attention=args.attention,
        lora_rank=args.lora_rank,
        lora_alpha=alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets,
        policies=args.policy,
        gpu=args.gpu,
        overhead=args.overhead,
        alternatives=not args.no_alternatives,
        full_depth=args.full_depth,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)
    return 0


def _lists(args: argparse.Namespace) -> int:
    from ..estimate import GPU_PRESETS, MODEL_PRESETS
    from ..units import format_bytes

    if args.json:
        data: dict[str, Any] = {}
        if args.list_models:
            data["models"] = [
                {"name": p.name, "source": p.source, "params": p.params}
                for p in MODEL_PRESETS.values()
            ]
        if args.list_gpus:
            data["gpus"] = [
                {
                    "name": g.name,
                    "memory_bytes": g.memory_bytes,
                    "bf16_tflops": g.bf16_tflops,
                    "bandwidth_gbs": g.bandwidth_gbs,
                    "source": g.source,
                }
                for g in GPU_PRESETS.values()
            ]
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.list_models:
        t = Table(title="model presets (config values from the Hugging Face Hub)")
        for col in ("name", "params", "source"):
            t.add_column(col)
        for p in MODEL_PRESETS.values():
            t.add_row(p.name, p.params, p.source)
        console.print(t)
    if args.list_gpus:
        t = Table(title="GPU presets (dense bf16 tensor throughput, fp32 accumulate)")
        for col in ("name", "memory", "bf16 TFLOPS", "GB/s"):
            t.add_column(col, justify="left" if col == "name" else "right")
        for g in GPU_PRESETS.values():
            t.add_row(
                g.name, format_bytes(g.memory_bytes), f"{g.bf16_tflops:g}", f"{g.bandwidth_gbs:g}"
            )
        console.print(t)
    return 0


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def render(report: Any, file: Any = None) -> None:
    """Print a report as tables: breakdown per policy, the one-glance summary, alternatives, notes."""
    from rich.console import Console
    from rich.table import Table

    from ..units import format_bytes

    console = Console(file=file or sys.stdout)
    gpu = report.gpu
    head = (
        f"[bold]{report.model}[/bold]: {report.params / 1e9:.2f}B parameters "
        f"({report.trainable_params / 1e6:,.1f}M trainable), {report.layers} blocks"
    )
    console.print(head)
    where = f"on {gpu['name']} ({format_bytes(gpu['memory_bytes'])})" if gpu else "no GPU given"
    console.print(f"{report.setup_line()}, {report.setup['attention']} attention; {where}")

    t = Table(show_edge=False, pad_edge=False)
    t.add_column("")
    for r in report.results:
        t.add_column(r.policy, justify="right")
    for key, label in _ROWS:
        t.add_row(label, *(_gib(r.breakdown[key]) for r in report.results))
    t.add_row(
        "[bold]peak[/bold]",
        *(f"[bold]{_gib(r.peak_bytes)}[/bold]" for r in report.results),
        end_section=True,
    )
    t.add_row("peak during", *(r.peak_phase for r in report.results))
    t.add_row("kept for backward", *(_gib(r.activation_bytes) for r in report.results))
    t.add_row("recompute FLOPs", *(f"{r.recompute_flops / 1e12:.2f} T" for r in report.results))
    t.add_row("speed cost", *(f"+{r.speed_cost:.1%}" for r in report.results))
    t.add_row("step time", *(f"{r.step_time_s:.2f} s" for r in report.results))
    if gpu:
        t.add_row(
            f"fits {gpu['name']}",
            *(
                (
                    f"[green]yes[/green] ({r.headroom_bytes / 1024**3:+.2f})"
                    if r.fits
                    else f"[red]no[/red] ({r.headroom_bytes / 1024**3:+.2f})"
                )
                for r in report.results
            ),
        )
    console.print(t)
    console.print(
        f"[dim]speed on {report.speed_gpu}{'' if gpu and gpu['name'] == report.speed_gpu else ' (reference)'}; "
        "fits: (GiB to spare, or short when negative)[/dim]"
    )

    s = report.summary()
    st = Table(title="summary", show_edge=False)
    for col in ("workload", "without", "with", "speed cost"):
        st.add_column(col, justify="left" if col == "workload" else "right")
    st.add_row(
        s["workload"],
        f"{_gib(s['without'])} ({s['without_policy']})",
        f"{_gib(s['with'])} ({s['with_policy']})",
        f"+{s['speed_cost']:.1%}",
    )
    console.print(st)
    if gpu:
        for r in report.results:
            console.print(f"  {r.policy}: {r.verdict(gpu['name'])}")
    if report.alternatives:
        at = Table(title=f"no policy fits {gpu['name']}: what would", show_edge=False)
        for col in ("change", "policy", "peak", "fits", "speed cost"):
            at.add_column(col, justify="left" if col in ("change", "policy") else "right")
        for a in report.alternatives:
            at.add_row(
                a.change,
                a.policy,
                _gib(a.peak_bytes),
                "yes" if a.fits else "no",
                f"+{a.speed_cost:.1%}",
            )
        console.print(at)
    for n in report.notes:
        console.print(f"[dim]- {n}[/dim]", highlight=False)
