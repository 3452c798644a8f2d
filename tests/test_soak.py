"""Soak: live bytes after every step are constant and live storages do not grow.

30 steps per policy here, 300 in the ``slow`` test, measured by tracking every storage the
steps allocate (a dispatch mode), not by sampling.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_soak.py -q -s        # fast
     OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_soak.py -q -s -m slow  # 300 steps
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch

import gradckpt
from gradckpt.measure import live_tensors
from guard_models import IDS, MASK, LiveStorages, net, policies

# -- 3. soak --------------------------------------------------------------------------------


def soak(policy: str, steps: int, leak: bool = False) -> dict[str, Any]:
    """Train ``steps`` steps under LiveStorages; live bytes and storages after each step."""
    model = net(3)
    gradckpt.enable(model, policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kept = []
    gc.collect()
    live, storages = [], []
    tensors_before = len(live_tensors())
    with LiveStorages() as tracker:
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(i)
            loss = model(IDS, MASK)
            loss.backward()
            opt.step()
            if leak:
                kept.append(loss.detach())
            del loss
            # Device and host bytes: one "cpu" entry on a CPU-only run (offloaded inputs stay
            # in host memory, which is the device); "cuda" and "cpu" apart on a GPU.
            live.append(dict(tracker.bytes))
            storages.append(tracker.storages)
    gc.collect()
    tensors_after = len(live_tensors())
    gradckpt.disable(model)
    total = [sum(b.values()) for b in live]
    return {
        "live": total,
        "per_device": live[-1],
        "storages": storages,
        "drift": max(total) - min(total),
        "tensor_growth": tensors_after - tensors_before,
    }


SOAK_RESULTS: dict[str, dict[str, Any]] = {}


def _check_soak(policy: str, steps: int) -> None:
    r = soak(policy, steps)
    SOAK_RESULTS[f"{policy}x{steps}"] = r
    # Optimizer states appear in step 0; from then on nothing is allocated for good.
    assert r["drift"] == 0, (policy, r["live"][:5], r["live"][-5:])
    assert len(set(r["storages"])) == 1, (policy, r["storages"][:5], r["storages"][-5:])
    print(
        f"\nsoak {policy}: {steps} steps, live {r['per_device']} B after every step, drift "
        f"{r['drift']} B, {r['storages'][0]} live storages, python tensors "
        f"+{r['tensor_growth']} after the run (AdamW states, gradients)"
    )


@pytest.mark.parametrize("policy", policies())
def test_soak_fast(policy: str) -> None:
    _check_soak(policy, 30)


@pytest.mark.slow
@pytest.mark.parametrize("policy", policies())
def test_soak_300_steps(policy: str) -> None:
    _check_soak(policy, 300)


def test_soak_harness_sees_a_leak() -> None:
    """Negative control: keeping one fp32 scalar per step shows as exactly 4 bytes per step."""
    r = soak("full", 10, leak=True)
    assert [b - a for a, b in zip(r["live"], r["live"][1:])] == [4] * 9
    assert r["storages"][-1] - r["storages"][0] == 9
