"""Benchmark layer: every policy on one model side by side (``run``) and the models it runs on (``models``)."""

from __future__ import annotations

from .models import BENCH_PRESETS, BenchModel, MLPStack, build_bench_model, make_batch
from .run import (
    BenchReport,
    PolicyResult,
    StepTimes,
    default_policies,
    machine_info,
    run_bench,
    time_interleaved,
)

__all__ = [
    "BENCH_PRESETS",
    "BenchModel",
    "BenchReport",
    "MLPStack",
    "PolicyResult",
    "StepTimes",
    "build_bench_model",
    "default_policies",
    "machine_info",
    "make_batch",
    "run_bench",
    "time_interleaved",
]
