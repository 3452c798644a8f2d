"""Habits users bring from Unsloth and TRL: ``policy="unsloth"``, the trainer's own flags, Liger.

- ``"unsloth"`` is an alias of ``"offload"``: the same plan, bit-identical gradients, not listed
  twice by ``policy_names()``.
- ``GradCkptCallback`` reads ``gradient_checkpointing``, ``gradient_checkpointing_kwargs`` and
  TRL's ``activation_offloading`` (``trainer_choice``, checked case by case without a trainer)
  and says in one info line how it mapped them; with a real ``Trainer`` the run is unchanged.
- A model patched by Liger-Kernel (fused linear cross-entropy) still trains under gradckpt with
  the gradients it has without it (needs liger-kernel, whose kernels are Triton: CUDA only).

Run: PYTHONPATH=src .venv/bin/python -m pytest -p no:xdist -q tests/test_trainer_habits.py
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import gradckpt
from gradckpt.errors import ConfigError, PolicyError
from gradckpt.integrations.hf import trainer_choice

transformers = pytest.importorskip("transformers")


def test_unsloth_is_offload() -> None:
    names = ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert gradckpt.make_plan("unsloth", names) == gradckpt.make_plan("offload", names)
    made = gradckpt.make_plan("Unsloth", names, offload_min_bytes="1MiB")
    assert made.options == {"offload_min_bytes": 1 << 20}
    assert gradckpt.policy_aliases() == {"unsloth": "offload"}
    assert "unsloth" not in gradckpt.policy_names()  # sweeps over every policy run it once
    with pytest.raises(PolicyError, match="did you mean 'unsloth'"):
        gradckpt.make_plan("unslot", names)
    with pytest.raises(PolicyError, match="takes no argument"):
        gradckpt.make_plan("unsloth:2", names)


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_unsloth_policy_gives_identical_gradients() -> None:
    model = _llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = _grads(model, ids)
    plan = gradckpt.enable(model, policy="unsloth")
    assert plan.summary() == "offload: 2 offload"
    got = _grads(model, ids)
    gradckpt.disable(model)
    assert torch.equal(ref[0], got[0])
    assert ref[1].keys() == got[1].keys()
    for n in ref[1]:
        assert torch.equal(ref[1][n], got[1][n]), n


@pytest.mark.parametrize(
    ("args", "given", "policy", "said"),
    [
        ({}, {}, None, None),  # nothing asked: enable's default (full), nothing to say
        (
            {"gradient_checkpointing": True},
            {},
            "full",
            "gradient_checkpointing=True -> gradckpt policy 'full'",
        ),
        (
            {"gradient_checkpointing": True, "activation_offloading": True},
            {},
            "offload",
            "activation_offloading=True -> gradckpt policy 'offload'",
        ),
        ({"activation_offloading": True}, {}, "offload", "-> gradckpt policy 'offload'"),
        (
            {"gradient_checkpointing": True},
            {"policy": "sqrt"},
            "sqrt",
            "gradient_checkpointing=True replaced by gradckpt's policy 'sqrt'",
        ),
        (
            {"gradient_checkpointing": True},
            {"budget": "20GiB"},
            None,
            "replaced by gradckpt's budget '20GiB'",
        ),
        (
            {"activation_offloading": True},
            {"policy": "selective"},
            "selective",
            "activation_offloading=True kept next to gradckpt's policy 'selective'",
        ),
        (
            {
                "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": True},
            },
            {},
            "full",
            "use_reentrant=True not used: gradckpt always runs torch's non-reentrant checkpoint",
        ),
        # kwargs without checkpointing switched on are not the trainer asking for anything
        ({"gradient_checkpointing_kwargs": {"use_reentrant": True}}, {}, None, None),
        # what gradckpt does anyway is not reported
        (
            {
                "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": False},
            },
            {},
            "full",
            "gradient_checkpointing=True -> gradckpt policy 'full' (",
        ),
    ],
)
def test_trainer_choice_maps_the_trainers_flags(
    args: dict, given: dict, policy: str | None, said: str | None
) -> None:
    choice = trainer_choice(SimpleNamespace(**args), **given)
    assert choice.policy == policy
    if said is None:
        assert choice.message is None
    else:
        assert choice.message is not None and said in choice.message, choice.message
        assert "\n" not in choice.message  # one line
        switched = "transformers' own checkpointing switched off" in choice.message
        assert switched == bool(args.get("gradient_checkpointing"))


def test_trainer_choice_refuses_kwargs_that_are_not_a_dict() -> None:
    with pytest.raises(ConfigError, match="gradient_checkpointing_kwargs must be a dict"):
        trainer_choice(
            SimpleNamespace(gradient_checkpointing=True, gradient_checkpointing_kwargs="x")
        )


def _trainer_run(out: Path, callbacks: list, **args: Any) -> tuple[list[float], dict, Any]:
    datasets = pytest.importorskip("datasets")
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(2)).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    targs = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **args,
    )
    trainer = transformers.Trainer(
        model=_llama(), args=targs, train_dataset=ds, callbacks=callbacks
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return losses, params, trainer


def test_callback_follows_gradient_checkpointing_true(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gradckpt.integrations.hf import GradCkptCallback

    ref = _trainer_run(tmp_path / "ref", [])
    cb = GradCkptCallback()  # no policy: the trainer's own flags decide
    with caplog.at_level(logging.INFO, logger="gradckpt"):
        got = _trainer_run(
            tmp_path / "gc",
            [cb],
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        )
    assert got[2].state.log_history[0]["gradckpt/plan"] == "full: 2 recompute"
    lines = [
        r.getMessage() for r in caplog.records if "gradient_checkpointing=True" in r.getMessage()
    ]
    assert len(lines) == 1 and "use_reentrant=True not used" in lines[0], lines
    assert ref[0] == got[0]  # reentrant was asked for, non-reentrant ran: the same run
    for n in ref[1]:
        assert torch.equal(ref[1][n], got[1][n]), n


def _liger_patch() -> Any:
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except Exception as e:  # ImportError, or triton failing to find a GPU at import
        pytest.skip(f"liger-kernel not importable here ({type(e).__name__}: {e})")
    return apply_liger_kernel_to_llama


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="Liger-Kernel's kernels are Triton: CUDA only"
)
def test_liger_fused_linear_cross_entropy_trains_under_gradckpt() -> None:
    patch = _liger_patch()
    patch(
        rope=False,
        rms_norm=False,
        swiglu=False,
        cross_entropy=False,
        fused_linear_cross_entropy=True,
    )
    model = _llama().cuda()
    ids = torch.randint(0, 64, (2, 12), device="cuda", generator=None)
    ref = _grads(model, ids)
    gradckpt.enable(model, policy="full")
    got = _grads(model, ids)
    gradckpt.disable(model)
    assert got[0].isfinite() and torch.equal(ref[0], got[0])
    for n in ref[1]:
        assert torch.equal(ref[1][n], got[1][n]), n


def test_trainer_choice_reads_trls_real_config(tmp_path: Path) -> None:
    # A real SFTConfig, so the attribute names are TRL's own. SFTTrainer itself cannot run with
    # activation_offloading=True on a CPU-only machine: TRL's OffloadActivations reads
    # torch.accelerator.current_accelerator().type, which is None there (AttributeError).
    trl = pytest.importorskip("trl")
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path),
        gradient_checkpointing=True,
        activation_offloading=True,
        report_to=[],
        use_cpu=True,
    )
    choice = trainer_choice(cfg)
    assert choice.policy == "offload"
    assert choice.message is not None and "activation_offloading=True" in choice.message
    assert "use_reentrant" not in choice.message  # TRL's default (False) is what gradckpt does
