"""Measurement: one live-storage tracker, FLOP counts, and ``measure(step_fn)`` -> MemoryStats."""

from __future__ import annotations

from .flops import count_flops
from .step import MemoryStats, StepTracker, measure
from .tracker import LiveStorageTracker, io_bytes, is_view_op, live_tensors, storages

__all__ = [
    "LiveStorageTracker",
    "MemoryStats",
    "StepTracker",
    "count_flops",
    "io_bytes",
    "is_view_op",
    "live_tensors",
    "measure",
    "storages",
]
