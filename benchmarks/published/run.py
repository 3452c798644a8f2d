"""Estimate every row of ``measurements.json`` and compare with what was measured on the GPU.

Steps:
1. Read the table. Each row names its source (repository, path, commit), the exact setup, the
   measured value and its kind, and the ``gradckpt.estimate`` settings that match the setup.
2. For each row gradckpt predicts the figure of that kind (no GPU, no weights):
   - ``allocated`` (``torch.cuda.max_memory_allocated``) and ``active``
     (``active_bytes.all.peak``): the tensors alive at the step's peak (an estimate with
     ``overhead=0``; blocks are rounded to 512 B, which changes no row by 0.01%);
   - ``reserved`` (``torch.cuda.memory_reserved``): what the caching allocator holds at that
     peak, from the estimate's ``reserved_bytes``;
   - ``capacity`` (the longest sequence that fits a card): the largest multiple of
     ``seq_step`` whose predicted figure fits ``capacity.gpu_bytes``, by bisection. The figure
     is ``capacity.criterion``: ``device_total`` (default; a search for the longest run that
     does not go out of memory: ``peak_bytes``, CUDA context + the segments the allocator must
     hold, wholly free cached ones given back before an OOM) or ``reserved`` (a table that
     extrapolates ``max_memory_reserved`` to a VRAM size: ``reserved_bytes``, no context).
3. Error = predicted / measured - 1, per row; median and worst over the rows gradckpt models.
   Rows whose setup it cannot model yet are still estimated and listed, with the reason, but
   left out of the median and worst.
4. Write ``benchmarks/results/published-<date>.json`` and ``.md`` and the README section
   between ``<!-- published:start -->`` and ``<!-- published:end -->``.

Run: ``PYTHONPATH=src python -m benchmarks.published`` (about 2-4 minutes on 2 cores);
``--only ID,ID`` for some rows, ``--no-write`` to print only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import gradckpt
from gradckpt.estimate.estimator import estimate_one
from gradckpt.estimate.fake_model import max_positions
from gradckpt.estimate.presets import resolve_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TABLE = HERE / "measurements.json"
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- published:start -->", "<!-- published:end -->"
KINDS = ("allocated", "active", "reserved", "capacity")
CRITERIA = ("device_total", "reserved")  # what a capacity row compares with the card


def load_rows(path: Path = TABLE) -> list[dict[str, Any]]:
    """The table, each row checked for the fields the run needs."""
    rows = json.loads(path.read_text())
    for r in rows:
        kind = r["measured"]["kind"]
        if kind not in KINDS:
            raise ValueError(f"{r['id']}: unknown kind {kind!r}; one of {KINDS}")
        if kind != "capacity" and not isinstance(r["measured"].get("bytes"), int):
            raise ValueError(f"{r['id']}: a memory row needs measured.bytes (an int)")
        if kind == "capacity" and "capacity" not in r:
            raise ValueError(f"{r['id']}: a capacity row needs capacity.gpu_bytes")
        criterion = r.get("capacity", {}).get("criterion", "device_total")
        if criterion not in CRITERIA:
            raise ValueError(
                f"{r['id']}: unknown capacity.criterion {criterion!r}; one of {CRITERIA}"
            )
    return rows


def _settings(row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    est = dict(row["estimate"])
    return est.pop("model"), est.pop("policy"), est


def predict_memory(row: dict[str, Any]) -> dict[str, Any]:
    """Predicted allocated and reserved bytes of one step of the row's setup."""
    model, policy, est = _settings(row)
    r = estimate_one(model, policy, gpu=None, overhead=0, **est)
    # the same step again (cached): with the allowance, the peak a card must hold
    full = estimate_one(model, policy, gpu=None, **est)
    if r is None or full is None:  # pragma: no cover - only "auto" gives None; no row uses it
        raise RuntimeError(f"{row['id']}: no estimate")
    return {
        "allocated": r.peak_bytes,
        "reserved": r.reserved_bytes,
        "device_total": full.peak_bytes,
        "breakdown": full.breakdown,
    }


