"""Markdown for a ``benchmarks.gpu_check`` results document (the ``.md`` file and the README section)."""

from __future__ import annotations

from typing import Any

__all__ = ["CLAIMS", "claims_table", "render_markdown"]

GiB = 2**30

#: What gradckpt claims about CUDA, and the gpu-marked tests (``tests/test_gpu.py``,
#: ``tests/test_offload.py``) or kit measurements that settle each: (claim, test names, kind).
CLAIMS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "offload's copies run on side streams, overlapping compute",
        (
            "test_offload_copies_run_while_compute_runs",
            "test_gpu_offload_overlaps_copies_with_compute_and_reuses_pinned_memory",
        ),
        "tests",
    ),
    (
        "offload never makes the host wait for the device",
        ("test_offload_never_makes_the_host_wait",),
        "tests",
    ),
    (
        "offload reuses pinned host buffers step after step",
        ("test_gpu_offload_overlaps_copies_with_compute_and_reuses_pinned_memory",),
        "tests",
    ),
    (
        "offload_saved: same gradients, bytes moved to host",
        ("test_gpu_offload_saved_matches_and_moves_bytes_to_host",),
        "tests",
    ),
    (
        "measure reads the CUDA allocator exactly (and agrees with the CPU tracker)",
        (
            "test_measure_reads_the_allocator_exactly",
            "test_measure_per_block_bytes_match_the_cpu_tracker",
        ),
        "tests",
    ),
    (
        "every policy's gradients equal none's: fp32 bit-identical (deterministic kernels)",
        ("test_every_policy_gives_nones_gradients_fp32_exact",),
        "tests",
    ),
    (
        "every policy's gradients equal none's: bf16 within 2e-2 relative",
        ("test_every_policy_gives_nones_gradients_bf16_within_tolerance",),
        "tests",
    ),
    ("plan/estimate's peak memory (allocated and reserved) per policy", (), "memory"),
    ("speed cost per policy vs the estimate's roofline and HF's own checkpointing", (), "speed"),
)


def _gib(n: Any) -> str:
    from gradckpt.units import format_bytes

    return format_bytes(int(n)) if isinstance(n, (int, float)) and n else "–"


def _pct(x: Any, signed: bool = True) -> str:
    if not isinstance(x, (int, float)):
        return "–"
    return f"{x:+.1%}" if signed else f"{x:.0%}"


def _machine(m: dict[str, Any]) -> str:
    parts = [f"**{m.get('device', '?')}**"]
    if m.get("memory_bytes"):
        parts.append(f"{m['memory_bytes'] / GiB:.0f} GiB")
    if m.get("driver"):
        parts.append(f"driver {m['driver']}")
    if m.get("cuda"):
        parts.append(f"CUDA {m['cuda']}")
    parts.append(f"torch {m.get('torch')}")
    for lib in ("transformers", "peft"):
        parts.append(f"{lib} {m.get(lib) or 'not installed'}")
    return ", ".join(parts)


