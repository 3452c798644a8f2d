"""enable/disable: exact gradients with every policy, BatchNorm stats once, model left unchanged.

Gradients and loss are compared with torch.equal (fp32, deterministic CPU kernels, dropout on):
checkpointing must not change a single bit. Run: .venv/bin/python -m pytest tests/test_apply.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradckpt
from conftest import run_step
from gradckpt.bench.models import build_bench_model, make_batch


def _policies() -> list[str]:
    return [p for p in gradckpt.policy_names(exact=True) if ":" not in p] + ["every:2", "every:3"]


def _assert_same(ref: tuple, got: tuple, where: str) -> None:
    loss0, g0 = ref
    loss1, g1 = got
    assert torch.equal(loss0, loss1), f"{where}: loss differs"
    for name in g0:
        a, b = g0[name], g1[name]
        assert (a is None) == (b is None), f"{where}: {name} grad presence differs"
        if a is not None:
            assert torch.equal(a, b), f"{where}: {name} grad differs by {(a - b).abs().max()}"


@pytest.mark.parametrize("preset", ["mlp", "llama", "gpt2", "minilm", "mixtral"])
def test_gradients_identical_with_every_policy(preset: str) -> None:
    bm = build_bench_model(preset, layers=None if preset == "minilm" else 4, dropout=0.1)
    model = bm.model.train()
    batch = make_batch(bm, 2, 32)
    ref = run_step(model, batch)
    assert any(g is not None and g.abs().sum() > 0 for g in ref[1].values())
    for policy in _policies():
        gradckpt.enable(model, policy=policy)
        _assert_same(ref, run_step(model, batch), f"{preset}/{policy}")
        gradckpt.disable(model)
    _assert_same(ref, run_step(model, batch), f"{preset}/after disable")


@pytest.mark.parametrize("policy", ["full", "sqrt", "every:2"])
def test_bf16_autocast_gradients_close(policy: str) -> None:
    bm = build_bench_model("llama", layers=4, dropout=0.0)
    model = bm.model.train()
    batch = make_batch(bm, 2, 32)

    def step() -> tuple:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run_step(model, batch)

    ref = step()
    gradckpt.enable(model, policy=policy)
    loss, grads = step()
    gradckpt.disable(model)
    assert torch.allclose(ref[0], loss, rtol=1e-2)
    for name, g in grads.items():
        assert g is not None and torch.allclose(ref[1][name], g, rtol=2e-2, atol=1e-3), name


class Adapter(nn.Module):
    """A frozen linear with a trainable low-rank adapter (LoRA-shaped)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.base = nn.Linear(dim, dim)
        self.a = nn.Linear(dim, 4, bias=False)
        self.b = nn.Linear(4, dim, bias=False)
        nn.init.normal_(self.b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.base(x) + self.b(self.a(x))


def test_frozen_base_adapters_get_gradients() -> None:
    torch.manual_seed(0)
    embed = nn.Embedding(50, 16)
    blocks = nn.ModuleList([Adapter(16) for _ in range(4)])
    model = nn.ModuleDict({"embed": embed, "blocks": blocks})
    for n, p in model.named_parameters():
        p.requires_grad_(".a." in n or ".b." in n)
    ids = torch.randint(0, 50, (3, 7))

    def step() -> dict:
        model.zero_grad(set_to_none=True)
        x = model["embed"](ids)
        assert not x.requires_grad  # the first block's input does not require grad
        for blk in model["blocks"]:
            x = blk(x)
        x.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = step()
    assert len(ref) == 8
    for policy in ["full", "sqrt", "every:2"]:
        gradckpt.enable(model, policy=policy, blocks=[f"blocks.{i}" for i in range(4)])
        got = step()
        gradckpt.disable(model)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), policy


class BNBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.relu(self.bn(self.conv(x))))


