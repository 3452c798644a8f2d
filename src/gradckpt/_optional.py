"""Optional dependencies (transformers, peft, matplotlib...): imported when first needed, one message."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError

__all__ = ["require"]


def require(module: str, extra: str, *, purpose: str | None = None) -> ModuleType:
    """Import ``module``, or raise ``ConfigError`` naming the gradckpt extra that installs it.

    ``import gradckpt`` needs only torch (DESIGN.md); everything else is imported here, at the
    first call that needs it.

    Args:
        module: the module to import, dotted (``"transformers"``, ``"matplotlib.pyplot"``).
        extra: the extra of ``pyproject.toml`` that brings it (``"hf"``, ``"plot"``).
        purpose: what needs it, for the message (``"LoRA/QLoRA estimates"``).

    Returns:
        The imported module.

    Raises:
        ConfigError: the module cannot be imported; the message says ``pip install 'gradckpt[extra]'``.

    Example:
        >>> peft = require("peft", "hf", purpose="LoRA/QLoRA estimates")
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".", 1)[0]
        why = f" is needed for {purpose} and" if purpose else ""
        raise ConfigError(
            f"{package}{why} cannot be imported ({e}): pip install 'gradckpt[{extra}]'"
        ) from e
