"""Property tests: random small models x random plans give bit-identical results to no checkpointing.

Models are drawn from linear, conv, LayerNorm, RMSNorm, BatchNorm, dropout (module and
functional), attention (SDPA with dropout and masks, nn.MultiheadAttention), residuals, in-place
ops (on whole tensors and on slices), tied weights (inside a block, across blocks, head and
embedding), multiple outputs, keyword tensor and non-tensor arguments, frozen sub-modules and
inputs with or without grad. Plans mix every decision registered at test time (SAVE, RECOMPUTE,
and whatever else ``runtime.decisions.WRAPPERS`` holds) with random multi-block segments.

Checked with ``torch.equal`` in fp32: loss, outputs, every parameter gradient, input gradients,
every buffer; then ``disable`` and the model again gives the reference results.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_fuzz.py -q --hypothesis-show-statistics
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradckpt
from gradckpt import CheckpointMismatchError, Decision, Plan
from gradckpt.runtime.decisions import WRAPPERS

DIM = 8
HEADS = 2
VOCAB = 16

OPS = (
    "linear",
    "linear_relu_",
    "conv",
    "layernorm",
    "rmsnorm",
    "batchnorm",
    "dropout",
    "fdropout",
    "sdpa",
    "mha",
    "tied",
    "shared",
    "slice_inplace",
    "gelu_mlp",
)


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@dataclass
class OpSpec:
    kind: str
    residual: bool
    frozen: bool
    p: float = 0.0


@dataclass
class ModelSpec:
    blocks: list[list[OpSpec]]
    ids_input: bool  # token ids through an embedding, else a float tensor
    input_grad: bool  # the float input requires grad
    freeze_embed: bool
    tie_head: bool
    aux_out: bool  # blocks return (h, aux): multiple outputs
    mask: str  # "none", "bool", "float": a keyword tensor argument
    scale: float  # a non-tensor keyword argument
    mode: str  # a string keyword argument
    train: bool
    batch: int
    seq: int
    seed: int
    counts: dict[str, int] = field(default_factory=dict)


class Op(nn.Module):
    """One randomly chosen layer; ``shared`` is a Linear owned by the model and used by many blocks."""

    def __init__(self, spec: OpSpec, shared: nn.Linear) -> None:
        super().__init__()
        self.kind, self.residual, self.p = spec.kind, spec.residual, spec.p
        k = spec.kind
        if k in ("linear", "linear_relu_", "slice_inplace"):
            self.lin = nn.Linear(DIM, DIM)
        elif k == "conv":
            self.conv = nn.Conv1d(DIM, DIM, kernel_size=3, padding=1)
        elif k == "layernorm":
            self.norm = nn.LayerNorm(DIM)
        elif k == "rmsnorm":
            self.norm = nn.RMSNorm(DIM)
        elif k == "batchnorm":
            self.bn = nn.BatchNorm1d(DIM)
        elif k == "dropout":
            self.drop = nn.Dropout(spec.p)
        elif k == "sdpa":
            self.qkv = nn.Linear(DIM, 3 * DIM)
            self.out = nn.Linear(DIM, DIM)
        elif k == "mha":
            self.mha = nn.MultiheadAttention(DIM, HEADS, dropout=spec.p, batch_first=True)
        elif k == "tied":
            self.a = nn.Linear(DIM, DIM, bias=False)
            self.b = nn.Linear(DIM, DIM, bias=False)
            self.b.weight = self.a.weight
        elif k == "shared":
            self.shared = shared
        elif k == "gelu_mlp":
            self.up = nn.Linear(DIM, 2 * DIM)
            self.down = nn.Linear(2 * DIM, DIM)
        if spec.frozen:
            for p in self.parameters():
                if p is not getattr(shared, "weight", None) and p is not getattr(
                    shared, "bias", None
                ):
                    p.requires_grad_(False)

    def body(self, x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        k = self.kind
        if k == "linear":
            return self.lin(x)
        if k == "linear_relu_":
            return self.lin(x).relu_()  # in-place on a fresh intermediate
        if k == "slice_inplace":
            h = self.lin(x)
            h[..., : DIM // 2].mul_(scale)  # in-place on a view (CopySlices in autograd)
            return h.add_(0.5)
        if k == "conv":
            return self.conv(x.transpose(1, 2)).transpose(1, 2)
        if k in ("layernorm", "rmsnorm"):
            return self.norm(x)
        if k == "batchnorm":
            return self.bn(x.reshape(-1, DIM)).reshape(x.shape)
        if k == "dropout":
            return self.drop(x)
        if k == "fdropout":
            return F.dropout(x, self.p, training=self.training)
        if k == "sdpa":
            b, s, _ = x.shape
            q, kk, v = (
                t.view(b, s, HEADS, DIM // HEADS).transpose(1, 2) for t in self.qkv(x).chunk(3, -1)
            )
            y = F.scaled_dot_product_attention(
                q, kk, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0
            )
            return self.out(y.transpose(1, 2).reshape(b, s, DIM))
        if k == "mha":
            am = None if mask is None else (~mask if mask.dtype == torch.bool else -mask)
            return self.mha(x, x, x, attn_mask=am, need_weights=False)[0]
        if k == "tied":
            return self.b(torch.tanh(self.a(x)))
        if k == "shared":
            return self.shared(x) * scale
        if k == "gelu_mlp":
            return self.down(F.gelu(self.up(x)))
        raise AssertionError(k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        y = self.body(x, mask, scale)
        return x + y if self.residual else y


class FuzzBlock(nn.Module):
    def __init__(self, ops: list[OpSpec], shared: nn.Linear, aux_out: bool) -> None:
        super().__init__()
        self.ops = nn.ModuleList([Op(o, shared) for o in ops])
        self.aux_out = aux_out

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        scale: float = 1.0,
        mode: str = "sum",
    ) -> Any:
        h = x
        for op in self.ops:
            h = op(h, mask, scale)
        if not self.aux_out:
            return h
        aux = h.sum(-1) if mode == "sum" else h.mean(-1)
        return h, aux


class FuzzModel(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(VOCAB, DIM)
        self.shared = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(
            [FuzzBlock(ops, self.shared, spec.aux_out) for ops in spec.blocks]
        )
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if spec.tie_head:
            self.head.weight = self.embed.weight
        if spec.freeze_embed:
            self.embed.weight.requires_grad_(False)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        scale: float = 1.0,
        mode: str = "sum",
    ) -> Any:
        h = self.embed(x) if x.dtype == torch.long else x
        extras = []
        for blk in self.blocks:
            out = blk(h, mask=mask, scale=scale, mode=mode)
            if isinstance(out, tuple):
                h, aux = out
                extras.append(aux)
            else:
                h = out
        return self.head(h), extras


# -- strategies ------------------------------------------------------------------------------


@st.composite
def op_specs(draw: Any) -> OpSpec:
    kind = draw(st.sampled_from(OPS))
    p = (
        draw(st.sampled_from([0.0, 0.2, 0.5]))
        if kind in ("dropout", "fdropout", "sdpa", "mha")
        else 0.0
    )
    return OpSpec(kind=kind, residual=draw(st.booleans()), frozen=draw(st.integers(0, 4)) == 0, p=p)


@st.composite
def model_specs(draw: Any) -> ModelSpec:
    n = draw(st.integers(2, 5))
    blocks = [draw(st.lists(op_specs(), min_size=1, max_size=3)) for _ in range(n)]
    ids_input = draw(st.booleans())
    return ModelSpec(
        blocks=blocks,
        ids_input=ids_input,
        input_grad=not ids_input and draw(st.booleans()),
        freeze_embed=ids_input and draw(st.booleans()),
        tie_head=ids_input and draw(st.booleans()),
        aux_out=draw(st.booleans()),
        mask=draw(st.sampled_from(["none", "bool", "float"])),
        scale=draw(st.sampled_from([1.0, 0.5, -2.0])),
        mode=draw(st.sampled_from(["sum", "mean"])),
        train=draw(st.integers(0, 4)) > 0,
        batch=draw(st.integers(2, 3)),  # BatchNorm in train mode needs > 1 value per channel
        seq=draw(st.integers(1, 5)),
        seed=draw(st.integers(0, 2**16)),
    )


def draw_plan(data: Any, names: list[str]) -> Plan:
    """Random decisions from every registered decision, then random segments of RECOMPUTE runs."""
    choices = sorted({Decision.SAVE, *WRAPPERS}, key=lambda d: d.value)
    decisions = [data.draw(st.sampled_from(choices)) for _ in names]
    if data.draw(st.booleans()):  # a run of RECOMPUTE blocks, so that segments are common
        a = data.draw(st.integers(0, len(names) - 2))
        b = data.draw(st.integers(a + 2, len(names)))
        decisions[a:b] = [Decision.RECOMPUTE] * (b - a)
    segments = []
    i = 0
    while i < len(names) - 1:
        run = 0
        while i + run < len(names) and decisions[i + run] is Decision.RECOMPUTE:
            run += 1
        if run >= 2 and data.draw(st.booleans()):
            size = data.draw(st.integers(2, run))
            segments.append((i, i + size))
            i += size
        else:
            i += max(run, 1)
    return Plan(tuple(names), tuple(decisions), segments=tuple(segments), policy="fuzz")


# -- running ----------------------------------------------------------------------------------


def make_inputs(spec: ModelSpec) -> dict[str, Any]:
    g = torch.Generator().manual_seed(spec.seed)
    b, s = spec.batch, spec.seq
    if spec.ids_input:
        x = torch.randint(0, VOCAB, (b, s), generator=g)
    else:
        x = torch.randn(b, s, DIM, generator=g).requires_grad_(spec.input_grad)
    mask = None
    if spec.mask == "bool":
        mask = torch.ones(s, s, dtype=torch.bool).tril()  # causal: every row keeps one key
    elif spec.mask == "float":
        mask = torch.randn(s, s, generator=g)
    return {"x": x, "mask": mask, "scale": spec.scale, "mode": spec.mode}


def loss_of(out: Any) -> torch.Tensor:
    logits, extras = out
    loss = logits.float().pow(2).mean()
    for aux in extras:
        loss = loss + aux.float().sin().sum()
    return loss


@dataclass
class Result:
    loss: torch.Tensor
    outputs: list[torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    input_grad: torch.Tensor | None
    buffers: dict[str, torch.Tensor]


def step(model: nn.Module, inputs: dict[str, Any], seed: int) -> Result:
    model.zero_grad(set_to_none=True)
    x = inputs["x"]
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    out = model(x, inputs["mask"], scale=inputs["scale"], mode=inputs["mode"])
    loss = loss_of(out)
    loss.backward()
    logits, extras = out
    return Result(
        loss=loss.detach(),
        outputs=[t.detach() for t in (logits, *extras)],
        grads={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        input_grad=None if x.grad is None else x.grad.clone(),
        buffers={n: b.clone() for n, b in model.named_buffers()},
    )


def assert_same(ref: Result, got: Result, what: str) -> None:
    assert torch.equal(ref.loss, got.loss), f"{what}: loss {ref.loss} != {got.loss}"
    assert len(ref.outputs) == len(got.outputs)
    for i, (a, b) in enumerate(zip(ref.outputs, got.outputs)):
        assert torch.equal(a, b), f"{what}: output {i} differs"
    assert ref.grads.keys() == got.grads.keys()
    for n, a in ref.grads.items():
        b = got.grads[n]
        assert (a is None) == (b is None), f"{what}: {n}.grad is {a is None} vs {b is None} None"
        assert a is None or torch.equal(a, b), f"{what}: {n}.grad differs by {(a - b).abs().max()}"
    assert (ref.input_grad is None) == (got.input_grad is None)
    assert ref.input_grad is None or torch.equal(ref.input_grad, got.input_grad)
    for n, a in ref.buffers.items():
        assert torch.equal(a, got.buffers[n]), f"{what}: buffer {n} differs"


def build(spec: ModelSpec) -> FuzzModel:
    torch.manual_seed(spec.seed)
    model = FuzzModel(spec)
    return model.train(spec.train)


def no_hooks_left() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


# -- the properties ----------------------------------------------------------------------------

CASES: dict[str, int] = {"exact": 0, "verify": 0, "segments": 0, "refused": 0}
INPLACE_AFTER_MATMUL = ("linear_relu_", "slice_inplace")


@_settings(250)
@given(spec=model_specs(), data=st.data())
def _exact_gradients(spec: ModelSpec, data: Any) -> None:
    model = build(spec)
    reference = copy.deepcopy(model)
    pristine = copy.deepcopy(model)
    # Named explicitly: find_blocks skips parameter-free lists (all-dropout blocks).
    names = [f"blocks.{i}" for i in range(len(spec.blocks))]
    plan = draw_plan(data, names)
    inputs = make_inputs(spec)
    state_keys = list(model.state_dict())
    param_names = [n for n, _ in model.named_parameters()]

    ref = step(reference, inputs, spec.seed)
    gradckpt.enable(model, plan=plan)
    assert list(model.state_dict()) == state_keys
    assert [n for n, _ in model.named_parameters()] == param_names
    try:
        got = step(model, inputs, spec.seed)
    except CheckpointMismatchError as e:
        # SELECTIVE keeps matmul outputs; a block that then modifies one in place
        # (`linear(x).relu_()`) is refused with this error rather than given wrong gradients.
        refusable = [
            f"'blocks.{i}'"
            for i, d in enumerate(plan.decisions)
            if d is Decision.SELECTIVE
            and any(o.kind in INPLACE_AFTER_MATMUL for o in spec.blocks[i])
        ]
        assert "modified in place" in str(e) and any(b in str(e) for b in refusable), str(e)
        assert no_hooks_left()
        gradckpt.disable(model)
        assert all("forward" not in m.__dict__ for m in model.modules())
        # The refused forward ran (and moved BatchNorm statistics in) the blocks before it.
        model.load_state_dict(pristine.state_dict())
        assert_same(
            step(pristine, inputs, spec.seed), step(model, inputs, spec.seed), "after refusal"
        )
        CASES["refused"] += 1
        return
    assert no_hooks_left()
    assert_same(ref, got, f"plan {plan.decisions} segments {plan.segments}")

    # A second step on both: the plan holds no state between steps (BatchNorm stats moved twice).
    assert_same(
        step(reference, inputs, spec.seed + 1), step(model, inputs, spec.seed + 1), "step 2"
    )

    gradckpt.disable(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not model._forward_hooks
    assert_same(
        step(reference, inputs, spec.seed + 2), step(model, inputs, spec.seed + 2), "after disable"
    )
    CASES["exact"] += 1
    for d in set(plan.decisions):
        CASES[d.value] = CASES.get(d.value, 0) + 1
    CASES["segments"] += bool(plan.segments)


@_settings(60)
@given(spec=model_specs(), data=st.data())
def _verify_passes(spec: ModelSpec, data: Any) -> None:
    model = build(spec)
    plan = draw_plan(data, [f"blocks.{i}" for i in range(len(spec.blocks))])
    example = make_inputs(spec)  # a dict: verify calls model(**example), non-tensors included
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    report = gradckpt.verify(model, example, plan, loss_fn=loss_of, seed=spec.seed)
    selective_inplace = any(
        d is Decision.SELECTIVE and any(o.kind in INPLACE_AFTER_MATMUL for o in spec.blocks[i])
        for i, d in enumerate(plan.decisions)
    )
    if report.error is not None and selective_inplace and "modified in place" in report.error:
        assert not report.passed  # the refusal (see above) is reported, not raised
    else:
        assert report.passed, report.table()
        assert report.max_abs == 0.0
    assert gradckpt.applied_plan(model) is None
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"verify changed buffer {n}"
    CASES["verify"] += 1


def test_random_models_and_plans_give_identical_gradients() -> None:
    CASES.update(exact=0, segments=0, refused=0)
    _exact_gradients()
    assert CASES["exact"] >= 200
    # Every registered decision and segments were really exercised.
    for d in {Decision.SAVE, *WRAPPERS}:
        assert CASES.get(d.value, 0) >= 20, (d, CASES)
    assert CASES["segments"] >= 20, CASES
    print(f"\ngenerated cases: {CASES}")


def test_verify_passes_on_random_models_and_plans() -> None:
    CASES["verify"] = 0
    _verify_passes()
    assert CASES["verify"] >= 50
    print(f"\nverify cases: {CASES['verify']}")
