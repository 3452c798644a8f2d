"""Command-line values shared by the ``gradckpt`` commands: the CLI splits strings, the library takes lists.

``int_list`` is an argparse ``type=``. The others run after parsing and raise ``ConfigError``,
so their one-line messages read like the library's (``gradckpt plan: error: ...``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from ..errors import ConfigError
from ..estimate.gpus import GPU, GPU_PRESETS
from ..estimate.sweep import gpu_prices, int_values

__all__ = [
    "gpu_names",
    "int_list",
    "lora_targets",
    "parse_int_list",
    "parse_prices",
    "policy_names",
]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",")]


def int_list(text: str) -> list[int]:
    """argparse type: ``"512,1024"`` -> ``[512, 1024]`` (values < 1 are left to the library)."""
    items = _split(text)
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


def parse_int_list(value: str | int | Sequence[int], what: str) -> list[int]:
    """``"1024,512,1024"`` (or an int, or a list) -> ``[512, 1024]``: sorted, no repeats, each >= 1.

    Example:
        >>> parse_int_list("1024, 512,1024", "seq")
        [512, 1024]
    """
    if isinstance(value, str):
        items = _split(value)
        if all(not t for t in items):
            raise ConfigError(f"{what} list is empty: give at least one value, e.g. 512,1024")
        numbers = []
        for t in items:
            if not t.lstrip("+-").isdigit():
                raise ConfigError(
                    f"{what} value {t!r} is not a whole number; write e.g. 512,1024,2048"
                )
            numbers.append(int(t))
        return int_values(numbers, what)
    return int_values(value, what)


def price_map(text: str) -> dict[str, str]:
    """``"rtx-4090=0.35,a100-80gb=1.6"`` -> ``{"rtx-4090": "0.35", ...}`` (the library checks the rest)."""
    out: dict[str, str] = {}
    for item in _split(text):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(
                f"price {item!r} is not GPU=PRICE; write e.g. rtx-4090=0.35,a100-80gb=1.6"
            )
        name, _, amount = item.partition("=")
        name = name.strip()
        if name in out:
            raise ConfigError(f"GPU {name!r} has two prices; give one")
        out[name] = amount.strip()
    return out


def parse_prices(
    value: str | Mapping[str, float] | None, known: Sequence[GPU] = ()
) -> dict[str, float]:
    """``"4090=0.35,a100-80gb=1.6"`` (or a mapping) -> ``{"rtx-4090": 0.35, "a100-80gb": 1.6}``.

    Example:
        >>> parse_prices("4090=0.35, a100-80gb=1.6")
        {'rtx-4090': 0.35, 'a100-80gb': 1.6}
    """
    if isinstance(value, str):
        return gpu_prices(price_map(value), known)  # type: ignore[arg-type]
    return gpu_prices(value, known)


def gpu_names(text: str) -> list[str]:
    """``--gpu``: ``"rtx-4090,24GB"`` -> ``["rtx-4090", "24GB"]``; ``"all"`` -> every preset."""
    if text.strip().lower() == "all":
        return list(GPU_PRESETS)
    names = [t for t in _split(text) if t]
    if not names:
        raise ConfigError("--gpu list is empty: name presets, e.g. rtx-4090,a100-80gb, or 'all'")
    return names


def policy_names(text: str) -> list[str]:
    """``--policy``: ``"none,full,every:2"`` -> a list (empty names left for the library to refuse)."""
    return _split(text)


def lora_targets(text: str) -> str | list[str]:
    """``--lora-targets``: ``"all-linear"`` as is, ``"q_proj,v_proj"`` -> ``["q_proj", "v_proj"]``."""
    text = text.strip()
    return text if text == "all-linear" else [t for t in _split(text) if t]
