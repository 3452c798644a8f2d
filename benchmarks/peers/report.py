"""Output: the Markdown table and notes, the PNG frontier, the results files (all from plain data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .analysis import pareto
from .configs import COMPILE_REF, DEFAULTS, MiB


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
        ", then `python -m benchmarks.render_readme`" if s["model"] == DEFAULTS["model"] else ""
    )
    lines += [
        "",
        f"Whole run: {res['runtime_s'] / 60:.1f} min. Reproduce: "
        f"`python -m benchmarks.peers{flags}`{readme}.",
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
