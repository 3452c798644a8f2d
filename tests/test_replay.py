"""Recomputes route tokens exactly as the forward did (data-dependent decisions are replayed).

A mixture-of-experts block with fixed-capacity dispatch (shapes never depend on the routing, as
in GShard/Switch-style dispatch tensors) and a DeepSeek-V3-style selection bias: a buffer added to
the router scores for top-k selection only. When that bias changes between forward and backward,
a plain recompute (torch's checkpoint) picks other experts with the same shapes, passes torch's
shape check and gives silently wrong gradients; every gradckpt policy must give the gradients of
a run without checkpointing, and a recompute that makes other decisions must fail loudly. Also
checks the exact bytes kept for the replay (only the router's top-k output).

Run: PYTHONPATH=src .venv/bin/python -m pytest -q -p no:xdist tests/test_replay.py
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import pytest
import torch
import torch.utils.checkpoint as tuc
from torch import nn

import gradckpt
from gradckpt.runtime.offload import emulate_host_on_cpu
from gradckpt.state import is_recomputing

DIM, EXPERTS, TOP_K, TOKENS = 8, 4, 2, 12


class MoE(nn.Module):
    """Top-2 of 4 experts; every expert sees every token, gated by a dispatch mask."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(DIM, EXPERTS, bias=False)
        self.experts = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(EXPERTS))
        self.register_buffer("select_bias", torch.zeros(EXPERTS))
        self.extra_decision = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(self.router(x))  # (tokens, experts)
        if self.extra_decision and is_recomputing():
            torch.argmax(scores, dim=-1)  # a decision the forward did not make
        _, idx = torch.topk(scores + self.select_bias, TOP_K, dim=-1)  # selection only
        gates = torch.zeros_like(scores).scatter(-1, idx, scores.gather(-1, idx))
        outs = torch.stack([e(x) for e in self.experts], dim=-1)  # (tokens, dim, experts)
        return x + (outs * gates[:, None, :]).sum(-1)


class Net(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(MoE() for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _step(model: Net, x: torch.Tensor) -> list[torch.Tensor]:
    """Forward, then the bias moves (load balancing), then backward; returns the gradients."""
    for layer in model.layers:
        layer.select_bias.zero_()
    out = model(x)
    with torch.no_grad():
        for layer in model.layers:
            # a large shift: the recompute's top-2 differs from the forward's for most tokens
            layer.select_bias.copy_(torch.tensor([2.0, 2.0, -2.0, -2.0]))
    out.pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _x() -> torch.Tensor:
    return torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(1))


def _torch_full(model: Net) -> Callable[[], None]:
    """Each layer under torch's own non-reentrant checkpoint (what the fix is compared with)."""
    undo = []
    for layer in model.layers:
        layer.forward = functools.partial(  # type: ignore[method-assign]
            tuc.checkpoint, type(layer).forward.__get__(layer), use_reentrant=False
        )
        undo.append(layer)

    def restore() -> None:
        for layer in undo:
            del layer.forward

    return restore


def test_plain_torch_recompute_is_silently_wrong_here() -> None:
    # The scenario is real: torch's checkpoint gives other gradients, and raises nothing.
    model = Net()
    ref = _step(model, _x())
    restore = _torch_full(model)
    got = _step(model, _x())
    restore()
    assert any(not torch.equal(a, b) for a, b in zip(ref, got))


@pytest.mark.parametrize("policy", ["full", "every:2", "sqrt", "offload"])
def test_every_policy_replays_the_routing(policy: str) -> None:
    model = Net()
    ref = _step(model, _x())
    gradckpt.enable(model, policy=policy)
    with emulate_host_on_cpu() if policy == "offload" else contextlib.nullcontext():
        got = _step(model, _x())
    gradckpt.disable(model)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_checkpoint_function_replays_the_routing() -> None:
    layer = MoE()
    x = _x().requires_grad_()

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        layer.select_bias.zero_()
        out = fn(x)
        layer.select_bias.fill_(3.0)
        layer.select_bias[0] = -3.0  # expert 0 would never be picked in the recompute
        out.sum().backward()
        grads = [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
        layer.zero_grad(set_to_none=True)
        x.grad = None
        return grads

    ref = step(layer)
    got = step(lambda t: gradckpt.checkpoint(layer, t))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_a_recompute_making_other_decisions_fails_loudly() -> None:
    model = Net()
    model.layers[1].extra_decision = True
    gradckpt.enable(model, policy="full")
    out = model(_x())
    with pytest.raises(
        gradckpt.CheckpointMismatchError, match=r"block 'layers\.1'.*argmax.*forward ran aten\.topk"
    ):
        out.sum().backward()
    gradckpt.disable(model)


def test_kept_bytes_are_the_router_top_k_only() -> None:
    # Per block the checkpoint keeps its input (tokens x dim fp32) and, for the replay, topk's
    # values (fp32) and indices (int64): tokens x top_k x (4 + 8) bytes. Nothing else: the
    # router scores, the gates and the expert outputs are recomputed.
    model = Net()
    x = _x().requires_grad_()
    gradckpt.enable(model, policy="full")
    stats = gradckpt.measure(lambda: model(x).sum().backward(), model=model)
    gradckpt.disable(model)
    replay = TOKENS * TOP_K * (4 + 8)
    assert stats.block_bytes == {f"layers.{i}": TOKENS * DIM * 4 + replay for i in range(3)}, (
        stats.block_bytes
    )
