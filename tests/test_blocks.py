"""find_blocks finds the repeated blocks of HF and plain models; blocks= names or predicates.

Run: .venv/bin/python -m pytest tests/test_blocks.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradckpt
from gradckpt.bench.models import MLPStack, build_bench_model
from gradckpt.blocks import resolve_blocks


@pytest.mark.parametrize(
    ("preset", "prefix", "n"),
    [
        ("llama", "model.layers.", 3),
        ("gpt2", "transformer.h.", 3),
        ("bert", "bert.encoder.layer.", 3),
        ("mixtral", "model.layers.", 3),
        ("mlp", "blocks.", 3),
    ],
)
def test_finds_block_list_of_each_family(preset: str, prefix: str, n: int) -> None:
    model = build_bench_model(preset, layers=n).model
    names = [name for name, _ in gradckpt.find_blocks(model)]
    assert names == [f"{prefix}{i}" for i in range(n)]


def test_encoder_decoder_returns_both_lists() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4
    )
    model = transformers.T5ForConditionalGeneration(cfg)
    names = [n for n, _ in gradckpt.find_blocks(model)]
    assert names == [
        "encoder.block.0",
        "encoder.block.1",
        "decoder.block.0",
        "decoder.block.1",
        "decoder.block.2",
    ]


def test_bart_encoder_and_decoder_layers_of_different_classes() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BartConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    )
    names = [n for n, _ in gradckpt.find_blocks(transformers.BartForConditionalGeneration(cfg))]
    assert names == [
        "model.encoder.layers.0",
        "model.encoder.layers.1",
        "model.decoder.layers.0",
        "model.decoder.layers.1",
    ]


def test_nested_lists_inside_blocks_are_not_blocks() -> None:
    class Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList([Expert() for _ in range(8)])

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Layer() for _ in range(2)])
            self.heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])

    names = [n for n, _ in gradckpt.find_blocks(Model())]
    assert names == ["layers.0", "layers.1"]


def test_model_without_repeated_blocks_says_to_pass_blocks() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(gradckpt.BlockError, match="blocks="):
        gradckpt.find_blocks(model)
    with pytest.raises(gradckpt.BlockError, match="blocks="):
        gradckpt.enable(model)


def test_blocks_by_name_and_predicate() -> None:
    model = MLPStack(layers=4, dim=16, vocab=32)
    assert [n for n, _ in resolve_blocks(model, ["blocks.1", "blocks.3"])] == [
        "blocks.1",
        "blocks.3",
    ]
    picked = resolve_blocks(
        model, lambda name, m: name.startswith("blocks.") and name.count(".") == 1
    )
    assert [n for n, _ in picked] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    plan = gradckpt.enable(model, policy="full", blocks=["blocks.0"])
    assert plan.blocks == ("blocks.0",)
    gradckpt.disable(model)


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        (["blocks.9"], "no module named 'blocks.9'"),
        ([], "empty"),
        (["blocks.0", "blocks.0"], "twice"),
        (["blocks", "blocks.0"], "nested"),
        (lambda name, m: False, "matched no module"),
        ([3], "names"),
    ],
)
def test_bad_blocks_are_refused(blocks: object, message: str) -> None:
    model = MLPStack(layers=2, dim=8, vocab=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(gradckpt.BlockError, match=message):
        gradckpt.enable(model, policy="full", blocks=blocks)  # type: ignore[arg-type]
    assert gradckpt.applied_plan(model) is None
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- transformers' own checkpointable layers are the blocks (issue 13, item 5) ----------------

_SMALL = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 128}
_SPEECH = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "conv_dim": (8, 8),
    "conv_stride": (5, 2),
    "conv_kernel": (10, 3),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}


_SPEECH_BLOCKS = (
    "feature_extractor.conv_layers.0",
    "feature_extractor.conv_layers.1",
    "encoder.layers.0",
    "encoder.layers.1",
)


def _hf_model(kind: str) -> nn.Module:
    t = pytest.importorskip("transformers")
    if kind == "jamba":
        cfg = t.JambaConfig(
            **_SMALL,
            num_hidden_layers=4,
            num_key_value_heads=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=2,
            mamba_d_state=4,
            mamba_dt_rank=4,
        )
        return t.JambaForCausalLM(cfg)
    if kind == "zamba2":
        cfg = t.Zamba2Config(
            **_SMALL,
            num_hidden_layers=4,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
            mamba_d_state=4,
            n_mamba_heads=4,
            num_key_value_heads=4,
            adapter_rank=4,
            use_shared_attention_adapter=True,
        )
        return t.Zamba2ForCausalLM(cfg)
    if kind == "wav2vec2":
        return t.Wav2Vec2Model(t.Wav2Vec2Config(**_SPEECH))
    if kind == "hubert":
        return t.HubertModel(t.HubertConfig(**_SPEECH))
    if kind == "funnel":
        cfg = t.FunnelConfig(
            vocab_size=128, block_sizes=[2, 1], d_model=32, n_head=4, d_head=8, d_inner=64
        )
        return t.FunnelModel(cfg)
    raise ValueError(kind)


def _hf_checkpointable(model: nn.Module) -> list[str]:
    """The outermost modules transformers checkpoints itself, found by isinstance."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    out: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, GradientCheckpointingLayer) and not any(
            name.startswith(o + ".") for o in out
        ):
            out.append(name)
    return out


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # attention and Mamba layers of two classes in one list: "no repeated blocks" before
        ("jamba", [f"model.layers.{i}" for i in range(4)]),
        # mixed Mamba/hybrid layers; the hybrid ones hold a Mamba layer of their own (not a
        # block) and LoRA-like adapter lists (picked as the blocks before)
        ("zamba2", [f"model.layers.{i}" for i in range(4)]),
        # the feature encoder's conv layers are transformers' checkpointable layers too; the
        # weight-norm parametrization of the positional conv was block 0 before
        ("wav2vec2", [*_SPEECH_BLOCKS]),
        ("hubert", [*_SPEECH_BLOCKS]),
    ],
)
def test_transformers_checkpointable_layers_are_the_blocks(kind: str, expected: list[str]) -> None:
    # GradientCheckpointingLayer came with transformers 4.52; before it (4.46.2, make
    # test-oldest) find_blocks has only its structural search (README, "Supported versions").
    pytest.importorskip("transformers.modeling_layers")
    model = _hf_model(kind)
    names = [n for n, _ in gradckpt.find_blocks(model)]
    assert names == expected
    assert names == _hf_checkpointable(model)


