"""A region recomputed more than once, under every policy, and the ``early_stop`` plan option.

torch re-enters a checkpoint's recompute context for every recompute: a second
``backward(retain_graph=True)``, each ``autograd.grad`` call on one graph, a double backward
(gradient penalty, ``create_graph=True``) and nested checkpoints. Each case here runs under every
policy (and ``offload`` with host memory emulated on CPU) and must give bit-identical gradients
to the same steps without checkpointing. The ``early_stop=False`` option must let module hooks
inside a block run during the recompute.

Run: PYTHONPATH=src .venv/bin/python -m pytest -q -p no:xdist tests/test_recompute_again.py
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradckpt
from gradckpt.runtime.offload import emulate_host_on_cpu

POLICIES = ["full", "every:2", "sqrt", "selective", "offload", "selective-megatron"]


class Block(nn.Module):
    def __init__(self, dim: int, nested: bool = False) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.nested = nested

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # SDPA (what the megatron preset recomputes) and dropout (masks must be replayed)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + F.dropout(att, 0.2, self.training)
        # a checkpoint inside the block: nested in the block's own checkpoint
        h = gradckpt.checkpoint(self.mlp, x) if self.nested else self.mlp(x)
        return x + h


class Net(nn.Module):
    def __init__(self, n: int = 3, dim: int = 8, nested: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(dim, nested) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@contextlib.contextmanager
def _policy(model: nn.Module, policy: str) -> Iterator[None]:
    kw = {"preset": "megatron"} if policy == "selective-megatron" else {}
    gradckpt.enable(model, policy=policy.split("-")[0], **kw)
    try:
        with emulate_host_on_cpu() if policy == "offload" else contextlib.nullcontext():
            yield
    finally:
        gradckpt.disable(model)


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    if x.grad is not None:
        out.append(x.grad.clone())
    model.zero_grad(set_to_none=True)
    x.grad = None
    return out


def _retain_graph_twice(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    loss = model(x).pow(2).mean()
    loss.backward(retain_graph=True)
    first = _grads(model, x)
    loss.backward()
    return first + _grads(model, x)


def _autograd_grad_thrice(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = model(x)
    params = list(model.parameters())
    a = torch.autograd.grad(out.sum(), params[:2], retain_graph=True)
    b = torch.autograd.grad(out.pow(2).sum(), [x], retain_graph=True)
    c = torch.autograd.grad(out.mean(), params[-2:])
    return [*a, *b, *c]


def _gradient_penalty(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = model(x)
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (out.pow(2).mean() + gx.pow(2).sum()).backward()
    return _grads(model, x)


CASES: dict[str, Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]] = {
    "retain_graph": _retain_graph_twice,
    "autograd.grad": _autograd_grad_thrice,
    "double_backward": _gradient_penalty,
}


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("policy", POLICIES)
def test_second_recompute_gives_exact_gradients(policy: str, nested: bool) -> None:
    torch.manual_seed(0)
    model = Net(nested=nested).train()
    x = torch.randn(2, 4, 8, requires_grad=True)
    for case, run in CASES.items():
        torch.manual_seed(1)
        ref = run(model, x)
        with _policy(model, policy):
            torch.manual_seed(1)
            got = run(model, x)
        assert len(ref) == len(got) > 0
        for i, (a, b) in enumerate(zip(ref, got)):
            assert torch.equal(a, b), (
                f"{policy}/{case}: gradient {i} differs by {(a - b).abs().max()}"
            )


# -- early_stop ----------------------------------------------------------------------------


class Hooked(nn.Module):
    """A block whose last sub-module has a forward hook (where other libraries clean up)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.tail = nn.Identity()  # runs after the last op that saves a tensor for backward
        self.calls = 0
        self.tail.register_forward_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.b(torch.tanh(self.a(x))))


class HookedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Hooked() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("policy", ["full", "sqrt", "selective", "offload"])
@pytest.mark.parametrize("early_stop", [True, False])
def test_early_stop_option_controls_hooks_in_recompute(policy: str, early_stop: bool) -> None:
    model = HookedNet()
    x = torch.randn(3, 8, requires_grad=True)
    model(x).sum().backward()
    ref = _grads(model, x)
    plan = gradckpt.enable(model, policy=policy, early_stop=early_stop)
    assert plan.options["early_stop"] is early_stop
    calls0 = [blk.calls for blk in model.layers]
    model(x).sum().backward()
    got = _grads(model, x)
    gradckpt.disable(model)
    per_block = [blk.calls - c for blk, c in zip(model.layers, calls0)]
    # forward once, plus once in the recompute unless torch stopped it before the tail (in a
    # sqrt segment only the segment's last block ends early: the first one's tail comes before
    # the second block's saved tensors)
    if early_stop:
        assert per_block == ([2, 1] if policy == "sqrt" else [1, 1])
    else:
        assert per_block == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_early_stop_option_is_validated_and_survives_json() -> None:
    with pytest.raises(gradckpt.PolicyError, match="early_stop must be True or False"):
        gradckpt.make_plan("full", ["a"], early_stop="no")
    plan = gradckpt.make_plan("every:2", ["a", "b"], early_stop=False)
    again = gradckpt.Plan.from_json(plan.to_json())
    assert again.options == {"early_stop": False}
    with pytest.raises(gradckpt.PolicyError, match="takes: save_ops, preset, early_stop"):
        gradckpt.make_plan("selective", ["a"], bogus=1)
