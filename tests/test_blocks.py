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
