"""Byte sizes: parse "20GiB"/"20GB"/"512MiB"/ints, and print integers as human units."""

from __future__ import annotations

import re

from .errors import BudgetError

__all__ = ["format_bytes", "parse_bytes", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, *, what: str = "size") -> int:
    """Parse a byte size into an int; a bad value raises ``ValueError`` (the caller picks the error kind).

    Args:
        value: an int number of bytes, or a string such as ``"20GiB"``, ``"20GB"``, ``"512MiB"``.
            Decimal units (GB) are powers of 1000, binary units (GiB) powers of 1024.
        what: the name of the setting, used in error messages.

    Returns:
        The size in bytes (int, > 0).

    Example:
        >>> parse_size("1.5GiB")
        1610612736
    """
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a size like '20GiB' or an int of bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{what} must be a finite size, got {value!r}")
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"{what} {value!r} is not a size: write a number and a unit, e.g. '20GiB', '20GB', '512MiB'"
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ValueError(
            f"{what} must be a size like '20GiB' or an int of bytes, got {type(value).__name__}"
        )
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return n


def parse_bytes(value: int | float | str, *, what: str = "size") -> int:
    """Parse a byte size into an int (``gradckpt.parse_bytes``): ``parse_size`` raising ``BudgetError``.

    Example:
        >>> parse_bytes("20GiB")
        21474836480
    """
    try:
        return parse_size(value, what=what)
    except ValueError as e:
        raise BudgetError(str(e)) from None


def format_bytes(n: int | float, *, signed: bool = False) -> str:
    """Print a byte count with a binary unit: ``format_bytes(3 * 2**30) == "3.00 GiB"``."""
    sign = ""
    if signed and n > 0:
        sign = "+"
    if n < 0:
        sign, n = "-", -n
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"
