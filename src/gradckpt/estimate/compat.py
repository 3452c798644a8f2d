"""Input forms kept for one release with a DeprecationWarning: comma-separated strings.

The library takes lists and mappings; ``gradckpt plan`` splits its command line itself
(``gradckpt.cli._args``). Until the next release ``estimate``, ``sweep`` and ``TrainingSetup``
still accept ``"512,1024"``, ``"none,full"``, ``"rtx-4090,a100-80gb"``, ``"all"``,
``"rtx-4090=0.35,..."`` and ``"q_proj,v_proj"``, split here and then checked like a list.
"""

from __future__ import annotations

import os
import sys
import warnings

from ..errors import ConfigError

__all__ = ["deprecated_csv", "deprecated_prices", "warn_deprecated"]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_stacklevel() -> int:
    """``stacklevel`` of the first frame outside gradckpt, so the warning names the caller's line.

    Frames of dataclass-generated ``__init__`` (file ``<string>``) count as gradckpt's: they
    sit between ``TrainingSetup(...)`` and its ``__post_init__``.
    """
    frame = sys._getframe(2)  # the caller of warn_deprecated
    level = 2
    while frame is not None:
        name = frame.f_code.co_filename
        generated = name == "<string>" and frame.f_code.co_name == "__init__"
        if not (generated or os.path.abspath(name).startswith(_PACKAGE + os.sep)):
            break
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def warn_deprecated(message: str) -> None:
    """A ``DeprecationWarning`` pointing at the first line of user code on the stack."""
    warnings.warn(message, DeprecationWarning, stacklevel=_user_stacklevel())


def deprecated_csv(value: str, what: str, example: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "", "c"]`` (tokens stripped, empties kept), with a warning."""
    warn_deprecated(
        f"{what}={value!r}: a comma-separated string is deprecated and will be refused in the "
        f"next release; pass a list, e.g. {what}={example}"
    )
    return [t.strip() for t in value.split(",")]


def deprecated_prices(value: str) -> list[tuple[str, str]]:
    """``"rtx-4090=0.35,a100-80gb=1.6"`` -> ``[(name, amount), ...]`` (empties skipped), with a warning."""
    pairs = []
    for item in deprecated_csv(value, "prices", "{'rtx-4090': 0.35}"):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(
                f"price {item!r} is not GPU=PRICE; write e.g. rtx-4090=0.35,a100-80gb=1.6"
            )
        name, _, amount = item.partition("=")
        pairs.append((name.strip(), amount.strip()))
    return pairs