def _tests(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return ["Tests: not run (see skipped)."]
    counts = ", ".join(f"{n} {k}" for k, n in sorted(t.get("counts", {}).items())) or "no results"
    out = [
        f"`gpu`-marked tests (`{t.get('command')}`): {counts}, exit {t.get('returncode')}, "
        f"{t.get('seconds', 0):.0f} s."
    ]
    bad = [c for c in t.get("cases", []) if c["outcome"] in ("failed", "error")]
    if bad:
        out.append("")
        out += [f"- {c['outcome']}: `{c['name']}`: {c['message'][:300]}" for c in bad]
    return out


def _table(rows: list[dict[str, Any]]) -> list[str]:
    head = (
        "| policy | plan | allocated | predicted | error | reserved | predicted | error "
        "| speed cost | predicted (roofline) | status |"
    )
    out = [head, "|" + "---|" * 11]
    for r in rows:
        p = r.get("predicted") or {}
        out.append(
            "| "
            + " | ".join(
                [
                    f"`{r['policy']}`",
                    str(r.get("plan", "")).replace("|", "/")[:60],
                    _gib(r.get("allocated_bytes")),
                    _gib(p.get("allocated_bytes")),
                    _pct(r.get("allocated_error")),
                    _gib(r.get("reserved_bytes")),
                    _gib(p.get("reserved_bytes")),
                    _pct(r.get("reserved_error")),
                    _pct(r.get("speed_cost")) if r["policy"] != "none" else "(ref)",
                    _pct(p.get("speed_cost")) if r["policy"] != "none" else "(ref)",
                    r.get("status", ""),
                ]
            )
            + " |"
        )
    return out


def _claim_status(res: dict[str, Any] | None, tests: tuple[str, ...], kind: str) -> str:
    if not res:
        return "CPU-only: not yet run on a GPU"
    device = res.get("machine", {}).get("device", "?")
    if kind == "tests":
        cases = (res.get("tests") or {}).get("cases", [])
        got = [
            c
            for c in cases
            if any(c["name"].endswith(f"::{t}") or f"::{t}[" in c["name"] for t in tests)
        ]
        if not got:
            return "not run in this check"
        outcomes = {c["outcome"] for c in got}
        if outcomes & {"failed", "error"}:
            return f"**failed** on {device}"
        if outcomes == {"skipped"}:
            return "skipped: " + got[0]["message"][:80]
        return f"passed on {device}"
    rows = [r for r in res.get("rows", []) if r.get("status") == "ok"]
    if kind == "memory":
        errs = [
            abs(r["allocated_error"]) for r in rows if isinstance(r.get("allocated_error"), float)
        ]
        if not errs:
            return "not measured"
        return (
            f"measured on {device}: {len(errs)} configurations, |error| of allocated peak "
            f"median {sorted(errs)[len(errs) // 2]:.1%}, worst {max(errs):.1%}"
        )
    timed = [r for r in rows if isinstance(r.get("speed_cost"), float) and r["policy"] != "none"]
    return f"measured on {device}: {len(timed)} configurations" if timed else "not measured"


def claims_table(res: dict[str, Any] | None) -> list[str]:
    """Markdown lines: each CUDA claim and whether this results document settles it."""
    out = ["| claim | status |", "|---|---|"]
    for claim, tests, kind in CLAIMS:
        out.append(f"| {claim} | {_claim_status(res, tests, kind)} |")
    return out


def render_markdown(res: dict[str, Any], *, heading: str = "#") -> str:
    """The results as Markdown: machine, tests, one table per workload and sequence length.

    Args:
        res: a ``benchmarks.gpu_check`` results document.
        heading: the Markdown heading level of the title (``"##"`` inside the README).
    """
    smoke = res.get("smoke")
    title = "gradckpt GPU check" + (
        " (CPU smoke run: tiny models, not GPU figures)" if smoke else ""
    )
    state = "complete" if res.get("complete") else "partial (stopped before the end)"
    out = [
        f"{heading} {title}",
        "",
        f"{_machine(res.get('machine', {}))}. {res.get('date')}, {state}, "
        f"{res.get('elapsed_s', 0):.0f} s. Reproduce: `{res.get('command', 'make gpu-check')}`.",
        "",
        *_tests(res.get("tests")),
        "",
        *claims_table(res if not smoke else None),
        "",
        "Memory: peak `torch.cuda.max_memory_allocated` / `max_memory_reserved` of one steady-state "
        "step (optimizer states exist, allocator cache emptied and warmed by one step), next to "
        "`gradckpt.estimate`'s prediction for the same config and setup (bf16 weights under bf16 "
        "autocast, fused AdamW, SDPA, batch 1); error = (predicted - measured) / measured. Speed "
        "cost: median over interleaved rounds of the step time (CUDA events) over `none`'s in the "
        "same round, minus 1; predicted: the estimate's per-op roofline on "
        f"`{res.get('settings', {}).get('speed_gpu')}`. `hf` is transformers' own "
        "`gradient_checkpointing_enable()`, compared with `full`'s prediction; `auto` is "
        "`gradckpt.plan` at the budget halfway between the measured peaks of `none` and `full`, "
        "and its prediction the estimator's `auto` at the same budget."
        + (
            " On this CPU smoke run, times are wall-clock and there is no reserved figure."
            if smoke
            else ""
        ),
    ]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in res.get("rows", []):
        groups.setdefault((r["workload"], r["seq"]), []).append(r)
    for (name, seq), rows in groups.items():
        budget = next((r.get("budget_bytes") for r in rows if r.get("budget_bytes")), None)
        extra = f", auto budget {_gib(budget)}" if budget else ""
        method = rows[0].get("method")
        out += [
            "",
            f"{heading}# {name} ({method}), batch {rows[0].get('batch')} x seq {seq}{extra}",
            "",
        ]
        out += _table(rows)
        pred = res.get("predictions", {}).get(f"{name}@{seq}", {})
        if pred.get("error") or pred.get("auto_error"):
            out += ["", f"Estimate: {pred.get('error') or pred.get('auto_error')}"]
    off = res.get("offload") or {}
    if off:
        out += [
            "",
            f"{heading}# Offload: copies hidden behind compute",
            "",
            "| workload | host MiB | copies alone ms | offload - full ms | hidden |",
            "|---|---|---|---|---|",
        ]
        for key, o in off.items():
            out.append(
                f"| {key} | {o['host_bytes'] / 2**20:.0f} | {o['copy_s'] * 1e3:.1f} | "
                f"{o['exposed_s'] * 1e3:.1f} | {_pct(o.get('hidden'), signed=False)} |"
            )
    if res.get("skipped"):
        out += ["", f"{heading}# Skipped", ""]
        out += [f"- {s['what']}: {s['why']}" for s in res["skipped"]]
    return "\n".join(out) + "\n"
