"""The ``gradckpt`` command: one entry point, a subcommand per module, thin over the library."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from ..errors import GradCkptError

__all__ = ["main"]

# Each module defines add_parser(subparsers) and run(args) -> int.
_COMMANDS = ("bench", "plan", "verify")


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (no usage dump) on a bad argument."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"gradckpt: error: {message}\n")


def _modules() -> list[ModuleType]:
    out = []
    for name in _COMMANDS:
        try:
            out.append(importlib.import_module(f"{__name__}.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradckpt",
        description="Gradient checkpointing for PyTorch: bench policies, plan a run, verify gradients.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in _modules():
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except GradCkptError as e:
        print(f"gradckpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradckpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
