"""Memory budget planner: profile a step, then pick per block the cheapest decision that fits."""

from __future__ import annotations

from .model import BlockOption, StepProfile, predict_cost, predict_peak
from .solve import Solution, min_peak, solve

__all__ = [
    "BlockOption",
    "Solution",
    "StepProfile",
    "min_peak",
    "predict_cost",
    "predict_peak",
    "solve",
]
