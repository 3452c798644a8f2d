"""Shared test setup: deterministic CPU kernels, the gpu marker, small helpers."""

from __future__ import annotations

import copy
import os

# Bit-identical gradients on CPU need MKL's results to depend on the values alone. On some x86
# CPUs (AMD EPYC with AVX-512 here) MKL picks its gemm kernels by memory alignment, so a block
# recomputed into other addresses differs from the first forward in the last bit (GPT-2, T5,
# BART: 6e-8); its "conditional numerical reproducibility" mode removes that. MKL reads it at its
# first call, so it is set before torch computes anything (subprocesses inherit it).
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.use_deterministic_algorithms(True, warn_only=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        n: (None if p.grad is None else p.grad.detach().clone())
        for n, p in model.named_parameters()
    }


def run_step(model: torch.nn.Module, batch: dict, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """One forward+backward from a fixed RNG state; returns (loss, grads)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), grads_of(model)


@pytest.fixture
def clone():
    return copy.deepcopy
