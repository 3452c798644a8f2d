"""Faults leave nothing behind: an exception in forward, in the recompute, or between two blocks.

No saved-tensor hooks, dispatch modes or recompute flag stay behind, no memory is held, the
next step is bit-exact, and ``disable`` gives back exactly the original model.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_faults.py -q
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradckpt
from gradckpt import Decision
from gradckpt.runtime.decisions import WRAPPERS
from guard_models import (
    IDS,
    MASK,
    Boom,
    LiveStorages,
    Net,
    assert_pristine,
    assert_same_step,
    clean_state,
    net,
    policies,
)

# -- 2. faults ------------------------------------------------------------------------------


def _fail_at(model: Net, where: str, index: int) -> None:
    for i, layer in enumerate(model.layers):
        layer.fail = where if (i == index and where != "between") else None
    model.fail_between = index if where == "between" else None


@pytest.mark.parametrize("where", ["forward", "recompute", "between"])
@pytest.mark.parametrize("policy", policies())
def test_fault_leaves_nothing_behind(policy: str, where: str) -> None:
    model, reference = net(), net()
    plan = gradckpt.enable(model, policy)
    for index in (0, 1, 3):
        if where == "recompute" and plan.decisions[index] is Decision.SAVE:
            continue  # nothing is recomputed for this block
        if where == "between" and index == 3:
            continue
        for m in (model, reference):
            _fail_at(m, where, index)
        torch.manual_seed(index)
        if where == "recompute":
            loss = model(IDS, MASK)
            with pytest.raises(Boom) as info:
                loss.backward()
            del loss
            torch.manual_seed(index)
            reference(IDS, MASK)  # the same forward on the reference: BatchNorm moved once
        else:
            with pytest.raises(Boom) as info:
                model(IDS, MASK)
            torch.manual_seed(index)
            with pytest.raises(Boom):
                reference(IDS, MASK)
        clean_state()  # with the exception (and its traceback) still alive
        del info
        for m in (model, reference):
            _fail_at(m, "none", -1)
        assert_same_step(model, reference, seed=10 + index)  # the next step is exact
    gradckpt.disable(model)
    assert_pristine(model, reference)
    assert_same_step(model, reference, seed=99)


def test_fault_during_enable_leaves_nothing_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    model = net()
    reference = copy.deepcopy(model)
    original = WRAPPERS[Decision.RECOMPUTE]
    calls = []

    def flaky(name: str, block: nn.Module, forward: Callable[..., Any], options: Any) -> Any:
        calls.append(name)
        if len(calls) == 3:
            raise Boom("wrapper failed on the third block")
        return original(name, block, forward, options)

    monkeypatch.setitem(WRAPPERS, Decision.RECOMPUTE, flaky)
    with pytest.raises(Boom):
        gradckpt.enable(model, "full")
    assert_pristine(model, reference)
    assert_same_step(model, reference)


def test_faulty_steps_hold_no_memory() -> None:
    """A failing step (each kind) then a normal one, per policy: live bytes after each normal step equal."""
    for policy in policies():
        model = net(3)
        plan = gradckpt.enable(model, policy)
        recomputed = [i for i, d in enumerate(plan.decisions) if d is not Decision.SAVE]
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        gc.collect()
        after = []
        with LiveStorages() as tracker:
            for where in ("none", "forward", "recompute", "between"):
                _fail_at(model, where, recomputed[0] if recomputed and where == "recompute" else 1)
                with contextlib.suppress(Boom):
                    model(IDS, MASK).backward()
                _fail_at(model, "none", -1)
                opt.zero_grad(set_to_none=True)
                model(IDS, MASK).backward()
                opt.step()
                gc.collect()  # exceptions and tracebacks form cycles; they are garbage now
                after.append((dict(tracker.bytes), tracker.storages))
        assert all(a == after[0] for a in after), (policy, after)
        clean_state()
