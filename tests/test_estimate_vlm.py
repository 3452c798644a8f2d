"""gradckpt.estimate on vision-language models: the fake step against a real CPU step, bad input.

Tiny random LLaVA, Qwen2-VL, Gemma 3, PaliGemma and Idefics3 (the configs of
``test_vlm_blocks``, five text layers so that the replay of identical blocks is used) are
estimated from their configs with an image size; the same model is then trained for real on
this CPU on the batch the estimate built (``vision.step_inputs``) under ``gradckpt.measure``:
predicted step peak and activation bytes within 3%, FLOPs equal, for each policy. The vision
tower is planned with the same policy as the language model (its own block list).

Run: PYTHONPATH=src .venv/bin/python -m pytest -p no:xdist -q tests/test_estimate_vlm.py
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import gradckpt
from gradckpt.cli import main
from gradckpt.errors import ConfigError
from gradckpt.estimate import estimate, get_gpu
from gradckpt.estimate.report import setup_words
from gradckpt.estimate.vision import image_layout, step_inputs

t = pytest.importorskip("transformers")
import test_vlm_blocks as vlm  # noqa: E402  (the tiny VLM configs; tests/ is on sys.path)

BATCH, SEQ = 2, 48
#: family -> the image size asked for (Qwen2-VL's is kept near its size, Idefics3's is tiled)
SIZES = {
    "llava": 28,
    "qwen2_vl": (56, 84),
    "qwen2_5_vl": (112, 84),
    "gemma3": 28,
    "paligemma": 28,
    "idefics3": (56, 28),
}


def qwen2_5_vl() -> tuple[object, None, None]:
    """Qwen2.5-VL: window attention in the tower (2 of its 4 blocks attend over the image)."""
    cfg = t.Qwen2_5_VLConfig(
        text_config={**vlm.TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={
            "depth": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 32,
            "num_heads": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1, 3],
        },
        image_token_id=5,
        vision_start_token_id=6,
        vision_end_token_id=7,
    )
    return t.Qwen2_5_VLForConditionalGeneration(cfg), None, None


def _builder(name: str) -> Any:
    return qwen2_5_vl if name == "qwen2_5_vl" else getattr(vlm, name)


def _config(name: str) -> object:
    model, _, _ = _builder(name)()
    cfg = copy.deepcopy(model.config)
    text = cfg.text_config
    text.num_hidden_layers = 5
    if getattr(text, "layer_types", None):  # the pattern continued (Gemma 3: sliding, full)
        text.layer_types = [text.layer_types[i % len(text.layer_types)] for i in range(5)]
    return cfg


def _real_step(model: torch.nn.Module, batch: dict, policy: str) -> gradckpt.MemoryStats:
    def step() -> None:
        model(**batch).loss.backward()

    gradckpt.enable(model, policy=policy)
    try:
        return gradckpt.measure(step, model=model)
    finally:
        gradckpt.disable(model)
        model.zero_grad(set_to_none=True)


def _close(pred: int, real: int, tol: float = 0.03) -> bool:
    return abs(pred - real) <= tol * max(real, 1)


@pytest.mark.parametrize("name", list(SIZES))
def test_vlm_prediction_matches_real_cpu_run(name: str) -> None:
    cfg = _config(name)
    policies = ["none", "full", "every:2", "offload"]
    report = estimate(
        cfg,
        precision="fp32",
        optimizer="sgd",
        batch=BATCH,
        seq=SEQ,
        image_size=SIZES[name],
        policies=policies,
        overhead=0,
        alternatives=False,
    )
    assert any(n.startswith("vision-language model") for n in report.notes)
    torch.manual_seed(0)
    model = type(_builder(name)()[0])(cfg)
    model.train()
    size = (SIZES[name],) * 2 if isinstance(SIZES[name], int) else SIZES[name]
    batch = step_inputs(model, cfg, size, 1, BATCH, SEQ, cfg.text_config.vocab_size)
    image = image_layout(cfg, size)
    assert int((batch["labels"] == -100).sum()) == BATCH * image.tokens
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for r in report.results:
        stats = _real_step(model, batch, r.policy)
        real_peak = stats.peak_bytes - stats.baseline_bytes
        assert _close(r.step_peak_bytes, real_peak), (r.policy, r.step_peak_bytes, real_peak)
        assert _close(r.activation_bytes, stats.activation_bytes), (
            r.policy,
            r.activation_bytes,
            stats.activation_bytes,
        )
        assert r.recompute_flops == stats.recompute_flops, r.policy
        assert r.forward_flops == stats.forward_flops, r.policy
        assert r.peak_bytes - r.step_peak_bytes >= weights
    # the vision tower is checkpointed too: 'full' recomputes more than the text blocks alone
    none, full = report.result("none"), report.result("full")
    assert full.activation_bytes < none.activation_bytes


def test_replay_equals_full_depth_and_images_cost_memory() -> None:
    cfg = _config("qwen2_vl")
    kw = dict(batch=1, seq=SEQ, policies=["none", "full"], overhead=0, alternatives=False)
    small = estimate(cfg, image_size=(28, 28), **kw)
    deep = estimate(cfg, image_size=(28, 28), full_depth=True, **kw)
    assert [r.to_dict() for r in small.results] == [r.to_dict() for r in deep.results]
    # a larger image: more patches through the tower and more image tokens (Qwen2-VL keeps size)
    big = estimate(cfg, image_size=(84, 84), **kw)
    two = estimate(cfg, image_size=(28, 28), images=2, **kw)
    for policy in ("none", "full"):
        assert big.result(policy).peak_bytes > small.result(policy).peak_bytes
        assert two.result(policy).peak_bytes > small.result(policy).peak_bytes
    assert small.setup["image_size"] == [28, 28] and two.setup["images"] == 2


def test_fixed_resolution_towers_do_not_depend_on_the_image_size() -> None:
    cfg = _config("llava")
    kw = dict(batch=1, seq=SEQ, policies=["full"], overhead=0, alternatives=False)
    a, b = estimate(cfg, image_size=28, **kw), estimate(cfg, image_size="1024x768", **kw)
    assert a.results[0].peak_bytes == b.results[0].peak_bytes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "vision-language model: its step depends on the images"),
        ({"image_size": "big"}, "image size must be pixels"),
        ({"image_size": 0}, "image size must be pixels"),
        ({"image_size": 28, "images": 0}, "images must be >= 1"),
        ({"image_size": 28, "images": 12}, "leaving no text"),
    ],
)
def test_bad_image_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        estimate(_config("llava"), batch=1, seq=SEQ, policies=["full"], **kwargs)


def test_image_size_for_a_text_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="text model"):
        estimate("llama-3-8b", image_size=448, policies=["full"])


def test_unmodelled_vlm_family_is_named() -> None:
    cfg = t.LlavaNextConfig(
        text_config=t.LlamaConfig(**vlm.TEXT), vision_config=t.CLIPVisionConfig(**vlm.VISION)
    )
    with pytest.raises(ConfigError, match="does not model yet .*llava, paligemma"):
        estimate(cfg, image_size=28, policies=["full"])


def _plan_cli(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    path = tmp_path / "config.json"
    _config("llava").to_json_file(str(path))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["plan", str(path), "--seq", str(SEQ), "--policy", "full", *args])
    return rc, out.getvalue(), err.getvalue()


def test_cli_plan_estimates_a_vlm_with_its_image_size(tmp_path: Path) -> None:
    rc, out, err = _plan_cli(tmp_path, "--image-size", "336x336", "--images", "2", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["setup"]["image_size"] == [336, 336] and data["setup"]["images"] == 2
    rc, _, err = _plan_cli(tmp_path)  # a VLM without its image size: one line, exit 2
    assert rc == 2 and err.count("\n") == 1 and "--image-size" in err, err


CARD = get_gpu("2500KB")


def test_max_seq_search_starts_past_the_image_tokens() -> None:
    cfg = _config("qwen2_vl")
    # 168x168: 12x12 patches merged 2x2 = 36 image tokens + start/end marks = 38 > seq_step
    report = gradckpt.sweep(
        cfg,
        seq=64,
        image_size=168,
        max_seq=True,
        seq_step=16,
        gpu=CARD,
        policies=["none", "full"],
        overhead="1KB",
    )
    for fit in report.largest:
        assert fit.found and fit.seq > 38 and fit.seq % 16 == 0, fit
        # the answer is the largest: one more step does not fit
        assert fit.next_peak_bytes is not None and fit.next_peak_bytes > CARD.memory_bytes
    none, full = (next(f for f in report.largest if f.policy == p) for p in ("none", "full"))
    assert full.seq > none.seq
    assert "1 image of 168x168 per sequence" in setup_words(report.setup, shape=False)
