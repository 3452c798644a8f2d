"""Selective checkpointing (Decision.SELECTIVE, policy "selective"): exact gradients and costs.

Checks: gradients bit-identical to no checkpointing (fp32, dropout on) on HF Llama, GPT-2, BERT
and a Mixtral-style MoE for the default save set, a user save set and the megatron preset;
exact kept bytes, recomputed FLOPs and recomputed bytes on small models; random ops replayed
from their own generator state; data-dependent ops not re-run; kept outputs modified in place
(through the tensor or an alias of its storage, in the block or after it) recomputed instead,
with exact gradients and exact re-run FLOPs, including tiny HF BigBird (block-sparse),
Nystromformer, LayoutLMv3, GPT-OSS, Llama 4 (text) and Funnel; options validated and carried
by the plan.

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
from gradckpt.errors import PolicyError
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


def test_one_dispatch_mode_per_block_and_the_stacked_fallback_is_exact(hf_models, monkeypatch):
    """gradckpt's forward and recompute work runs inside torch's own SAC modes: a block's ops
    see one Python dispatch mode, as under torch's SAC alone (each extra mode is a Python call
    per op). Where torch's private mode classes are not the expected ones, a mode stacked above
    them does the same work: gradients still bit-identical."""
    from gradckpt.runtime import selective

    bm, batch = hf_models("llama")
    model = bm.model
    ref = run_step(model, batch)
    depths = []
    attn = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
    hook = attn.register_forward_pre_hook(
        lambda *_: depths.append(torch._C._len_torch_dispatch_stack())
    )
    try:
        gradckpt.enable(model, "selective")
        assert_same(run_step(model, batch), ref)
        assert depths and set(depths) == {1}  # forward and recompute
        depths.clear()
        monkeypatch.setattr(selective, "_merged", lambda *a: None)
        gradckpt.enable(model, "selective")
        assert_same(run_step(model, batch), ref)
        assert set(depths) == {2}
    finally:
        hook.remove()
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


def grads_under(model, x, policy, steps=2, **options):
    """Gradients of ``steps`` steps under ``policy`` (``None``: no gradckpt), with the stats."""
    if policy is not None:
        gradckpt.enable(model, policy, **options)
    try:
        out = []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            stats = gradckpt.measure(lambda: model(x).pow(2).sum().backward(), model=model)
            grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
            out.append((grads, stats))
        return out
    finally:
        if policy is not None:
            gradckpt.disable(model)


def assert_grads_equal(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert (g is None) == (r is None)
        assert g is None or torch.equal(g, r), (g - r).abs().max().item()


class ScoresPlusBias(nn.Module):
    """Attention scores from a 4-D ``torch.matmul``, then a bias added in place (BigBird's
    ``first_product += ...``, Nystromformer's ``context_layer += self.conv(...)``).

    A 4-D matmul runs ``bmm`` on 3-D views and returns ``_unsafe_view(bmm_out)``: same storage
    as the kept ``bmm`` output, but its own version counter, so ``+=`` on it writes into the
    kept tensor without torch's version check noticing.
    """

    def __init__(self, d=8, heads=2, mutate=True):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.randn(4, 4))
        self.mutate = mutate

    def split(self, t):
        b, s, d = t.shape
        return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

    def scores(self, x):
        q, k = self.split(self.q(x)), self.split(self.k(x))
        return q @ k.transpose(-1, -2), q

    def forward(self, x):
        a, q = self.scores(x)
        if self.mutate:
            a += self.bias
        out = (a.softmax(-1) @ q).transpose(1, 2).reshape(x.shape)
        return x + out


def test_kept_matmul_modified_through_an_alias_in_the_block_gives_exact_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(ScoresPlusBias(), ScoresPlusBias())
    x = torch.randn(2, 4, 8)
    ref = grads_under(model, x, None, steps=1)[0][0]
    (first, _), (second, stats) = grads_under(model, x, "selective")
    assert_grads_equal(first, ref)
    assert_grads_equal(second, ref)
    # From the second step the scores' bmm is not kept (learned from the first): each of the
    # 2 blocks re-runs it, 2 * (b*h) * s * s * (d/h) FLOPs, and nothing else.
    assert stats.recompute_flops == 2 * (2 * 4 * 4 * 4 * 4)


class ReturnsScores(ScoresPlusBias):
    def forward(self, x):
        a, _ = self.scores(x)
        return a, a.softmax(-1)  # softmax is recomputed from the kept scores


class BiasOutside(nn.Module):
    """The 4-D matmul's result leaves the block, and is modified in place after it."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ReturnsScores(), ReturnsScores()])
        self.bias = nn.Parameter(torch.randn(4, 4))
        self.proj = nn.Linear(4, 8)

    def forward(self, x):
        for blk in self.blocks:
            a, p = blk(x)
            a += self.bias
            x = x + self.proj((a.softmax(-1) * p).sum(1))
        return x


def test_kept_matmul_modified_through_an_alias_after_the_block_gives_exact_gradients():
    torch.manual_seed(0)
    model = BiasOutside()
    x = torch.randn(2, 4, 8)
    ref = grads_under(model, x, None, steps=1)[0][0]
    (first, _), (second, stats) = grads_under(model, x, "selective")
    assert_grads_equal(first, ref)
    assert_grads_equal(second, ref)
    # Found in the first backward; from the second step it is not kept at all (one bmm per
    # block re-run in both steps).
    assert stats.recompute_flops == 2 * (2 * 4 * 4 * 4 * 4)


class InplaceRelu(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return torch.relu_(self.lin(x)) + x


def test_kept_tensor_modified_in_the_block_is_recomputed_instead():
    torch.manual_seed(0)
    model = nn.Sequential(InplaceRelu(), InplaceRelu())
    x = torch.randn(4, 8)
    ref = grads_under(model, x, None, steps=1)[0][0]
    runs = grads_under(model, x, "selective")
    for grads, stats in runs:
        assert_grads_equal(grads, ref)
        # The Linear's addmm (written by relu_) is re-run, as under full: 2 * n * d * d each.
        assert stats.recompute_flops == 2 * (2 * 4 * 8 * 8)
    full = grads_under(model, x, "full", steps=1)[0][1]
    assert runs[1][1].activation_bytes == full.activation_bytes


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
            h.mul_(2)  # the kept addmm output itself, after the block: seen in backward
            x = x + h
        return x


def test_kept_tensor_modified_after_the_block_is_recomputed_in_backward():
    torch.manual_seed(0)
    model = Outer()
    x = torch.randn(4, 8)
    ref = grads_under(model, x, None, steps=1)[0][0]
    (first, stats1), (second, stats2) = grads_under(model, x, "selective")
    assert_grads_equal(first, ref)
    assert_grads_equal(second, ref)
    assert stats1.recompute_flops == stats2.recompute_flops == 2 * (2 * 4 * 8 * 8)
    # The first step kept it until backward; the second does not keep it.
    assert stats2.activation_bytes == stats1.activation_bytes - 2 * 4 * 8 * 4


# -- Hugging Face models that modify kept outputs in place ------------------------------------


def _tiny_hf(name):
    """Tiny random-weight configs; dropout stays at each config's default (0.1 where it has one)."""
    t = pytest.importorskip("transformers")
    t.logging.set_verbosity_error()
    small = {"vocab_size": 99, "num_attention_heads": 4}
    enc = {**small, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 37}
    dec = {**enc, "num_key_value_heads": 2, "head_dim": 8, "use_cache": False}
    if name == "bigbird":  # block-sparse attention: `first_product += ...` on 4-D matmuls
        # block_sparse needs seq > (5 + 2 * num_random_blocks) * block_size, else it runs full.
        cfg = t.BigBirdConfig(**enc, max_position_embeddings=64, block_size=2, num_random_blocks=1)
        return t.BigBirdForMaskedLM(cfg), 16
    if name == "nystromformer":  # `context_layer += self.conv(value_layer)`
        cfg = t.NystromformerConfig(
            **enc, max_position_embeddings=64, num_landmarks=4, segment_means_seq_len=16
        )
        return t.NystromformerForMaskedLM(cfg), 16
    if name == "layoutlmv3":
        cfg = t.LayoutLMv3Config(
            **enc,
            max_position_embeddings=64,
            input_size=32,
            patch_size=8,
            coordinate_size=6,
            shape_size=4,
            max_2d_position_embeddings=64,
            rel_pos_bins=8,
            max_rel_pos=16,
            rel_2d_pos_bins=8,
            max_rel_2d_pos=32,
        )
        return t.LayoutLMv3ForTokenClassification(cfg), 16
    if name == "gpt_oss":  # grouped_mm experts, then `out.add_(bias)`
        cfg = t.GptOssConfig(
            **{**dec, "intermediate_size": 32},
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            max_position_embeddings=64,
            layer_types=["sliding_attention", "full_attention"],
        )
        return t.GptOssForCausalLM(cfg), 16
    if name == "llama4":  # `out = self.shared_expert(x); out.add_(routed)`
        cfg = t.Llama4TextConfig(
            **dec,
            intermediate_size_mlp=48,
            num_local_experts=4,
            num_experts_per_tok=1,
            max_position_embeddings=64,
            interleave_moe_layer_step=1,
            attention_chunk_size=8,
        )
        return t.Llama4ForCausalLM(cfg), 16
    if name == "funnel":  # relative attention adds into its bmm outputs in place
        cfg = t.FunnelConfig(
            vocab_size=99,
            d_model=32,
            n_head=4,
            d_head=8,
            d_inner=37,
            block_sizes=[1, 1, 1],
            num_decoder_layers=1,
        )
        return t.FunnelForMaskedLM(cfg), 16
    raise AssertionError(name)


def _hf_batch(model, seq):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 99, (2, seq), generator=g)
    if type(model).__name__.startswith("LayoutLMv3"):
        box = torch.randint(0, 30, (2, seq, 4), generator=g)
        box[..., 2:] += box[..., :2]  # x1 >= x0, y1 >= y0
        return {"input_ids": ids, "bbox": box, "labels": torch.randint(0, 2, (2, seq), generator=g)}
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize(
    "name", ["bigbird", "nystromformer", "layoutlmv3", "gpt_oss", "llama4", "funnel"]
)
def test_hf_models_that_modify_kept_outputs_get_exact_gradients(name):
    t = pytest.importorskip("transformers")
    cls = {"gpt_oss": "GptOssForCausalLM", "llama4": "Llama4ForCausalLM"}.get(name)
    if cls is not None and not hasattr(t, cls):  # transformers 4.46.2 predates both
        pytest.skip(f"transformers {t.__version__} has no {cls}")
    torch.manual_seed(0)
    model, seq = _tiny_hf(name)
    model.train()
    batch = _hf_batch(model, seq)
    ref = run_step(model, batch)
    gradckpt.enable(model, "selective")
    try:
        # The first step finds the modified outputs as it goes; the second has learned them.
        assert_same(run_step(model, batch), ref)
        assert_same(run_step(model, batch), ref)
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