@pytest.mark.parametrize("policy", ["full", "sqrt", "every:2"])
def test_batchnorm_running_stats_updated_once(policy: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[BNBlock(4) for _ in range(4)])
    x = torch.randn(2, 4, 8, 8)
    ref = copy.deepcopy(net)
    for m in (ref, net):
        torch.manual_seed(1)
        if m is net:
            gradckpt.enable(net, policy=policy)
        for _ in range(2):
            m(x).sum().backward()
    gradckpt.disable(net)
    assert int(net[0].bn.num_batches_tracked) == 2
    for (name, a), b in zip(ref.named_buffers(), net.buffers()):
        assert torch.equal(a, b), name
    for a, b in zip(ref.parameters(), net.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_plain_torch_checkpoint_does_update_batchnorm_twice() -> None:
    """The pitfall gradckpt fixes (DESIGN.md: verified on torch 2.13)."""
    block = BNBlock(4)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum().backward()
    assert int(block.bn.num_batches_tracked) == 2


def test_state_dict_and_parameters_unchanged() -> None:
    model = build_bench_model("llama", layers=2).model
    keys = list(model.state_dict())
    params = [n for n, _ in model.named_parameters()]
    mods = [n for n, _ in model.named_modules()]
    for policy in ["full", "sqrt"]:
        gradckpt.enable(model, policy=policy)
        assert list(model.state_dict()) == keys
        assert [n for n, _ in model.named_parameters()] == params
        assert [n for n, _ in model.named_modules()] == mods


def test_enable_disable_enable_again_and_replace() -> None:
    bm = build_bench_model("gpt2", layers=4)
    model = bm.model.train()
    batch = make_batch(bm, 1, 16)
    ref = run_step(model, batch)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    p1 = gradckpt.enable(model, policy="full")
    p2 = gradckpt.enable(model, policy="every:2")  # replaces, does not stack
    assert gradckpt.applied_plan(model) == p2 != p1
    n_overridden = sum("forward" in m.__dict__ for m in model.modules())
    assert n_overridden == 2
    _assert_same(ref, run_step(model, batch), "every:2 after full")
    gradckpt.disable(model)
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    gradckpt.disable(model)  # twice is harmless
    gradckpt.enable(model, policy="sqrt")
    _assert_same(ref, run_step(model, batch), "sqrt after disable")
    gradckpt.disable(model)


def test_saved_plan_applies_and_mismatched_plan_is_refused() -> None:
    model = build_bench_model("mlp", layers=4).model
    plan = gradckpt.Plan.from_json(gradckpt.enable(model, policy="every:2").to_json())
    gradckpt.disable(model)
    assert gradckpt.enable(model, plan=plan) == plan
    other = build_bench_model("mlp", layers=3).model
    with pytest.raises(gradckpt.PlanError, match="no block named 'blocks.3'"):
        gradckpt.enable(other, plan=plan)
    with pytest.raises(gradckpt.PolicyError, match="not policy and plan"):
        gradckpt.enable(model, policy="full", plan=plan)
    with pytest.raises(gradckpt.PlanError, match="gradckpt.Plan"):
        gradckpt.enable(model, plan={"blocks": []})  # type: ignore[arg-type]


def test_bad_policy_leaves_model_untouched() -> None:
    model = build_bench_model("mlp", layers=2).model
    gradckpt.enable(model, policy="full")
    with pytest.raises(gradckpt.PolicyError, match="valid policies"):
        gradckpt.enable(model, policy="fastest")
    # the old plan is still in place: a refused enable changes nothing
    assert gradckpt.applied_plan(model).policy == "full"  # type: ignore[union-attr]
    with pytest.raises(gradckpt.PolicyError, match=">= 1"):
        gradckpt.enable(model, policy="every:0")
    with pytest.raises(gradckpt.GradCkptError, match="nn.Module"):
        gradckpt.enable("model")  # type: ignore[arg-type]
    gradckpt.disable(model)


def test_hf_own_checkpointing_is_switched_off_and_restored() -> None:
    bm = build_bench_model("llama", layers=2)
    model = bm.model.train()
    model.config.use_cache = True
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gradckpt.enable(model, policy="full")
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    # the config is left alone (save_pretrained writes the same config.json); the cache is only
    # off in forwards that record gradients (tests/test_hf_integration.py)
    assert model.config.use_cache is True
    gradckpt.disable(model)
    assert model.config.use_cache is True
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_eval_no_grad_forward_runs_plain() -> None:
    bm = build_bench_model("llama", layers=2)
    model = bm.model.eval()
    batch = make_batch(bm, 1, 8)
    with torch.no_grad():
        ref = model(**batch).logits
        gradckpt.enable(model, policy="sqrt")
        got = model(**batch).logits
    gradckpt.disable(model)
    assert torch.equal(ref, got)
