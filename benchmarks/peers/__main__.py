"""Command line: ``python -m benchmarks.peers [--quick] [--from-json FILE] ...``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import __doc__ as package_doc
from .analysis import refresh
from .configs import COMPILE_BUDGETS, CPU_THREADS, DEFAULTS, QUICK, RESULTS_DIR
from .report import render_markdown, write_outputs
from .run import run_peers


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description=(package_doc or "").split("\n\n")[0]
    )
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
    p.add_argument(
        "--log",
        action="store_true",
        help="print each step with its elapsed time on stderr (default: a progress bar on a "
        "terminal, nothing otherwise)",
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
    with _progress(a.log) as progress:
        res = _run(a, base, budgets, progress)
    paths = write_outputs(res, a.out_dir, a.stem)
    print(render_markdown(res))
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0


@contextmanager
def _progress(log: bool) -> Iterator[Callable[[str], None]]:
    """A transient progress bar on a terminal; timestamped lines with ``--log``; else silent."""
    t0 = time.perf_counter()
    if log:
        yield lambda msg: print(
            f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True
        )
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda msg: None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("peers", total=None)
        yield lambda msg: bar.update(task, description=msg)


def _run(
    a: argparse.Namespace,
    base: dict[str, Any],
    budgets: list[float],
    progress: Callable[[str], None],
) -> Any:
    return run_peers(
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


if __name__ == "__main__":
    raise SystemExit(main())
