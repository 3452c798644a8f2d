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
    from ..estimate.training import ATTENTION, METHODS, OPTIMIZERS, PRECISIONS

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
    p.add_argument(
        "--batch",
        type=_int_list,
        default=[1],
        help="micro-batch size, or a comma list to sweep, e.g. 1,2,4,8 (default: 1)",
    )
    p.add_argument(
        "--seq",
        type=_int_list,
        default=[2048],
        help="sequence length in tokens, or a comma list to sweep, e.g. 512,1024,2048 "
        "(default: 2048)",
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
    p.add_argument(
        "--gpu",
        help="GPU preset (see --list-gpus) or a memory size such as 24GB; a comma list "
        "(rtx-4090,a100-80gb) or 'all' to compare GPUs",
    )
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
    g = p.add_argument_group(
        "sweeps and searches",
        "the trade-off in numbers: how the peak scales, the largest setting that fits, which GPU",
    )
    g.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw peak memory vs sequence length (or batch), one line per policy, with each "
        "--gpu's capacity as a horizontal line",
    )
    g.add_argument(
        "--max-batch",
        action="store_true",
        help="per GPU, sequence length and policy: the largest micro-batch that fits, with "
        "tokens per step and predicted tokens/s",
    )
    g.add_argument(
        "--max-seq",
        action="store_true",
        help="per GPU, batch and policy: the longest sequence (multiple of --seq-step) that fits",
    )
    g.add_argument(
        "--seq-step",
        type=int,
        default=128,
        help="granularity of the --max-seq search in tokens (default: 128)",
    )
    g.add_argument(
        "--which-gpu",
        action="store_true",
        help="for the setup, every GPU in --gpu (default: every preset) and policy: fits or not, "
        "step time, tokens/s",
    )
    g.add_argument(
        "--price",
        metavar="GPU=PRICE,...",
        help="hourly prices, e.g. rtx-4090=0.35,a100-80gb=1.6: adds the cost per million tokens "
        "(no prices are built in); alone, implies --which-gpu",
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
    if _is_sweep(args):
        return _sweep(args, alpha)
    report = estimate(
        args.model,
        method=args.method,
        batch=args.batch[0],
        seq=args.seq[0],
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


def _int_list(text: str) -> list[int]:
    """argparse type: ``"512,1024"`` -> ``[512, 1024]`` (values < 1 are left to the library)."""
    items = [t.strip() for t in text.split(",")]
    if all(not t for t in items):
        raise argparse.ArgumentTypeError("empty list: give one or more values, e.g. 512,1024")
    out = []
    for t in items:
        if not t:
            continue
        try:
            out.append(int(t))
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {t!r}") from None
    return out


def _gpu_names(args: argparse.Namespace) -> list[str]:
    return [g.strip() for g in (args.gpu or "").split(",") if g.strip()]


def _is_sweep(args: argparse.Namespace) -> bool:
    """Anything beyond one setting on at most one GPU goes through ``sweep``."""
    gpus = _gpu_names(args)
    return bool(
        len(args.seq) > 1
        or len(args.batch) > 1
        or args.plot
        or args.max_batch
        or args.max_seq
        or args.which_gpu
        or args.price is not None
        or len(gpus) > 1
        or (gpus and gpus[0].lower() == "all")
    )


def _sweep(args: argparse.Namespace, alpha: Any) -> int:
    from pathlib import Path

    from ..estimate.sweep import sweep

    searching = args.max_batch or args.max_seq
    several_points = len(args.seq) > 1 or len(args.batch) > 1
    if args.plot:
        out = Path(args.plot)
        if out.suffix.lower() != ".png":
            raise ConfigError(f"--plot file must end in .png, got {args.plot!r}")
        if not out.parent.exists():
            raise ConfigError(f"--plot: directory {str(out.parent)!r} does not exist")
        if not several_points:
            raise ConfigError(
                "--plot draws a sweep: give several --seq values (e.g. 512,1024,2048,4096) "
                "or several --batch values"
            )
    if args.gpu is not None and not _gpu_names(args):
        raise ConfigError("--gpu list is empty: name presets, e.g. rtx-4090,a100-80gb, or 'all'")
    which = bool(
        args.which_gpu
        or (args.price is not None and not searching)
        or (not several_points and not searching and not args.plot)
    )
    report = sweep(
        args.model,
        seq=args.seq,
        batch=args.batch,
        policies=args.policy,
        gpu=args.gpu,
        prices=args.price,
        max_batch=args.max_batch,
        max_seq=args.max_seq,
        which_gpu=which,
        seq_step=args.seq_step,
        method=args.method,
        grad_accum=args.grad_accum,
        precision=args.precision,
        optimizer=args.optimizer,
        attention=args.attention,
        lora_rank=args.lora_rank,
        lora_alpha=alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets,
        overhead=args.overhead,
        full_depth=args.full_depth,
    )
    plot_path = _plot_sweep(report, args.plot) if args.plot else None
    if args.json:
        data = report.to_dict()
        data["plot"] = None if plot_path is None else str(plot_path)
        print(json.dumps(data, indent=2))
    else:
        render_sweep(report, grid=several_points or not (searching or which))
        if plot_path is not None:
            print(f"plot: {plot_path}")
    return 0


def _plot_sweep(report: Any, path: str) -> Any:
    """Peak vs sequence length (one line per policy, per batch when several), or vs batch."""
    from ..plot import plot_peak_sweep

    seqs, batches = report.seqs, report.batches
    lines = []
    if len(seqs) > 1:
        for b in batches:
            for p in report.policies:
                label = p if len(batches) == 1 else f"{p}, batch {b}"
                lines.append({"label": label, "points": report.series(p, batch=b)})
        xlabel = "sequence length (tokens)"
    else:
        for p in report.policies:
            lines.append({"label": p, "points": report.series(p, seq=seqs[0])})
        xlabel = "micro-batch size"
    fixed = f"batch {batches[0]}" if len(seqs) > 1 and len(batches) == 1 else ""
    if len(seqs) == 1:
        fixed = f"seq {seqs[0]}"
    title = f"{report.model}: {_setup_words(report.setup)}" + (f", {fixed}" if fixed else "")
    return plot_peak_sweep(
        lines,
        path,
        capacities=[(g["name"], g["memory_bytes"]) for g in report.gpus],
        xlabel=xlabel,
        title=title,
    )


def _setup_words(setup: dict[str, Any]) -> str:
    what = {
        "full": "full fine-tune",
        "lora": f"LoRA r={setup['lora_rank']}",
        "qlora": f"QLoRA r={setup['lora_rank']}",
    }[setup["method"]]
    acc = f", x{setup['grad_accum']} accum" if setup["grad_accum"] > 1 else ""
    return (
        f"{what}, {setup['precision']}, {setup['optimizer']}, {setup['attention']} attention{acc}"
    )


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


def _money(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _secs(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _g(n: int | None) -> str:
    return "" if n is None else f"{n / 1024**3:.2f}"


def render_sweep(report: Any, file: Any = None, *, grid: bool = True) -> None:
    """Print a ``SweepReport`` as tables: the grid (peak and speed cost per policy and setting),
    the largest settings that fit each GPU, and the GPU comparison; sizes in GiB."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    console.print(f"[bold]{report.model}[/bold]: {_setup_words(report.setup)}", highlight=False)

    if grid and report.points:
        _render_grid(console, report)

    for vary in ("batch", "seq"):
        rows = [f for f in report.largest if f.vary == vary]
        if rows:
            _render_largest(console, rows, vary)

    if report.gpu_table:
        several = len({(o.batch, o.seq) for o in report.gpu_table}) > 1
        priced = any(o.price_per_hour is not None for o in report.gpu_table)
        t = Table(
            title="which GPU (peak GiB; spare: GiB left, or short when negative)",
            show_edge=False,
            pad_edge=False,
        )
        t.add_column("gpu")
        if several:
            t.add_column("batch x seq", justify="right")
        for col in ("policy", "peak", "spare", "step s", "tok/s", "+time"):
            t.add_column(col, justify="left" if col == "policy" else "right")
        if priced:
            t.add_column("$/M tok", justify="right")
        for o in report.gpu_table:
            cells = [o.gpu]
            if several:
                cells.append(f"{o.batch} x {o.seq}")
            spare = f"{o.headroom_bytes / 1024**3:+.2f}"
            cells += [
                o.policy,
                _g(o.peak_bytes),
                f"[green]{spare}[/green]" if o.fits else f"[red]{spare}[/red]",
                _secs(o.step_time_s) if o.fits else "",
                _rate(o.tokens_per_s) if o.fits else "",
                f"{o.speed_cost:.0%}",
            ]
            if priced:
                cells.append(_money(o.cost_per_mtok))
            t.add_row(*cells)
        console.print(t)
    for n in report.notes:
        console.print(f"[dim]- {n}[/dim]", highlight=False)


def _render_grid(console: Any, report: Any) -> None:
    """The grid: peak (+ speed cost) per policy and setting, then what fits each GPU."""
    from rich.table import Table

    seqs, batches = report.seqs, report.batches
    show_b, show_s = len(batches) > 1 or len(seqs) == 1, len(seqs) > 1 or len(batches) == 1
    fixed = []
    if not show_b:
        fixed.append(f"batch {batches[0]}")
    if not show_s:
        fixed.append(f"seq {seqs[0]}")
    console.print(
        "peak GiB per policy (+ recompute's speed cost on "
        f"{report.speed_gpu})" + (f", {', '.join(fixed)}" if fixed else "") + ":",
        highlight=False,
    )
    t = Table(show_edge=False, pad_edge=False)
    if show_b:
        t.add_column("batch", justify="right")
    if show_s:
        t.add_column("seq", justify="right")
    for p in report.policies:
        t.add_column(p, justify="right")
    both = len(seqs) > 1 and len(batches) > 1
    if both:  # two dimensions: what fits each GPU, per cell
        for g in report.gpus:
            t.add_column(g["name"])
    for pt in report.points:
        cells = ([str(pt.batch)] if show_b else []) + ([str(pt.seq)] if show_s else [])
        for p in report.policies:
            try:
                r = pt.result(p)
            except KeyError:
                cells.append("n/a")
                continue
            cost = f" +{r.speed_cost:.0%}" if r.speed_cost >= 0.005 else ""
            cells.append(f"{_g(r.peak_bytes)}{cost}")
        if both:
            for g in report.gpus:
                ok = [p for p in report.policies if pt.fits.get(p, {}).get(g["name"])]
                cells.append(",".join(ok) if ok else "-")
        t.add_row(*cells)
    console.print(t)
    if both or not report.gpus:
        return
    dim = "seq" if len(seqs) > 1 else "batch"
    console.print(f"largest {dim} of these that fits, per policy:")
    width = max(len(g["name"]) for g in report.gpus)
    for g in report.gpus:
        parts = []
        for p in report.policies:
            fit = [getattr(pt, dim) for pt in report.points if pt.fits.get(p, {}).get(g["name"])]
            parts.append(f"{p} {max(fit) if fit else '-'}")
        console.print(
            f"  {g['name']:<{width}} ({_g(g['memory_bytes'])} GiB): {', '.join(parts)}",
            highlight=False,
        )


def _render_largest(console: Any, rows: list[Any], vary: str) -> None:
    """The largest batch (sequence) per GPU, setting and policy, with its throughput."""
    from rich.table import Table

    gpus = list(dict.fromkeys(f.gpu for f in rows))
    one_gpu = len(gpus) == 1
    other = "seq" if vary == "batch" else "batch"
    others = list(dict.fromkeys(getattr(f, other) for f in rows))
    one_other = len(others) == 1
    what = "micro-batch" if vary == "batch" else "sequence"
    where = (f" {gpus[0]}" if one_gpu else "") + (f", {other} {others[0]}" if one_other else "")
    t = Table(
        title=f"largest {what} that fits{where} (peak GiB; next: "
        + ("batch + 1)" if vary == "batch" else "seq + search step)"),
        show_edge=False,
        pad_edge=False,
    )
    cols = ([] if one_gpu else ["gpu"]) + ([] if one_other else [other])
    cols += ["policy", f"max {vary}", "tok/step", "peak", "next"]
    cols.append("tok/s (b=1)" if vary == "batch" else "tok/s")
    priced = any(f.price_per_hour is not None for f in rows)
    if priced:
        cols.append("$/M tok")
    for col in cols:
        left = col in ("gpu", "policy")
        # on a narrow terminal numbers fold onto a second line rather than lose digits
        t.add_column(col, justify="left" if left else "right", no_wrap=left, overflow="fold")
    for f in rows:
        value = f.batch if vary == "batch" else f.seq
        found = f.found
        best = str(value) if found else "[red]-[/red]"
        if found and f.limited_by:
            best += "+" if f.limited_by == "search limit" else " (max)"
        cells = ([] if one_gpu else [f.gpu]) + ([] if one_other else [str(getattr(f, other))])
        cells += [
            f.policy,
            best,
            f"{f.tokens_per_step:,}" if found else "",
            _g(f.peak_bytes) if found else f"[red]{_g(f.peak_bytes)}[/red]",
            _g(f.next_peak_bytes) if f.next_peak_bytes or not found or f.limited_by else "no plan",
        ]
        rate = _rate(f.tokens_per_s) if found else ""
        if vary == "batch" and found and f.tokens_per_s is not None:
            rate += f" ({_rate(f.batch1_tokens_per_s)})"
        cells.append(rate)
        if priced:
            cells.append(_money(f.cost_per_mtok))
        t.add_row(*cells)
    console.print(t)
    notes = ["-: does not fit even at the smallest (its peak in red)"]
    if vary == "batch":
        notes.append("tok/s: predicted at the max batch (and at batch 1)")
    if any(f.limited_by == "max_position_embeddings" for f in rows):
        notes.append("(max): the model's max_position_embeddings")
    if any(f.limited_by == "search limit" for f in rows):
        notes.append("+: fits at the search limit")
    console.print(f"[dim]{'; '.join(notes)}[/dim]", highlight=False)
