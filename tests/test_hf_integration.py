"""Hugging Face models under gradckpt: one checkpointing, no KV cache in training, files unchanged.

Checks on a tiny random Llama (transformers, CPU, fp32) that ``gradckpt.enable``: switches the
model's own gradient checkpointing off and ``disable`` restores it exactly; never checkpoints a
layer twice (counted by how often a layer's MLP runs per step); trains without any use_cache
warning and with gradients bit-identical to a run without checkpointing; keeps ``config.json``,
``state_dict`` and ``save_pretrained`` files byte-identical; refuses a pre-filled KV cache in a
checkpointed layer; leaves generation (no grad) alone; and that ``import gradckpt`` does not
import transformers. Written for transformers 5 and 4.x (also passes with 4.45.2).
Run: .venv/bin/python -m pytest tests/test_hf_integration.py -q
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import gradckpt

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 3, seed: int = 0) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).train()


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def step(model: torch.nn.Module, **kw: object) -> tuple[torch.Tensor, dict, object]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(input_ids=IDS, labels=IDS, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, out


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def hf_flags(model: torch.nn.Module) -> dict[str, tuple[bool, object]]:
    """Every module's own checkpointing flag, and whether it is set on the instance."""
    return {
        n: ("gradient_checkpointing" in m.__dict__, m.gradient_checkpointing)
        for n, m in model.named_modules()
        if hasattr(m, "gradient_checkpointing")
    }


