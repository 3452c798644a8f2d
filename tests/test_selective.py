"""Selective checkpointing (Decision.SELECTIVE, policy "selective"): exact gradients and costs.

Checks: gradients bit-identical to no checkpointing (fp32, dropout on) on HF Llama, GPT-2, BERT
and a Mixtral-style MoE for the default save set, a user save set and the megatron preset;
exact kept bytes, recomputed FLOPs and recomputed bytes on small models; random ops replayed
from their own generator state; data-dependent ops not re-run; in-place changes to kept
tensors reported naming the block; options validated and carried by the plan.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_selective.py -q
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradckpt
from conftest import run_step
from gradckpt.bench.models import build_bench_model, make_batch
from gradckpt.errors import CheckpointMismatchError, PolicyError
from gradckpt.plans import Decision, Plan
from gradckpt.runtime.selective import normalize_save_ops, resolve_save_ops

aten = torch.ops.aten

HF_MODELS = ("llama", "gpt2", "bert", "mixtral")


@pytest.fixture(scope="module")
def hf_models():
    built = {}

    def get(name):
        if name not in built:
            bm = build_bench_model(name, layers=2, dropout=0.1)
            bm.model.train()
            built[name] = (bm, make_batch(bm, 2, 16))
        return built[name]

    return get


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert (ga[k] is None) == (gb[k] is None), k
        if ga[k] is not None:
            assert torch.equal(ga[k], gb[k]), k


@pytest.mark.parametrize("name", HF_MODELS)
@pytest.mark.parametrize(
    "options",
    [{}, {"save_ops": ["mm"]}, {"preset": "megatron"}],
    ids=["default", "mm-only", "megatron"],
)
def test_gradients_identical_to_no_checkpointing(hf_models, name, options):
    bm, batch = hf_models(name)
    model = bm.model
    ref = run_step(model, batch)
    plan = gradckpt.enable(model, "selective", **options)
    try:
        assert set(plan.decisions) == {Decision.SELECTIVE}
        assert_same(run_step(model, batch), ref)
    finally:
        gradckpt.disable(model)


# -- exact costs on a plain PyTorch model ---------------------------------------------------


def mlp_stats(policy, layers=3, batch=2, seq=8, steps=2, **options):
    """MemoryStats of ``steps`` consecutive training steps of the plain-PyTorch MLP stack."""
    bm = build_bench_model("mlp", layers=layers, dropout=0.0)
    model, data = bm.model.train(), make_batch(bm, batch, seq)

    def step():
        model(**data).loss.backward()

    gradckpt.enable(model, policy, **options)
    out = []
    for _ in range(steps):
        out.append(gradckpt.measure(step, model=model))
        model.zero_grad(set_to_none=True)
    gradckpt.disable(model)
    return out


def test_exact_kept_bytes_flops_and_recompute_bytes():
    layers, n, d = 3, 2 * 8, 512
    full = mlp_stats("full", layers)[-1]
    first, sel = mlp_stats("selective", layers)
    # First step: kept beyond full's block input are both Linear outputs (n x 4d, n x d; fp32).
    assert first.activation_bytes - full.activation_bytes == layers * n * (4 * d + d) * 4
    # The recompute stops once the down projection's input exists again (its output is not
    # needed by backward), so from the second step on that output is not kept either.
    assert sel.activation_bytes - full.activation_bytes == layers * n * 4 * d * 4
    assert all(b == n * 4 * d * 4 + n * d * 4 for b in sel.block_bytes.values())
    # Full re-runs the up projection (not the down one, for the same reason); selective no
    # matmul in either step.
    assert full.recompute_flops == layers * 2 * n * d * 4 * d
    assert first.recompute_flops == sel.recompute_flops == 0
    assert sel.forward_flops == full.forward_flops
    # Selective re-runs LayerNorm (reads x, weight, bias; writes out, mean, rstd) and GELU.
    ln = n * d * 4 + 2 * d * 4 + n * d * 4 + 2 * n * 4
    gelu = 2 * n * 4 * d * 4
    assert first.recompute_bytes == sel.recompute_bytes == layers * (ln + gelu)
    assert full.recompute_bytes > sel.recompute_bytes


class TwoMatmuls(nn.Module):
    def __init__(self, d=8, h=16):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d, h))
        self.w2 = nn.Parameter(torch.randn(h, d))

    def forward(self, x):
        return F.gelu(x @ self.w1) @ self.w2


def test_recompute_bytes_count_only_ops_re_run():
    n, d, h = 4, 8, 16
    model = nn.Sequential(TwoMatmuls(d, h), TwoMatmuls(d, h))
    x = torch.randn(n, d, requires_grad=True)

    def step():
        model(x).sum().backward()

    out = {}
    for policy in ("full", "selective"):
        gradckpt.enable(model, policy)
        out[policy] = gradckpt.measure(step, model=model)
        gradckpt.disable(model)
    # selective: the first matmul comes from the cache; gelu reads and writes n x h floats.
    assert out["selective"].recompute_bytes == 2 * (2 * n * h * 4)
    # full: the first matmul too (reads x and w1, writes n x h).
    assert out["full"].recompute_bytes == 2 * ((n * d + d * h + n * h) * 4 + 2 * n * h * 4)


class MaybeTanh(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d, d))
        self.w2 = nn.Parameter(torch.randn(d, d))
        self.tanh = False

    def forward(self, x):
        z = (x @ self.w1).sin() @ self.w2
        return z.tanh() if self.tanh else z


def test_unreached_outputs_are_dropped_then_kept_again_when_reached():
    torch.manual_seed(0)
    model = nn.Sequential(MaybeTanh(), MaybeTanh())
    x = torch.randn(4, 8, requires_grad=True)

    def grads(tanh):
        for blk in model:
            blk.tanh = tanh
        model.zero_grad(set_to_none=True)
        stats = gradckpt.measure(lambda: model(x).sum().backward())
        return stats.recompute_flops, [p.grad.clone() for p in model.parameters()]

    ref = {t: grads(t)[1] for t in (False, True)}
    gradckpt.enable(model, "selective")
    try:
        runs = []
        for tanh in (False, True, True):
            flops, got = grads(tanh)
            assert all(torch.equal(g, r) for g, r in zip(got, ref[tanh]))
            runs.append(flops)
    finally:
        gradckpt.disable(model)
    # Without tanh the recompute stops before the second matmul, so step 2 does not keep it;
    # with tanh (which keeps its output) the recompute needs it: step 2 re-runs it, 2 blocks x
    # 2*4*8*8 FLOPs, and step 3 keeps it again.
    assert runs == [0, 2 * 2 * 4 * 8 * 8, 0]


# -- random and data-dependent ops ------------------------------------------------------------


class NoisyBlock(nn.Module):
    """A kept random op (rand_like) before a dropout (an in-place bernoulli_ on CPU), recomputed."""

    def __init__(self, d=16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        noise = torch.rand_like(x)
        return F.dropout(self.lin(x * noise), 0.5, training=True).tanh()


def test_random_ops_replay_their_own_generator_state():
    torch.manual_seed(0)
    model = nn.Sequential(NoisyBlock(), NoisyBlock())
    x = torch.randn(8, 16, requires_grad=True)

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        model(x).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = step()
    # rand_like is kept, so the recompute skips its draw: replaying only the block's starting
    # RNG state (all torch does) would give the dropout another mask.
    gradckpt.enable(model, "selective", save_ops=["mm", "aten.rand_like"])
    try:
        got = step()
    finally:
        gradckpt.disable(model)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


class Counter(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.ops:
            self.calls += 1
        return func(*args, **(kwargs or {}))


class Router(nn.Module):
    """Routes each row to one of 4 experts (argmax), and gathers rows by nonzero."""

    def __init__(self, d=8):
        super().__init__()
        self.gate = nn.Linear(d, 4)
        self.experts = nn.Parameter(torch.randn(4, d, d))

    def forward(self, x):
        probs = self.gate(x).softmax(-1)
        choice = probs.argmax(-1)
        rows = torch.nonzero(choice >= 0).squeeze(-1)
        y = torch.einsum("nd,nde->ne", x[rows], self.experts[choice[rows]]).sin()
        return y * probs.gather(-1, choice[:, None]) + x


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_data_dependent_decisions_are_kept_not_rerun(policy):
    torch.manual_seed(0)
    model = nn.Sequential(Router(), Router())
    x = torch.randn(6, 8, requires_grad=True)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    gradckpt.enable(model, policy)
    try:
        counter = Counter({aten.argmax, aten.nonzero})
        with counter:
            model(x).sum().backward()
    finally:
        gradckpt.disable(model)
    assert all(torch.equal(p.grad, r) for p, r in zip(model.parameters(), ref))
    # Two blocks, one argmax and one nonzero each: run in forward only, replayed in recompute
    # (under full too: gradckpt's plain recompute replays decisions, tests/test_replay.py).
    assert counter.calls == 4


def test_mixtral_routing_kept(hf_models):
    bm, batch = hf_models("mixtral")
    gradckpt.enable(bm.model, "selective")
    try:
        counter = Counter({aten.topk})
        with counter:
            run_step(bm.model, batch)
    finally:
        gradckpt.disable(bm.model)
    # topk runs in forward only: its indices and values are handed back to the recompute (a
    # fresh copy each time: Mixtral divides the values in place).
    assert counter.calls == 2


# -- in-place changes to kept tensors ---------------------------------------------------------


class InplaceRelu(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return torch.relu_(self.lin(x)) + x


def test_mutating_a_kept_tensor_in_the_block_fails_in_forward_naming_it():
    model = nn.Sequential(InplaceRelu(), InplaceRelu())
    gradckpt.enable(model, "selective")
    try:
        with pytest.raises(CheckpointMismatchError, match=r"block '0'.*aten\.addmm"):
            model(torch.randn(4, 8, requires_grad=True))
    finally:
        gradckpt.disable(model)
    # Without addmm in the save set the block is fine.
    gradckpt.enable(model, "selective", save_ops=["attention"])
    try:
        model(torch.randn(4, 8, requires_grad=True)).sum().backward()
    finally:
        gradckpt.disable(model)


class ReturnsPreactivation(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = self.lin(x)
        return torch.tanh(h), h


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ReturnsPreactivation(), ReturnsPreactivation()])

    def forward(self, x):
        for blk in self.blocks:
            x, h = blk(x)
            h.mul_(2)  # changes what tanh's backward needs; caught during backward
        return x


def test_mutating_a_kept_tensor_after_the_block_fails_in_backward_naming_it():
    model = Outer()
    gradckpt.enable(model, "selective")
    try:
        out = model(torch.randn(4, 8, requires_grad=True))
        with pytest.raises(CheckpointMismatchError, match=r"block 'blocks\.1'.*after the block"):
            out.sum().backward()
    finally:
        gradckpt.disable(model)


# -- megatron preset --------------------------------------------------------------------------


def test_megatron_recomputes_exactly_the_attention_core(hf_models):
    bm, batch = hf_models("gpt2")  # dropout on: CPU SDPA takes the math path, seq x seq scores
    model = bm.model

    def step():
        torch.manual_seed(0)
        model(**batch).loss.backward()

    stats = {}
    for options in ({"preset": "megatron"}, None):
        if options is None:
            gradckpt.enable(model, "none")
        else:
            gradckpt.enable(model, "selective", **options)
        stats["none" if options is None else "megatron"] = gradckpt.measure(step, model=model)
        model.zero_grad(set_to_none=True)
        gradckpt.disable(model)
    b, s = batch["input_ids"].shape
    heads, head_dim = model.config.n_head, model.config.n_embd // model.config.n_head
    # Only the scores QK^T are re-run (torch stops the recompute once PV's inputs, the dropped
    # out probabilities, exist again): 2 layers x 2*b*h*s*s*d.
    assert stats["megatron"].recompute_flops == 2 * 2 * b * heads * s * s * head_dim
    assert stats["megatron"].activation_bytes < stats["none"].activation_bytes


def test_megatron_warns_once_when_no_sdpa():
    bm = build_bench_model("bert", layers=2, dropout=0.1, attn="eager")
    model = bm.model.train()
    batch = make_batch(bm, 2, 8)
    gradckpt.enable(model, "selective", preset="megatron")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_step(model, batch)
            run_step(model, batch)
    finally:
        gradckpt.disable(model)
    msgs = [str(w.message) for w in caught if "megatron" in str(w.message)]
    assert len(msgs) == 2  # once per block, not once per call
    assert "bert.encoder.layer.0" in msgs[0]


# -- options and plans ------------------------------------------------------------------------


def test_save_ops_names_are_normalized_and_resolved():
    assert normalize_save_ops(None) == ["mm", "attention"]
    assert normalize_save_ops("matmul") == ["mm"]
    assert normalize_save_ops([aten.mm, aten.gelu.default, "aten::silu", "relu", "mm"]) == [
        "aten.mm",
        "aten.gelu.default",
        "aten.silu",
        "aten.relu",
        "mm",
    ]
    ops = resolve_save_ops(["mm", "attention", "aten.gelu.default"])
    assert aten.addmm in ops and aten.bmm in ops and aten._grouped_mm in ops
    assert aten._scaled_dot_product_flash_attention_for_cpu in ops
    assert aten._scaled_dot_product_efficient_attention in ops
    assert aten.gelu.default in ops and aten.gelu not in ops


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"save_ops": ["gelux"]}, "did you mean 'aten.gelu'"),
        ({"save_ops": ["aten.mm.nonsense"]}, "no overload 'nonsense'"),
        ({"save_ops": [3]}, "op names"),
        ({"save_ops": {"mm": 1}}, "list of op names"),
        ({"preset": "tiny"}, "unknown preset"),
        ({"preset": "megatron", "save_ops": ["mm"]}, "takes no save_ops"),
        ({"budgetx": 1}, "does not take option"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(options, match):
    with pytest.raises(PolicyError, match=match):
        gradckpt.make_plan("selective", ["a", "b"], **options)


def test_plan_carries_options_through_json():
    plan = gradckpt.make_plan("selective", ["a", "b"], save_ops=[aten.mm, "gelu"])
    assert plan.options == {"preset": "default", "save_ops": ["aten.mm", "aten.gelu"]}
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert "selective" in gradckpt.policy_names()
    assert gradckpt.make_plan("selective", ["a"], preset="megatron").options == {
        "preset": "megatron"
    }


def test_plan_from_json_applies_and_disable_restores():
    torch.manual_seed(0)
    model = nn.Sequential(TwoMatmuls(), TwoMatmuls())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = Plan(("0", "1"), (Decision.SELECTIVE, Decision.SAVE), options={"save_ops": ["mm"]})
    gradckpt.enable(model, plan=Plan.from_json(plan.to_json()))
    assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
    gradckpt.disable(model)
    assert "forward" not in model[0].__dict__
    assert model.state_dict().keys() == before.keys()