def predict_capacity(row: dict[str, Any]) -> dict[str, Any]:
    """The longest sequence (a multiple of ``seq_step``) whose predicted figure fits the card."""
    model, policy, est = _settings(row)
    est.pop("seq", None)
    cap, step = row["capacity"]["gpu_bytes"], row["capacity"]["seq_step"]
    criterion = row["capacity"].get("criterion", "device_total")
    probes: dict[int, int] = {}

    def total(seq: int) -> int:
        if seq not in probes:
            r = estimate_one(model, policy, gpu=None, seq=seq, **est)
            if r is None:  # pragma: no cover
                raise RuntimeError(f"{row['id']}: no estimate at seq {seq}")
            # device_total: what the card must hold (context + held segments); reserved: what
            # the allocator reports holding (every cached segment, no context)
            probes[seq] = r.reserved_bytes if criterion == "reserved" else r.peak_bytes
        return probes[seq]

    limit = max_positions(resolve_model(model).config) or 1 << 30
    lo, hi = 0, min(step * 16, limit)  # lo fits (0: nothing yet), hi does not
    while total(hi) <= cap:
        if hi == limit:  # the model's positions, not memory, stop the search
            return {"seq": hi, criterion: probes[hi], "next": None, "criterion": criterion,
                    "probes": len(probes), "limited_by": "max_position_embeddings"}  # fmt: skip
        lo, hi = hi, min(hi * 2, limit)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if total(mid) <= cap:
            lo = mid
        else:
            hi = mid
    return {
        "seq": lo,
        criterion: probes.get(lo),
        "next": probes[hi],
        "criterion": criterion,
        "probes": len(probes),
    }