def hf_checkpointing_active(model: torch.nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (4.x) to is_activation_checkpointing.
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def cached_tokens(cache: Any) -> int:
    # a Cache object (transformers 5) or legacy tuples of (key, value) per layer (4.x)
    return int(
        cache.get_seq_length() if hasattr(cache, "get_seq_length") else cache[0][0].shape[-2]
    )


def hf_checkpointing_on(model: torch.nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.x renamed it activation_checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def mlp_calls_per_step(model: torch.nn.Module) -> int:
    calls = []
    layer0 = model.model.layers[0]
    # A pre-hook: torch's checkpoint stops a recompute early, inside the MLP, once the last tensor
    # backward needs is back, so the MLP's forward hook would not see the recompute.
    handle = layer0.mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        step(model)
    finally:
        handle.remove()
    return len(calls)


def test_enable_switches_hf_checkpointing_off_and_disable_restores_it_exactly() -> None:
    model = tiny_llama()
    hf_checkpointing_on(model)
    before = hf_flags(model)
    funcs = {n: m.__dict__.get("_gradient_checkpointing_func") for n, m in model.named_modules()}
    assert any(v for _, v in before.values())
    gradckpt.enable(model, policy="full")
    assert not any(v for _, v in hf_flags(model).values())
    gradckpt.disable(model)
    assert hf_flags(model) == before
    assert {
        n: m.__dict__.get("_gradient_checkpointing_func") for n, m in model.named_modules()
    } == funcs


def hf_checkpoint_calls_per_step(model: torch.nn.Module) -> int:
    """How often transformers' own checkpoint function runs in one step (0 when it is off)."""
    calls = []
    originals = {
        m: m.__dict__["_gradient_checkpointing_func"]
        for m in model.modules()
        if "_gradient_checkpointing_func" in m.__dict__
    }
    for m, fn in originals.items():

        def counted(*a: object, _fn: Any = fn, **kw: object) -> object:
            calls.append(1)
            return _fn(*a, **kw)

        m._gradient_checkpointing_func = counted
    try:
        step(model)
    finally:
        for m, fn in originals.items():
            m._gradient_checkpointing_func = fn
    return len(calls)


def test_no_layer_is_checkpointed_twice(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama()
    assert mlp_calls_per_step(model) == 1  # no checkpointing: forward only
    gradckpt.enable(model, policy="full")
    assert mlp_calls_per_step(model) == 2  # forward + one recompute
    gradckpt.disable(model)
    hf_checkpointing_on(model)
    assert hf_checkpoint_calls_per_step(model) == 3  # HF's own: once per layer
    gradckpt.enable(model, policy="full")  # replaces HF's
    assert hf_checkpoint_calls_per_step(model) == 0
    assert mlp_calls_per_step(model) == 2
    gradckpt.disable(model)
    assert hf_checkpoint_calls_per_step(model) == 3

    # HF's flag switched on *after* gradckpt (Trainer(gradient_checkpointing=True) does this):
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = False
    gradckpt.enable(model, policy="full")
    hf_checkpointing_on(model)
    with caplog.at_level(logging.WARNING, logger="gradckpt"):
        assert hf_checkpoint_calls_per_step(model) == 0
        assert hf_checkpoint_calls_per_step(model) == 0
    assert sum("switched it off again" in r.message for r in caplog.records) == 1
    gradckpt.disable(model)
    assert hf_checkpointing_active(model)  # the user's later request is honoured again


@pytest.mark.parametrize("policy", ["full", "sqrt", "every:2"])
def test_training_with_use_cache_default_gives_same_grads_and_no_warning(
    policy: str, capfd: pytest.CaptureFixture[str]
) -> None:
    model = tiny_llama()
    assert model.config.use_cache is True  # the default that makes HF warn under checkpointing
    ref = copy.deepcopy(model)
    loss0, g0, _ = step(ref)
    gradckpt.enable(model, policy=policy)
    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any Python warning fails the test
            loss1, g1, out1 = step(model)
            loss2, g2, out2 = step(model, use_cache=True)  # asked for explicitly
    finally:
        transformers.logging.set_verbosity(old)
    assert torch.equal(loss0, loss1) and torch.equal(loss0, loss2)
    assert_same_grads(g0, g1)
    assert_same_grads(g0, g2)
    assert out1.past_key_values is None and out2.past_key_values is None
    err = capfd.readouterr().err
    assert "cache" not in err.lower(), err
    assert model.config.use_cache is True  # only switched off while a forward records gradients


def test_use_cache_is_off_inside_training_forward_only() -> None:
    model = tiny_llama()
    seen = []
    model.model.layers[0].register_forward_pre_hook(
        lambda m, a: seen.append(model.config.use_cache)
    )
    gradckpt.enable(model, policy="full")
    step(model)
    with torch.no_grad():
        model(input_ids=IDS)
    assert seen == [False, True]
    assert model.config.use_cache is True
    gradckpt.disable(model)
    step(model)
    assert seen[-1] is True


def test_prefilled_kv_cache_in_checkpointed_layer_is_refused() -> None:
    model = tiny_llama()
    gradckpt.enable(model, policy="full")
    cache = transformers.DynamicCache()  # a Cache object in 4.x too (not legacy tuples)
    with torch.no_grad():
        model(input_ids=IDS[:, :4], past_key_values=cache, use_cache=True)
    assert cached_tokens(cache) == 4
    with pytest.raises(gradckpt.GradCkptError, match="KV cache already holding 4 token"):
        model(input_ids=IDS[:, 4:], past_key_values=cache, use_cache=True)


def test_generate_under_gradckpt_matches_and_keeps_its_cache() -> None:
    model = tiny_llama().eval()
    ref = copy.deepcopy(model)
    prompt = IDS[:1, :4]
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = ref.generate(prompt, **kw)
    gradckpt.enable(model, policy="full")
    assert torch.equal(model.generate(prompt, **kw), expected)
    with torch.no_grad():
        assert cached_tokens(model(input_ids=prompt, use_cache=True).past_key_values) == 4


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_state_dict_and_save_pretrained_identical(tmp_path: Path) -> None:
    model = tiny_llama()
    keys = list(model.state_dict())
    model.save_pretrained(tmp_path / "plain")
    for policy in ["full", "sqrt"]:
        gradckpt.enable(model, policy=policy)
        step(model)  # a training forward ran: nothing it switched may leak into the files
        assert list(model.state_dict()) == keys
        assert [n for n, _ in model.named_parameters()] == [
            n for n, _ in tiny_llama().named_parameters()
        ]
        model.save_pretrained(tmp_path / policy)
        assert _files(tmp_path / policy) == _files(tmp_path / "plain"), policy
        gradckpt.disable(model)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full")
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_frozen_embeddings_need_no_enable_input_require_grads() -> None:
    model = tiny_llama()
    model.get_input_embeddings().weight.requires_grad_(False)
    ref = copy.deepcopy(model)
    _, g0, _ = step(ref)
    gradckpt.enable(model, policy="full")
    _, g1, _ = step(model)
    assert_same_grads(g0, g1)
    assert "model.layers.0.self_attn.q_proj.weight" in g1
    assert not model.get_input_embeddings()._forward_hooks  # no require-grads hook was added


def test_import_gradckpt_does_not_import_transformers() -> None:
    code = (
        "import sys, torch, gradckpt, gradckpt.integrations.hf\n"
        "m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))\n"
        "gradckpt.enable(m, policy='full')\n"
        "print(sorted(k for k in ('transformers', 'peft', 'trl') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
