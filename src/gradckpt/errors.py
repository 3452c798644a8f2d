"""One base error for everything gradckpt refuses, with a subclass per kind of mistake."""

from __future__ import annotations

__all__ = [
    "BlockError",
    "BudgetError",
    "CheckpointMismatchError",
    "ConfigError",
    "GradCkptError",
    "PlanError",
    "PolicyError",
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
