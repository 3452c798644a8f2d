"""Tables and plots for ``gradckpt plan``: an estimate, a sweep, the preset lists (rich, matplotlib)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..estimate import GPU_PRESETS, MODEL_PRESETS
from ..estimate.report import BREAKDOWN, setup_words
from ..units import format_bytes

__all__ = ["plot_sweep", "presets_data", "render_estimate", "render_presets", "render_sweep"]


def plot_sweep(report: Any, path: str) -> Path:
    """Draw a sweep's peak vs sequence length (one line per policy, per batch when several), or vs batch."""
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
    title = f"{report.model}: {setup_words(report.setup, shape=False)}" + (
        f", {fixed}" if fixed else ""
    )
    return plot_peak_sweep(
        lines,
        path,
        capacities=[(g["name"], g["memory_bytes"]) for g in report.gpus],
        xlabel=xlabel,
        title=title,
    )


def presets_data(models: bool, gpus: bool) -> dict[str, Any]:
    """The model and GPU presets as JSON-ready data (``--list-models``/``--list-gpus --json``)."""
    data: dict[str, Any] = {}
    if models:
        data["models"] = [
            {"name": p.name, "source": p.source, "params": p.params} for p in MODEL_PRESETS.values()
        ]
    if gpus:
        data["gpus"] = [{**g.to_dict(), "source": g.source} for g in GPU_PRESETS.values()]
    return data


def render_presets(models: bool, gpus: bool, file: Any = None) -> None:
    """Print the model and GPU presets as tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    if models:
        t = Table(title="model presets (config values from the Hugging Face Hub)")
        for col in ("name", "params", "source"):
            t.add_column(col)
        for p in MODEL_PRESETS.values():
            t.add_row(p.name, p.params, p.source)
        console.print(t)
    if gpus:
        t = Table(title="GPU presets (dense bf16 tensor throughput, fp32 accumulate)")
        for col in ("name", "memory", "bf16 TFLOPS", "GB/s"):
            t.add_column(col, justify="left" if col == "name" else "right")
        for g in GPU_PRESETS.values():
            t.add_row(
                g.name, format_bytes(g.memory_bytes), f"{g.bf16_tflops:g}", f"{g.bandwidth_gbs:g}"
            )
        console.print(t)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def render_estimate(report: Any, file: Any = None) -> None:
    """Print a report as tables: breakdown per policy, the one-glance summary, alternatives, notes."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    gpu = report.gpu
    head = (
        f"[bold]{report.model}[/bold]: {report.params / 1e9:.2f}B parameters "
        f"({report.trainable_params / 1e6:,.1f}M trainable), {report.layers} blocks"
    )
    console.print(head)
    where = f"on {gpu['name']} ({format_bytes(gpu['memory_bytes'])})" if gpu else "no GPU given"
    console.print(f"{report.setup_line()}; {where}")

    t = Table(show_edge=False, pad_edge=False)
    t.add_column("")
    for r in report.results:
        t.add_column(r.policy, justify="right")
    for key, (label, _help) in BREAKDOWN.items():
        if key == "shard_buffers" and not any(r.breakdown.get(key) for r in report.results):
            continue  # one unsharded GPU: no such row
        t.add_row(label, *(_gib(r.breakdown.get(key, 0)) for r in report.results))
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
    if any(r.host_bytes for r in report.results):
        t.add_row(
            "host memory",
            *(
                ("[red]" + _gib(r.host_bytes) + "[/red]")
                if r.host_fits is False
                else _gib(r.host_bytes)
                for r in report.results
            ),
        )
        t.add_row("offload wait", *(f"{r.offload_s:.2f} s" for r in report.results))
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
    console.print(
        f"[bold]{report.model}[/bold]: {setup_words(report.setup, shape=False)}", highlight=False
    )

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


def render_gpu_count(report: Any, file: Any = None) -> None:
    """``plan --gpus auto``: per policy, the fewest GPUs whose per-GPU peak fits, and the counts tried."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    gpu = report.gpu
    console.print(
        f"[bold]{report.model}[/bold]: how many {gpu['name']} ({format_bytes(gpu['memory_bytes'])}) "
        f"with {report.shard}"
    )
    console.print(report.setup_line() + " (batch per GPU)")
    t = Table(show_edge=False, pad_edge=False)
    for col in (
        "policy",
        "GPUs",
        "peak per GPU",
        "spare",
        "speed cost",
        "per-GPU peak at 1, 2, 4...",
    ):
        t.add_column(
            col, justify="left" if col in ("policy", "per-GPU peak at 1, 2, 4...") else "right"
        )
    for c in report.counts:
        tried = ", ".join(f"{n}: {p / 1024**3:.1f}" for n, p in c.tried)
        t.add_row(
            c.policy,
            str(c.gpus) if c.gpus is not None else "[red]-[/red]",
            _gib(c.peak_bytes),
            _gib(c.headroom_bytes) if c.gpus is not None else "",
            f"+{c.speed_cost:.1%}",
            tried,
        )
    console.print(t)
    console.print("[dim]peak GiB per GPU at each count tried; -: none of the counts fit[/dim]")
    for c in report.counts:
        if c.why:
            console.print(f"  {c.policy}: {c.why}")
    for note in report.notes:
        console.print(f"[dim]- {note}[/dim]")
