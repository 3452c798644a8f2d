"""Vision-language models: the vision tower's blocks are blocks too, and every policy stays exact.

Tiny random LLaVA (CLIP tower), Qwen2-VL and SigLIP, built from configs: ``find_blocks`` returns
the vision tower's list and the language model's (two ``block_groups``); ``every:K`` and ``sqrt``
count within each list; ``gradckpt.verify`` (loss, every gradient, every buffer bit for bit
against no checkpointing) passes for every policy on an image + text batch.

Run: PYTHONPATH=src .venv/bin/python -m pytest -p no:xdist -q tests/test_vlm_blocks.py
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import gradckpt
from gradckpt.blocks import block_groups

t = pytest.importorskip("transformers")
if not hasattr(t, "GradientCheckpointingLayer") and not hasattr(t, "modeling_layers"):
    pytest.skip("transformers < 4.52 marks no layers", allow_module_level=True)

TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
}


def llava() -> tuple[Any, dict[str, torch.Tensor], tuple[str, str]]:
    cfg = t.LlavaConfig(
        text_config=t.LlamaConfig(**TEXT),
        vision_config=t.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        ),
        image_token_index=5,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    model = t.LlavaForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 64, (2, 10), generator=g)
    ids[:, 1:6] = 5  # (28 / 14)**2 = 4 patches + the class token: 5 image tokens per image
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    return (
        model,
        {"input_ids": ids, "pixel_values": pixels, "labels": ids},
        (
            "model.vision_tower.encoder.layers.",
            "model.language_model.layers.",
        ),
    )


def qwen2_vl() -> tuple[Any, dict[str, torch.Tensor], tuple[str, str]]:
    cfg = t.Qwen2VLConfig(
        text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=5,
        vision_start_token_id=6,
        vision_end_token_id=7,
    )
    model = t.Qwen2VLForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 4, 4]])  # 16 patches, merged 2x2: 4 image tokens
    ids = torch.randint(8, 64, (1, 12), generator=g)
    ids[0, 2], ids[0, 3:7], ids[0, 7] = 6, 5, 7
    pixels = torch.randn(16, 3 * 2 * 14 * 14, generator=g)
    batch = {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid, "labels": ids}
    batch["mm_token_type_ids"] = (ids == 5).long()  # what the processor returns: 1 on image tokens
    return model, batch, ("model.visual.blocks.", "model.language_model.layers.")


CASES = {"llava": llava, "qwen2-vl": qwen2_vl}


def _built(name: str) -> tuple[Any, dict[str, torch.Tensor], tuple[str, str]]:
    torch.manual_seed(0)
    try:
        return CASES[name]()
    except (TypeError, ValueError, AttributeError) as e:  # a transformers without this config
        pytest.skip(f"{name} cannot be built on transformers {t.__version__}: {e}")


@pytest.mark.parametrize("name", list(CASES))
def test_vision_tower_is_its_own_block_list(name: str) -> None:
    model, _batch, (vision, text) = _built(name)
    names = [n for n, _ in gradckpt.find_blocks(model)]
    groups = block_groups(names)
    assert len(groups) == 2, names
    tower = names[groups[0][0] : groups[0][1]]
    lm = names[groups[1][0] : groups[1][1]]
    assert tower == [f"{vision}{i}" for i in range(2)]
    assert lm == [f"{text}{i}" for i in range(3)]
    # every:2 and sqrt count within each list: the first block of each is recomputed
    every = gradckpt.make_plan("every:2", names)
    assert [d.value for d in every.decisions] == [
        "recompute", "save", "recompute", "save", "recompute",
    ]  # fmt: skip
    sqrt = gradckpt.make_plan("sqrt", names)
    assert all(any(a >= s and b <= e for s, e in groups) for a, b in sqrt.segments), sqrt.segments


@pytest.mark.parametrize("name", list(CASES))
def test_every_policy_exact_on_image_and_text(name: str) -> None:
    model, batch, _ = _built(name)
    policies = [p.replace(":K", ":2") for p in gradckpt.policy_names()]
    for policy in policies:
        report = gradckpt.verify(model, batch, policy)
        assert report.passed, (policy, report.problems)
