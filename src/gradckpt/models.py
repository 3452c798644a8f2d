"""Deprecated alias of ``gradckpt.bench.models`` (moved there; this name goes in the next release)."""

from __future__ import annotations

import warnings

from .bench.models import (
    BENCH_PRESETS,
    MAX_LAYERS,
    BenchModel,
    MLPBlock,
    MLPStack,
    build_bench_model,
    make_batch,
)

warnings.warn(
    "gradckpt.models moved to gradckpt.bench.models; import from there "
    "(this alias is removed in the next release)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "BENCH_PRESETS",
    "MAX_LAYERS",
    "BenchModel",
    "MLPBlock",
    "MLPStack",
    "build_bench_model",
    "make_batch",
]
