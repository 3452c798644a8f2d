"""Vision-language models: the vision tower's blocks are blocks too, and every policy stays exact.

Tiny random LLaVA (CLIP tower), Qwen2-VL, SigLIP, PaliGemma, Gemma 3 and Idefics3 (SmolVLM's
architecture), built from configs: ``find_blocks`` returns
the vision tower's list and the language model's (SigLIP: its text and vision towers), each its
own ``block_groups`` entry; ``every:K`` and ``sqrt``
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


def llava() -> tuple[Any, dict[str, Any], tuple[tuple[str, int], ...]]:
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
            ("model.vision_tower.encoder.layers.", 2),
            ("model.language_model.layers.", 3),
        ),
    )


def qwen2_vl() -> tuple[Any, dict[str, Any], tuple[tuple[str, int], ...]]:
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
    return model, batch, (("model.visual.blocks.", 2), ("model.language_model.layers.", 3))


VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 28,
    "patch_size": 14,
}
PIXELS = (2, 3, 28, 28)  # (28 / 14)**2 = 4 patches per image


def _ids(first: int, image_token: int, at: slice) -> torch.Tensor:
    ids = torch.randint(first, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[:, at] = image_token
    return ids


def siglip() -> tuple[Any, dict[str, Any], tuple[tuple[str, int], ...]]:
    cfg = t.SiglipConfig(text_config={**TEXT, "max_position_embeddings": 16}, vision_config=VISION)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "pixel_values": torch.randn(*PIXELS), "return_loss": True}
    return (
        t.SiglipModel(cfg),
        batch,
        (
            ("text_model.encoder.layers.", 3),
            ("vision_model.encoder.layers.", 2),
        ),
    )


def paligemma() -> tuple[Any, dict[str, Any], tuple[tuple[str, int], ...]]:
    cfg = t.PaliGemmaConfig(
        text_config={**TEXT, "model_type": "gemma", "head_dim": 8},
        vision_config={**VISION, "projection_dim": 32},
        image_token_index=5,
        projection_dim=32,
    )
    ids = _ids(6, 5, slice(0, 4))  # 4 image tokens first, as its processor puts them
    batch = {
        "input_ids": ids,
        "pixel_values": torch.randn(*PIXELS),
        "labels": ids,
        "token_type_ids": (ids == 5).long(),
    }
    return (
        t.PaliGemmaForConditionalGeneration(cfg),
        batch,
        (
            ("model.vision_tower.encoder.layers.", 2),
            ("model.language_model.layers.", 3),
        ),
    )


def gemma3() -> tuple[Any, dict[str, Any], tuple[tuple[str, int], ...]]:
    cfg = t.Gemma3Config(
        text_config={**TEXT, "head_dim": 8, "sliding_window": 8},
        vision_config=VISION,
        mm_tokens_per_image=4,
        image_token_index=5,
        boi_token_index=6,
        eoi_token_index=7,
    )
    ids = _ids(8, 5, slice(1, 5))
    batch = {
        "input_ids": ids,
        "pixel_values": torch.randn(*PIXELS),
        "labels": ids,
        "token_type_ids": (ids == 5).long(),
    }
    return (
        t.Gemma3ForConditionalGeneration(cfg),
        batch,
        (
            ("model.vision_tower.encoder.layers.", 2),
            ("model.language_model.layers.", 3),
        ),
    )


def idefics3() -> tuple[Any, dict[str, Any], tuple[tuple[str, int], ...]]:
    # SmolVLM's architecture: 4 patches per image, pixel shuffle by 2: 1 image token each
    cfg = t.Idefics3Config(
        text_config=t.LlamaConfig(**TEXT), vision_config=VISION, scale_factor=2, image_token_id=5
    )
    ids = _ids(8, 5, slice(2, 3))
    batch = {"input_ids": ids, "pixel_values": torch.randn(2, 1, 3, 28, 28), "labels": ids}
    return (
        t.Idefics3ForConditionalGeneration(cfg),
        batch,
        (
            ("model.vision_model.encoder.layers.", 2),
            ("model.text_model.layers.", 3),
        ),
    )


CASES = {
    "llava": llava,
    "qwen2-vl": qwen2_vl,
    "siglip": siglip,
    "paligemma": paligemma,
    "gemma3": gemma3,
    "idefics3-smolvlm": idefics3,
}


def _built(name: str) -> tuple[Any, dict[str, Any], tuple[tuple[str, int], ...]]:
    torch.manual_seed(0)
    try:
        return CASES[name]()
    except (TypeError, ValueError, AttributeError) as e:  # a transformers without this config
        pytest.skip(f"{name} cannot be built on transformers {t.__version__}: {e}")


@pytest.mark.parametrize("name", list(CASES))
def test_vision_tower_is_its_own_block_list(name: str) -> None:
    model, _batch, lists = _built(name)
    names = [n for n, _ in gradckpt.find_blocks(model)]
    groups = block_groups(names)
    assert len(groups) == len(lists), names
    for (start, stop), (prefix, count) in zip(groups, lists, strict=True):
        assert names[start:stop] == [f"{prefix}{i}" for i in range(count)]
    # every:2 counts within each list: the first block of each list is recomputed
    every = gradckpt.make_plan("every:2", names)
    expect = [i % 2 == 0 for _, count in lists for i in range(count)]
    assert [d.value == "recompute" for d in every.decisions] == expect
    sqrt = gradckpt.make_plan("sqrt", names)
    assert all(any(a >= s and b <= e for s, e in groups) for a, b in sqrt.segments), sqrt.segments


@pytest.mark.parametrize("name", list(CASES))
def test_every_policy_exact_on_image_and_text(name: str) -> None:
    model, batch, _ = _built(name)
    policies = [p.replace(":K", ":2") for p in gradckpt.policy_names()]
    for policy in policies:
        report = gradckpt.verify(model, batch, policy)
        assert report.passed, (policy, report.problems)


class _Layer(torch.nn.Module):
    """A transformer block in plain PyTorch (no transformers marker class): attention + MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(x)


class _TinyVLM(torch.nn.Module):
    """A small vision tower (2 blocks of width 8) next to a language model (4 blocks of 64)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Linear(12, 8)
        self.vision = torch.nn.ModuleList(_Layer(8) for _ in range(2))
        self.project = torch.nn.Linear(8, 64)
        self.embed = torch.nn.Embedding(32, 64)
        self.layers = torch.nn.ModuleList(_Layer(64) for _ in range(4))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(64, 32) for _ in range(2))  # no attention

    def forward(self, ids: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        v = self.patch(patches)
        for block in self.vision:
            v = block(v)
        x = torch.cat([self.project(v), self.embed(ids)], dim=1)
        for block in self.layers:
            x = block(x)
        return sum(h(x).logsumexp(-1).mean() for h in self.heads)


def test_structural_search_keeps_a_small_vision_tower() -> None:
    torch.manual_seed(0)
    model = _TinyVLM()
    tower = sum(p.numel() for p in model.vision.parameters())
    lm = sum(p.numel() for p in model.layers.parameters())
    assert tower < 0.25 * lm  # below the share rule: kept because its blocks hold attention
    names = [n for n, _ in gradckpt.find_blocks(model)]
    assert names == ["vision.0", "vision.1", "layers.0", "layers.1", "layers.2", "layers.3"]
    batch = {
        "ids": torch.randint(0, 32, (2, 5)),
        "patches": torch.randn(2, 3, 12),
    }
    for policy in ("full", "sqrt", "every:2", "selective"):
        report = gradckpt.verify(model, batch, policy, loss_fn=lambda out: out)
        assert report.passed, (policy, report.problems)