def run_row(row: dict[str, Any]) -> dict[str, Any]:
    """One row: the prediction of its kind and the error against the measured value."""
    t0 = time.perf_counter()
    kind = row["measured"]["kind"]
    if kind == "capacity":
        pred = predict_capacity(row)
        measured, predicted = int(row["measured"]["value"]), pred["seq"]
    else:
        pred = predict_memory(row)
        measured = row["measured"]["bytes"]
        predicted = pred["reserved"] if kind == "reserved" else pred["allocated"]
    return {
        "id": row["id"],
        "kind": kind,
        "modelled": row["modelled"],
        "not_modelled_reason": row.get("not_modelled_reason"),
        "measured": measured,
        "predicted": predicted,
        "error": predicted / measured - 1,
        "prediction": pred,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and worst absolute error over the modelled rows."""
    errs = [abs(r["error"]) for r in results if r["modelled"]]
    if not errs:
        return {"rows": 0, "median_abs_error": None, "worst_abs_error": None, "worst": None}
    worst = max((r for r in results if r["modelled"]), key=lambda r: abs(r["error"]))
    return {
        "rows": len(errs),
        "median_abs_error": statistics.median(errs),
        "worst_abs_error": abs(worst["error"]),
        "worst": worst["id"],
        "not_modelled": sum(1 for r in results if not r["modelled"]),
    }


def _fmt(kind: str, v: int | None) -> str:
    if v is None:
        return ""
    return f"{v:,} tokens" if kind == "capacity" else f"{v / 1e9:.2f} GB"


def markdown(
    rows: list[dict[str, Any]], results: list[dict[str, Any]], meta: dict[str, Any]
) -> str:
    """The README section: the table, the median and worst error, what each row assumes."""
    by_id = {r["id"]: r for r in rows}
    s = meta["summary"]
    lines = [
        "### Accuracy against published GPU measurements",
        "",
        f"Generated by `python -m benchmarks.published` from "
        f"[`benchmarks/published/measurements.json`](benchmarks/published/measurements.json) on "
        f"{meta['date']} (torch {meta['torch']}, transformers {meta['transformers']}); do not edit "
        f"by hand. Each row is a figure its authors measured on a GPU and published (source at a "
        f"commit), estimated here with the settings of that run. GB = 1e9 bytes. Kinds: "
        f"*allocated* = `max_memory_allocated`, *active* = `active_bytes.all.peak` (both: tensors "
        f"at the peak), *reserved* = `memory_reserved` (what the caching allocator holds), "
        f"*capacity* = the longest sequence that fit the card (rows whose `capacity.criterion` is "
        f"`reserved`: where a line through `max_memory_reserved` reaches the card's size).",
        "",
    ]
    if s["rows"]:
        lines.append(
            f"**Modelled rows ({s['rows']}): median absolute error {s['median_abs_error']:.1%}, "
            f"worst {s['worst_abs_error']:.1%}** (`{s['worst']}`). "
            f"{s['not_modelled']} rows gradckpt cannot model yet are listed below the table with "
            "the reason, estimated but not counted."
        )
        lines.append("")
    lines += [
        "Modelled: Hugging Face `transformers` models run as their eager code (the loss as the "
        "installed transformers computes it: fp32 logits inside its loss function, or as 4.46-4.48 "
        "did, or gradckpt's chunked head / Liger's fused linear cross-entropy: `--loss`); full "
        "fine-tune, LoRA and QLoRA (NF4 with or without double quantization, bitsandbytes "
        "before or from 0.44, peft's `prepare_model_for_kbit_training` or not); bf16 autocast "
        "or `bf16-true`; fp32 or base-dtype adapters; LoRA dropout; SDPA, flash or eager "
        "attention; AdamW, 8-bit AdamW, SGD; every checkpointing policy, offloading of block "
        "inputs to host memory included; the CUDA caching allocator's reserved memory. lit-gpt's "
        "rows run transformers' Llama of the same shapes in place of lit-gpt's own code (an "
        "assumption each row states). Not modelled yet: `torch.compile` (fused kernels, "
        "min-cut re-materialization), torchtune's `CEWithChunkedOutputLoss` (which keeps every "
        "chunk's logits), offloading of every saved tensor (torchtune's `OffloadActivations`), "
        "Unsloth's Triton kernels, paged optimizer states moving to host memory.",
        "",
        "| row | setup | kind | measured | predicted | error |",
        "|---|---|---|---:|---:|---:|",
    ]
    for res in results:
        row = by_id[res["id"]]
        src = row["source_url"]
        name = f"[{res['id']}]({src})"
        err = f"{res['error']:+.1%}" + ("" if res["modelled"] else " (not modelled)")
        lines.append(
            f"| {name} | {row['setup']} | {res['kind']} | {_fmt(res['kind'], res['measured'])} | "
            f"{_fmt(res['kind'], res['predicted'])} | {err} |"
        )
    lines += ["", "Settings and assumptions per row (all in `measurements.json`):", ""]
    for res in results:
        row = by_id[res["id"]]
        est = ", ".join(f"{k}={v}" for k, v in row["estimate"].items())
        lines.append(f"- `{res['id']}`: `{est}`.")
        for a in row["assumptions"]:
            lines.append(f"  Assumed: {a}.")
        if row.get("analysis"):
            lines.append(f"  Note: {row['analysis']}.")
        if not res["modelled"]:
            lines.append(f"  **Not modelled**: {res['not_modelled_reason']}.")
    lines += [
        "",
        f"Reproduce: `PYTHONPATH=src python -m benchmarks.published` ({meta['elapsed_s']:.0f} s here, "
        f"{meta['machine']}).",
    ]
    return "\n".join(lines) + "\n"


def write_readme(section: str, readme: Path = README) -> None:
    """Replace the README's published section (between the markers) with ``section``."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{section}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated row ids")
    ap.add_argument("--no-write", action="store_true", help="print only; write no files")
    ap.add_argument(
        "--render",
        metavar="RESULTS.json",
        help="rebuild the .md and the README section from a results file, estimating nothing",
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = load_rows()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        section = markdown(rows, saved["results"], saved["meta"])
        Path(args.render).with_suffix(".md").write_text(section)
        write_readme(section)
        print(f"wrote {Path(args.render).with_suffix('.md')} and the README section")
        return 0
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r["id"] for r in rows}
        if unknown:
            print(f"unknown row ids: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        rows = [r for r in rows if r["id"] in wanted]
    torch.set_num_threads(1)
    results = []
    for row in rows:
        res = run_row(row)
        results.append(res)
        flag = "" if res["modelled"] else "  (not modelled)"
        print(
            f"{res['id']:<58} {res['kind']:<9} measured {_fmt(res['kind'], res['measured']):>16} "
            f"predicted {_fmt(res['kind'], res['predicted']):>16} {res['error']:+7.1%}{flag}",
            flush=True,
        )
    import transformers

    meta = {
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gradckpt": gradckpt.__version__ if hasattr(gradckpt, "__version__") else None,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread",
        "elapsed_s": time.perf_counter() - t0,
        "summary": summary(results),
    }
    s = meta["summary"]
    if s["rows"]:
        print(
            f"modelled rows: {s['rows']}; median |error| {s['median_abs_error']:.1%}, "
            f"worst {s['worst_abs_error']:.1%} ({s['worst']})"
        )
    if args.no_write or args.only:
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"published-{meta['date']}"
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1) + "\n"
    )
    section = markdown(rows, results, meta)
    stem.with_suffix(".md").write_text(section)
    write_readme(section)
    print(f"wrote {stem}.json, {stem}.md and the README section")
    return 0
