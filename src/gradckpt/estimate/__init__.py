"""Estimate a fine-tune's peak memory and checkpointing cost from a config alone: no weights, no GPU.

The face of the package: re-exports only. ``estimator`` holds ``estimate()``, ``sweep`` the
sweeps and searches over it, ``report`` the results as data.

Example:
    >>> import gradckpt
    >>> report = gradckpt.estimate("mistral-7b", method="lora", batch=1, seq=2048, gpu="rtx-4090")
    >>> [(r.policy, r.peak_bytes, r.fits) for r in report.results]
"""

from __future__ import annotations

from .estimator import DEFAULT_POLICIES, REFERENCE_GPU, estimate
from .gpus import GPU, GPU_PRESETS, get_gpu
from .presets import MODEL_PRESETS, ModelPreset, ModelSpec, resolve_model
from .report import (
    BREAKDOWN,
    BREAKDOWN_HELP,
    BREAKDOWN_KEYS,
    Alternative,
    EstimateReport,
    GpuOption,
    LargestFit,
    PolicyEstimate,
    SweepPoint,
    SweepReport,
)
from .step_cost import CUDA_CONTEXT_BYTES
from .training import METHODS, OPTIMIZERS, PRECISIONS, TrainingSetup

__all__ = [
    "BREAKDOWN",
    "BREAKDOWN_HELP",
    "BREAKDOWN_KEYS",
    "CUDA_CONTEXT_BYTES",
    "DEFAULT_POLICIES",
    "GPU",
    "GPU_PRESETS",
    "METHODS",
    "MODEL_PRESETS",
    "OPTIMIZERS",
    "PRECISIONS",
    "REFERENCE_GPU",
    "Alternative",
    "EstimateReport",
    "GpuOption",
    "LargestFit",
    "ModelPreset",
    "ModelSpec",
    "PolicyEstimate",
    "SweepPoint",
    "SweepReport",
    "TrainingSetup",
    "estimate",
    "get_gpu",
    "resolve_model",
]
