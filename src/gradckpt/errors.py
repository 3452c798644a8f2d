"""One base error for everything gradckpt refuses, with a subclass per kind of mistake."""

from __future__ import annotations

import warnings

__all__ = [
    "BlockError",
    "BudgetError",
    "CheckpointMismatchError",
    "ConfigError",
    "GradCkptError",
    "PlanError",
    "PolicyError",
    "warn_once",
]


class GradCkptError(Exception):
    """Base class: every error gradckpt raises on purpose. Messages say what was wrong and what to do."""


class PolicyError(GradCkptError, ValueError):
    """An unknown or malformed policy name (e.g. ``"every:0"``)."""


class BlockError(GradCkptError, ValueError):
    """The blocks to checkpoint could not be found, or the ones named do not exist."""


class PlanError(GradCkptError, ValueError):
    """A plan that does not fit the model it is applied to, or malformed plan data."""


class BudgetError(GradCkptError, ValueError):
    """A memory budget that is malformed or cannot be met by any plan."""


class ConfigError(GradCkptError, ValueError):
    """A bad setting: a model preset, config file, size, batch or sequence length."""


class CheckpointMismatchError(GradCkptError, RuntimeError):
    """A recompute produced different tensors from the forward pass (non-determinism)."""


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process, then never again.

    The warning points at the caller's caller (``stacklevel=3``): the user code whose call
    reached the gradckpt function that warns.
    """
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)
