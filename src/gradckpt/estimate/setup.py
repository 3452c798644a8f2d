"""Deprecated alias of ``gradckpt.estimate.training`` (renamed: the module holds ``TrainingSetup``).

Import from ``gradckpt.estimate`` (``TrainingSetup``) or ``gradckpt.estimate.training``; this
module goes away in the next release.
"""

from __future__ import annotations

import warnings

from .training import (
    ATTENTION,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    TrainingSetup,
    apply_method,
    optimizer_state_bytes,
)

__all__ = [
    "ATTENTION",
    "METHODS",
    "OPTIMIZERS",
    "PRECISIONS",
    "TrainingSetup",
    "apply_method",
    "optimizer_state_bytes",
]

warnings.warn(
    "gradckpt.estimate.setup is renamed gradckpt.estimate.training; import from there "
    "(or TrainingSetup from gradckpt.estimate). The old name goes away in the next release.",
    DeprecationWarning,
    stacklevel=2,
)
