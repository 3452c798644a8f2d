"""Mismatch errors name the block (or segment) for every checkpointing decision; lazy forwards refused.

A recompute that saves tensors of another count, shape or dtype raises CheckpointMismatchError
naming the block; blocks with generator or async forwards are refused; a caller's context that
fails to enter leaves nothing pushed.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_errors.py -q
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import gradckpt
from gradckpt import CheckpointMismatchError, Decision, GradCkptError, Plan
from gradckpt.errors import BlockError
from guard_models import CHECKPOINTING, DIM, Boom, assert_pristine, clean_state, policies

# -- 1. mismatch errors name the block -----------------------------------------------------


class Nondeterministic(nn.Module):
    """A block whose second call differs from its first, as Python-side state makes it do."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.kind = kind
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        first = self.calls % 2 == 1  # forward is call 1, its recompute call 2
        h = self.lin(x)
        if self.kind == "count":  # one op (one saved tensor) fewer on the second call
            return h.sin().cos() if first else h.cos()
        if self.kind == "shape":  # a size taken from Python state
            return h[:, : DIM - (0 if first else 1)].cos().sum(-1, keepdim=True) + h
        if self.kind == "dtype":  # a precision switch kept in Python state
            return h.to(torch.float32 if first else torch.float64).cos().float()
        raise AssertionError(self.kind)


def mismatch_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, DIM), Nondeterministic(kind), nn.Linear(DIM, DIM))


@pytest.mark.parametrize("kind", ["count", "shape", "dtype"])
@pytest.mark.parametrize("decision", CHECKPOINTING, ids=lambda d: d.value)
def test_mismatch_raises_named_error(kind: str, decision: Decision) -> None:
    model = mismatch_model(kind)
    plan = Plan(("0", "1", "2"), (Decision.SAVE, decision, Decision.SAVE))
    gradckpt.enable(model, plan=plan)
    out = model(torch.randn(3, DIM)).sum()
    with pytest.raises(CheckpointMismatchError, match="block '1'") as info:
        out.backward()
    clean_state()
    if decision is Decision.RECOMPUTE:
        assert isinstance(info.value.__cause__, torch.utils.checkpoint.CheckpointError)
        assert "did not reproduce the forward pass" in str(info.value)
        assert {"count": "different number", "shape": "shape", "dtype": "dtype"}[kind] in str(
            info.value
        )


@pytest.mark.parametrize("kind", ["count", "shape", "dtype"])
def test_mismatch_in_segment_names_the_segment(kind: str) -> None:
    model = mismatch_model(kind)
    gradckpt.enable(model, "sqrt", blocks=["0", "1", "2"])  # 3 blocks: segment 0-1, then 2
    out = model(torch.randn(3, DIM)).sum()
    with pytest.raises(CheckpointMismatchError, match="segment of blocks '0' to '1'"):
        out.backward()
    clean_state()


def test_mismatch_in_plain_checkpoint_call_names_the_function() -> None:
    block = Nondeterministic("count")
    x = torch.randn(3, DIM, requires_grad=True)
    out = gradckpt.checkpoint(block, x).sum()
    with pytest.raises(CheckpointMismatchError, match="^Nondeterministic: the recompute"):
        out.backward()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return block(x)

    with pytest.raises(CheckpointMismatchError, match="fn: the recompute"):
        gradckpt.checkpoint(fn, x).sum().backward()
    clean_state()


def test_torch_debug_mode_works_through_gradckpt() -> None:
    x = torch.randn(4, requires_grad=True)
    gradckpt.checkpoint(torch.sin, x, debug=True).sum().backward()
    assert torch.equal(x.grad, torch.cos(x.detach()))
    with pytest.raises(GradCkptError, match="debug=True cannot be combined with context_fn"):
        gradckpt.checkpoint(
            torch.sin, x, debug=True, context_fn=lambda: (contextlib.nullcontext(),) * 2
        )


# -- refusals --------------------------------------------------------------------------------


class GenBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        yield self.lin(x)


class LazyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> Any:
        return (self.lin(x) * k for k in range(2))


class AsyncBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)

    async def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("cls", [GenBlock, AsyncBlock], ids=["generator", "async"])
@pytest.mark.parametrize("policy", ["full", "sqrt", "selective", "offload"])
def test_generator_and_async_forwards_refused_at_enable(cls: type[nn.Module], policy: str) -> None:
    if policy not in policies():
        pytest.skip(f"{policy} not registered")
    model = nn.ModuleList([cls(), cls(), cls()])
    reference = copy.deepcopy(model)
    with pytest.raises(BlockError, match="block '0' .* generator or async forward"):
        gradckpt.enable(model, policy)
    assert_pristine(model, reference)
    gradckpt.enable(model, "none")  # SAVE touches nothing: allowed


@pytest.mark.parametrize("decision", CHECKPOINTING, ids=lambda d: d.value)
def test_block_returning_a_generator_refused_at_first_forward(decision: Decision) -> None:
    model = nn.ModuleList([LazyBlock(), LazyBlock()])
    gradckpt.enable(model, plan=Plan(("0", "1"), (decision, Decision.SAVE)))
    with pytest.raises(BlockError, match="block '0' returned a generator"):
        model[0](torch.randn(2, DIM))
    clean_state()
    gradckpt.disable(model)
    assert len(list(model[0](torch.randn(2, DIM)))) == 2  # the model itself still works


def test_block_returning_a_generator_refused_in_segment() -> None:
    model = nn.Sequential(nn.Linear(DIM, DIM), LazyBlock())
    gradckpt.enable(model, "sqrt", blocks=["0", "1"])
    with pytest.raises(BlockError, match="block '1' returned a generator"):
        model(torch.randn(2, DIM))
    clean_state()


def test_failing_forward_context_leaves_no_hooks() -> None:
    """A caller's context_fn whose forward context fails to enter: nothing stays pushed."""

    class Broken(contextlib.AbstractContextManager[None]):
        def __enter__(self) -> None:
            raise Boom("context failed to enter")

        def __exit__(self, *exc: Any) -> None:
            return None

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(Boom):
        gradckpt.checkpoint(torch.sin, x, context_fn=lambda: (Broken(), contextlib.nullcontext()))
    clean_state()
    gradckpt.checkpoint(torch.sin, x).sum().backward()
    assert torch.equal(x.grad, torch.cos(x.detach()))
