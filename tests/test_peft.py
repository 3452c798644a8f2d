"""PEFT LoRA under gradckpt: adapters get exactly the gradients they get without checkpointing.

Real ``peft`` on a tiny random Llama (CPU, fp32, dropout on): ``get_peft_model`` then
``gradckpt.enable`` with every registered policy, ``enable`` before ``get_peft_model``, and the
QLoRA preparation (``prepare_model_for_kbit_training`` freezing and fp32 casting, plus the
reentrant HF checkpointing and ``enable_input_require_grads`` it adds on quantized models).
Embeddings stay frozen and no input-require-grads hook is needed; adapter files written by
``save_pretrained`` are byte-identical. Run: .venv/bin/python -m pytest tests/test_peft.py -q
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import gradckpt

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny_llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).train()


def lora(model: torch.nn.Module) -> torch.nn.Module:
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(1)
    return peft.get_peft_model(model, cfg).train()


def step(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def assert_adapter_grads_equal(ref: tuple, got: tuple) -> None:
    assert torch.equal(ref[0], got[0])
    assert ref[1].keys() == got[1].keys()
    assert ref[1] and all("lora_" in n for n in ref[1])  # only adapters train
    for n in ref[1]:
        assert torch.equal(ref[1][n], got[1][n]), n
    # every adapter got a gradient: the B matrices start at zero, so A's are 0 in step one,
    # but B's are not
    assert all(g.abs().sum() > 0 for n, g in got[1].items() if "lora_B" in n)


def policies() -> list[str]:
    return [p.replace(":K", ":2") for p in gradckpt.policy_names(exact=True)]


@pytest.mark.parametrize("policy", policies())
def test_lora_adapters_get_exact_gradients(policy: str) -> None:
    model = lora(tiny_llama())
    ref = step(copy.deepcopy(model))
    plan = gradckpt.enable(model, policy=policy)
    assert plan.blocks[0] == "base_model.model.model.layers.0"
    assert_adapter_grads_equal(ref, step(model))
    embed = model.get_input_embeddings()
    assert not embed.weight.requires_grad and not embed._forward_hooks  # no require-grads hook
    gradckpt.disable(model)
    assert_adapter_grads_equal(ref, step(model))


def test_enable_before_get_peft_model() -> None:
    ref = step(lora(tiny_llama()))
    base = tiny_llama()
    gradckpt.enable(base, policy="full")
    model = lora(base)
    # PeftModel calls the base model's forward directly, so nothing may depend on the
    # top-level module's hooks firing.
    assert_adapter_grads_equal(ref, step(model))


def hf_checkpointing_flag(model: torch.nn.Module) -> bool:
    """HF's own flag: is_activation_checkpointing in transformers 5, is_gradient_checkpointing in 4.x."""
    new = hasattr(type(model), "is_activation_checkpointing")
    return bool(
        getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing")
    )


def test_qlora_style_preparation() -> None:
    """The state prepare_model_for_kbit_training leaves a 4-bit model in, minus the 4 bits."""

    def prepared(with_hf_checkpointing: bool) -> torch.nn.Module:
        model = peft.prepare_model_for_kbit_training(tiny_llama(torch.bfloat16))
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
        if with_hf_checkpointing:  # what it adds when the model is really quantized
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": True}
                )
            model.enable_input_require_grads()
        return lora(model)

    ref = step(prepared(with_hf_checkpointing=False))
    model = prepared(with_hf_checkpointing=True)
    gradckpt.enable(model, policy="full")
    assert not hf_checkpointing_flag(model.base_model.model)  # HF's reentrant one is off
    assert_adapter_grads_equal(ref, step(model))
    gradckpt.disable(model)
    assert hf_checkpointing_flag(model.base_model.model)


def test_adapter_save_pretrained_identical(tmp_path: Path) -> None:
    model = lora(tiny_llama())
    model.save_pretrained(tmp_path / "plain")
    gradckpt.enable(model, policy="full")
    step(model)
    assert model.save_pretrained(tmp_path / "gradckpt") is None
    plain = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*"))
    with_gc = sorted(
        p.relative_to(tmp_path / "gradckpt") for p in (tmp_path / "gradckpt").rglob("*")
    )
    assert plain == with_gc and plain
    for rel in plain:
        a, b = tmp_path / "plain" / rel, tmp_path / "gradckpt" / rel
        assert a.is_dir() or a.read_bytes() == b.read_bytes(), rel
