"""``gradckpt verify``: are the gradients still right? One step with and without each plan, compared."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PlanError
from ._progress import progress_bar
from .bench import positive_int as _positive_int

__all__ = ["add_parser", "render", "run"]

_DEFAULT_POLICY = "full"


def _tolerance(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (x >= 0 and x != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return x


def add_parser(sub: Any) -> None:
    from ..bench.models import BENCH_PRESETS

    p = sub.add_parser(
        "verify",
        help="check that a plan gives the same loss, gradients and buffers as no checkpointing",
        description="Run one training step with and without each plan from the same RNG state "
        "and compare the loss, every parameter gradient and every buffer. Exits 1 on a mismatch.",
    )
    p.add_argument(
        "--model",
        default="llama",
        help=f"preset ({', '.join(BENCH_PRESETS)}) or a Hugging Face config.json path (default: llama)",
    )
    p.add_argument(
        "--policy",
        action="append",
        default=None,
        metavar="POLICY",
        help="policy to check, repeatable or comma-separated; 'all' for every policy "
        f"(default: {_DEFAULT_POLICY} unless --plan is given)",
    )
    p.add_argument(
        "--plan",
        type=Path,
        action="append",
        default=None,
        metavar="FILE.json",
        help="check a plan saved as JSON (repeatable)",
    )
    p.add_argument("--batch", type=_positive_int, default=2, help="micro-batch size (default 2)")
    p.add_argument("--seq", type=_positive_int, default=64, help="sequence length (default 64)")
    p.add_argument(
        "--layers",
        type=_positive_int,
        default=None,
        help="number of blocks (default: the preset's)",
    )
    p.add_argument("--seed", type=int, default=0, help="RNG seed both runs start from (default 0)")
    p.add_argument(
        "--atol",
        type=_tolerance,
        default=0.0,
        help="tolerated absolute difference (default 0: exact)",
    )
    p.add_argument(
        "--rtol",
        type=_tolerance,
        default=0.0,
        help="tolerated relative difference (default 0: exact)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="write results as JSON to FILE, or to stdout (instead of the tables) without FILE",
    )
    p.set_defaults(run=run)


def _policies(given: list[str] | None, have_plans: bool) -> list[str]:
    from ..policies import get_policy, policy_names

    if not given:
        return [] if have_plans else [_DEFAULT_POLICY]
    out: list[str] = []
    for text in given:
        items = [s.strip() for s in text.split(",")]
        if any(not s for s in items):
            raise ConfigError(f"--policy must be a name or a comma-separated list, got {text!r}")
        for item in items:
            if item.lower() == "all":
                for usage in policy_names():
                    name, _, arg = usage.partition(":")
                    if not arg:
                        out.append(name)
                    elif arg == "K":
                        out.append(f"{name}:2")
            else:
                get_policy(item)  # unknown names fail here, before any model is built
                out.append(item)
    return list(dict.fromkeys(out))


def _load_plan(path: Path) -> Any:
    from ..plans import Plan

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(f"plan file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"cannot read plan file {str(path)!r}: {e}") from None
    try:
        return Plan.from_json(text)
    except PlanError as e:
        raise PlanError(f"{path}: {e}") from None


def _device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device: use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: gradckpt verify runs on cpu or cuda")
    return dev


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate" in text


def render(report: Any, model: str) -> Any:
    """A rich Table of one VerifyReport."""
    from rich.table import Table

    from ..verify import format_diff

    verdict = "[green]PASS[/green]" if report.passed else "[red]FAIL[/red]"
    t = Table(title=f"{model}, {report.plan.summary()}: {verdict}", title_justify="left")
    for col in ("parameter group", "tensors", "max abs diff", "max rel diff", "result"):
        t.add_column(col, justify="left" if col == "parameter group" else "right")
    for g in report.groups:
        t.add_row(
            g.name,
            str(g.tensors),
            format_diff(g.max_abs),
            format_diff(g.max_rel),
            "pass" if g.passed else "[red]FAIL[/red]",
        )
    return t


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.markup import escape

    from ..bench.models import build_bench_model, make_batch
    from ..verify import verify

    plans = [_load_plan(p) for p in args.plan or []]
    policies = _policies(args.policy, bool(plans))
    device = _device(args.device)
    if args.json not in (None, "-"):
        target = Path(args.json)
        if target.is_dir() or not target.parent.exists():
            raise ConfigError(f"--json {args.json!r}: not a file in an existing directory")

    try:
        bm = build_bench_model(args.model, layers=args.layers)
        model = bm.model.to(device).train()
        batch = make_batch(bm, args.batch, args.seq, seed=args.seed)
        todo = [*policies, *plans]
        reports = []
        with progress_bar("verify", len(todo), enabled=not args.json) as step:
            for plan in todo:
                reports.append(
                    verify(model, batch, plan, atol=args.atol, rtol=args.rtol, seed=args.seed)
                )
                step(f"verified {getattr(plan, 'policy', plan)}")
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        raise ConfigError(
            f"not enough memory for {args.model} at batch {args.batch}, seq {args.seq}: "
            "try a smaller --batch, --seq or --layers"
        ) from None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    passed = all(r.passed for r in reports)
    result = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "layers": len(reports[0].plan.blocks) if reports else args.layers,
        "device": str(device),
        "seed": args.seed,
        "passed": passed,
        "results": [r.to_dict() for r in reports],
    }
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return 0 if passed else 1

    out = Console()
    if not out.is_terminal:
        out = Console(width=140)  # a pipe or a file: do not squeeze the tables into 80 columns
    for r in reports:
        out.print(render(r, args.model))
        for problem in r.problems:
            out.print(f"  [red]x[/red] {escape(problem)}")
    n = len(reports)
    if passed:
        exact = all(r.max_abs == 0 for r in reports)
        how = "bit-identical" if exact else f"within atol {args.atol}, rtol {args.rtol}"
        reordered = max((r.scale_rtol for r in reports), default=0.0)
        if not exact and reordered:  # chunked loss head / tiles: equal within rounding
            how += (
                f" (plans that reorder sums: within {reordered:g} of each tensor's largest value)"
            )
        print(f"PASS: {n} plan(s); loss, every gradient and every buffer {how} to no checkpointing")
    else:
        bad = ", ".join(r.plan.policy for r in reports if not r.passed)
        print(f"FAIL: {bad} changed the loss, gradients or buffers; see the rows marked FAIL")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if passed else 1
