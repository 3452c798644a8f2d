"""Estimate a fine-tune's peak memory and checkpointing cost from a config alone: no weights, no GPU.

The face of the package: re-exports only. ``estimator`` holds ``estimate()``, ``sweep`` the
sweeps and searches over it, ``sharding`` the per-GPU split over data-parallel GPUs,
``gpu_count`` how many GPUs a run needs, ``report`` the results as data.

Example:
    >>> import gradckpt
    >>> report = gradckpt.estimate("mistral-7b", method="lora", batch=1, seq=2048, gpu="rtx-4090")
    >>> [(r.policy, r.peak_bytes, r.fits) for r in report.results]
"""

from __future__ import annotations

from .estimator import DEFAULT_POLICIES, REFERENCE_GPU, estimate
from .gpu_count import GpuCount, GpuCountReport, gpus_needed
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
from .sharding import GPU_COUNTS, SHARD_MODES, Sharding
from .step_cost import CUDA_CONTEXT_BYTES
from .training import METHODS, OPTIMIZERS, PRECISIONS, TrainingSetup

__all__ = [
    "BREAKDOWN",
    "BREAKDOWN_HELP",
    "BREAKDOWN_KEYS",
    "CUDA_CONTEXT_BYTES",
    "DEFAULT_POLICIES",
    "GPU",
    "GPU_COUNTS",
    "GPU_PRESETS",
    "METHODS",
    "MODEL_PRESETS",
    "OPTIMIZERS",
    "PRECISIONS",
    "REFERENCE_GPU",
    "SHARD_MODES",
    "Alternative",
    "EstimateReport",
    "GpuCount",
    "GpuCountReport",
    "GpuOption",
    "LargestFit",
    "ModelPreset",
    "ModelSpec",
    "PolicyEstimate",
    "Sharding",
    "SweepPoint",
    "SweepReport",
    "TrainingSetup",
    "estimate",
    "get_gpu",
    "gpus_needed",
    "resolve_model",
]
