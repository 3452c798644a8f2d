"""gradckpt: gradient (activation) checkpointing for PyTorch that makes training fit at the least cost.

The whole public API is here; everything else is internal.

Example:
    >>> import gradckpt
    >>> plan = gradckpt.enable(model, policy="full")
    >>> stats = gradckpt.measure(lambda: model(**batch).loss.backward(), model=model)
    >>> gradckpt.disable(model)
"""

from __future__ import annotations

from .blocks import find_blocks
from .enable import applied_plan, disable, enable
from .errors import (
    BlockError,
    BudgetError,
    CheckpointMismatchError,
    ConfigError,
    GradCkptError,
    PlanError,
    PolicyError,
)
from .estimate import EstimateReport, estimate
from .estimate.sweep import SweepReport, sweep
from .measure import MemoryStats, measure
from .planner.api import plan  # the verb; Plan and Decision live in the module gradckpt.plans
from .plans import Decision, Plan
from .policies import make_plan, policy_aliases, policy_names
from .runtime.builtin import register_builtin
from .runtime.checkpoint import checkpoint
from .units import format_bytes, parse_bytes
from .verify import VerifyReport, verify

__version__ = "0.1.0"

register_builtin()  # decisions and the policies that need runtime code (explicit, not by import)

__all__ = [
    "BlockError",
    "BudgetError",
    "CheckpointMismatchError",
    "ConfigError",
    "Decision",
    "EstimateReport",
    "GradCkptError",
    "MemoryStats",
    "Plan",
    "PlanError",
    "PolicyError",
    "SweepReport",
    "VerifyReport",
    "__version__",
    "applied_plan",
    "checkpoint",
    "disable",
    "enable",
    "estimate",
    "find_blocks",
    "format_bytes",
    "make_plan",
    "measure",
    "parse_bytes",
    "plan",
    "policy_aliases",
    "policy_names",
    "sweep",
    "verify",
]
