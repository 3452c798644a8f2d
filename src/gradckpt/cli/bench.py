"""``gradckpt bench``: every policy on one model, side by side, as a table, JSON and a plot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..units import format_bytes

__all__ = ["add_parser", "render", "run"]


def split_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise ConfigError(
            f"{what} must be a comma-separated list without empty items, got {text!r}"
        )
    return items


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


def writable_path(text: str) -> Path:
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, give a file name")
    if not p.parent.exists():
        raise argparse.ArgumentTypeError(f"directory {str(p.parent)!r} does not exist")
    return p


def add_parser(sub: Any) -> None:
    from ..bench import default_policies
    from ..bench.models import BENCH_PRESETS

    p = sub.add_parser(
        "bench",
        help="measure memory and time of each policy side by side",
        description="Run each policy on a bench model, interleaved over repeats, and print "
        "peak/activation memory, speed cost and extra FLOPs.",
    )
    p.add_argument(
        "--model",
        default="llama",
        help=f"preset ({', '.join(BENCH_PRESETS)}) or a Hugging Face config.json path (default: llama)",
    )
    p.add_argument("--batch", type=positive_int, default=4, help="micro-batch size (default 4)")
    p.add_argument("--seq", type=positive_int, default=512, help="sequence length (default 512)")
    p.add_argument(
        "--layers", type=positive_int, default=None, help="number of blocks (default: the preset's)"
    )
    p.add_argument(
        "--policies",
        default=",".join(default_policies()),
        help="comma-separated policies (default: %(default)s)",
    )
    p.add_argument(
        "--budgets",
        default=None,
        help="also bench the auto plan at these budgets: '40%%,60%%' of none's peak, or sizes like '1GiB'",
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="timed rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--json", type=writable_path, default=None, metavar="FILE", help="write results as JSON"
    )
    p.add_argument(
        "--plot",
        type=writable_path,
        default=None,
        metavar="FILE.png",
        help="plot memory vs speed cost",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def render(report: Any) -> Any:
    """A rich Table of a BenchReport."""
    from rich.table import Table

    s = report.settings
    t = Table(
        title=f"gradckpt bench: {report.model}, batch {s['batch']}, seq {s['seq']}, "
        f"{s['layers']} blocks, {s['device']}, median of {s['repeats']} interleaved rounds",
        title_justify="left",
    )
    for col in (
        "policy",
        "peak",
        "activations",
        "saving",
        "step time",
        "speed cost",
        "extra FLOPs",
        "recompute bytes",
    ):
        t.add_column(col, justify="left" if col == "policy" else "right")
    none_flops = report.result("none").total_flops or 1
    for r in report.results:
        host = f" (+{format_bytes(r.host_bytes)} host)" if r.host_bytes else ""
        t.add_row(
            r.policy,
            format_bytes(r.peak_bytes),
            format_bytes(r.activation_bytes) + host,
            f"{r.saving * 100:.0f}%",
            f"{r.time_s:.3f} s",
            f"{r.speed_cost * 100:+.1f}%",
            f"{r.extra_flops / 1e9:+.2f} G ({r.extra_flops / none_flops * 100:+.1f}%)",
            format_bytes(r.stats.get("recompute_bytes", 0)),
        )
    return t


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from ..bench import run_bench
    from ..plot import plot_memory_vs_cost

    policies = split_list(args.policies, "--policies")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    budgets = split_list(args.budgets, "--budgets") if args.budgets else []
    if budgets:
        from ..planner.api import resolve_budget

        for b in budgets:  # fail on a malformed budget before any work
            resolve_budget(b, reference=1 << 30)
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=args.quiet) as bar:
        n_cfg = len(set(policies) | {"none"}) + len(budgets)
        task = bar.add_task("bench", total=n_cfg * (1 + args.warmup + args.repeats))

        def progress(label: str) -> None:
            bar.update(task, advance=1, description=label)

        report = run_bench(
            args.model,
            batch=args.batch,
            seq=args.seq,
            layers=args.layers,
            policies=policies,
            budgets=budgets,
            repeats=args.repeats,
            warmup=args.warmup,
            device=args.device,
            progress=progress,
        )
    out = Console()
    if not out.is_terminal:
        out = Console(width=140)  # a pipe or file: do not squeeze the table into 80 columns
    out.print(render(report))
    for skip in report.skipped:
        print(f"skipped {skip['policy']}: {skip['reason']}")
    m = report.machine
    print(
        f"machine: {m['processor']}, {m['threads']} threads, GPU: {m['gpu'] or 'none'}, torch {m['torch']}"
    )
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot_memory_vs_cost(
            [r.to_dict() for r in report.results],
            args.plot,
            title=f"{report.model}: peak memory vs speed cost (batch {args.batch}, seq {args.seq})",
        )
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