def test_list_of_lists_gives_the_inner_modules_as_blocks() -> None:
    # Funnel's encoder.blocks is a ModuleList of ModuleLists of FunnelLayer; a ModuleList is
    # never called, so making it the block checkpointed nothing (the plan said "recompute").
    model = _hf_model("funnel")
    names = [n for n, _ in gradckpt.find_blocks(model)]
    assert names == [
        "encoder.blocks.0.0",
        "encoder.blocks.0.1",
        "encoder.blocks.1.0",
        "decoder.layers.0",
        "decoder.layers.1",
    ]
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    ref = step()
    gradckpt.enable(model, policy="full")
    try:
        layers = [m for m in model.modules() if type(m).__name__ == "FunnelLayer"]
        assert len(layers) == 5 and all("forward" in m.__dict__ for m in layers)
        got = step()
    finally:
        gradckpt.disable(model)
    assert torch.equal(ref[0], got[0])
    assert len(ref[1]) == len(got[1]) and all(map(torch.equal, ref[1], got[1]))


def test_weight_norm_parametrization_is_not_a_block_list() -> None:
    # Without transformers' layer class (plain torch, or transformers older than 4.52) the
    # list heuristic runs: a weight-normed conv's ParametrizationList holds the weight itself.
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 31), dim=2)
            self.layers = nn.ModuleList([Block(), Block()])

    names = [n for n, _ in gradckpt.find_blocks(Model())]
    assert names == ["layers.0", "layers.1"]


# -- block lists: policies count and segment within a list (issue 13, item 4) -----------------


def test_block_groups_split_names_by_list() -> None:
    from gradckpt.blocks import block_groups

    names = ["enc.block.0", "enc.block.1", "enc.block.2", "dec.block.0", "dec.block.1"]
    assert block_groups(names) == ((0, 3), (3, 5))
    assert block_groups(["0", "1", "2"]) == ((0, 3),)  # a top-level nn.Sequential
    # Funnel: each inner list is its own list; a named (non-list) block is a list of one
    assert block_groups(["e.b.0.0", "e.b.0.1", "e.b.1.0", "merger", "d.0"]) == (
        (0, 2),
        (2, 3),
        (3, 4),
        (4, 5),
    )
    assert block_groups([]) == ()


def test_sqrt_and_every_count_within_each_list() -> None:
    from gradckpt.policies import make_plan

    names = [f"encoder.block.{i}" for i in range(4)] + [f"decoder.block.{i}" for i in range(3)]
    # before: one run over 7 names, (0, 3) (3, 5) (5, 7): encoder.block.3 with decoder.block.0
    assert make_plan("sqrt", names).segments == ((0, 2), (2, 4), (4, 6))
    every = make_plan("every:2", names).decisions
    r, s = gradckpt.Decision.RECOMPUTE, gradckpt.Decision.SAVE
    assert every == (r, s, r, s, r, s, r)
    assert make_plan("every:3", names).decisions == (r, s, s, r, r, s, s)


def test_sqrt_on_t5_stays_inside_encoder_and_decoder_and_is_exact() -> None:
    transformers = pytest.importorskip("transformers")
    from conftest import run_step

    cfg = transformers.T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=4,
        num_decoder_layers=3,
        num_heads=4,
        dropout_rate=0.1,
        decoder_start_token_id=0,
        pad_token_id=0,
        # gradckpt turns the KV cache off while gradients are recorded; with it on, T5's decoder
        # attends over the cache's contiguous copy of its keys, which some CPUs' kernels round
        # differently in the last bit (AMD EPYC, AVX-512): the reference runs as gradckpt does
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).train()
    ids = torch.randint(1, 128, (2, 10))
    batch = {"input_ids": ids, "labels": ids}
    ref_loss, ref_grads = run_step(model, batch)
    plan = gradckpt.enable(model, policy="sqrt")
    try:
        assert [(plan.blocks[a], plan.blocks[b - 1]) for a, b in plan.segments] == [
            ("encoder.block.0", "encoder.block.1"),
            ("encoder.block.2", "encoder.block.3"),
            ("decoder.block.0", "decoder.block.1"),
        ]
        loss, grads = run_step(model, batch)  # refused before ("does not take ... output")
    finally:
        gradckpt.disable(model)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[k], v) for k, v in ref_grads.items() if v is not None)
