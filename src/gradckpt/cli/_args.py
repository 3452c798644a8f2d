"""argparse types shared by the ``gradckpt`` commands: the CLI splits strings, the library takes lists."""

from __future__ import annotations

import argparse

__all__ = ["int_list"]


def int_list(text: str) -> list[int]:
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
