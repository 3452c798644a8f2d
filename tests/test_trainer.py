"""Trainer and TRL SFTTrainer with GradCkptCallback: the same training run, bit for bit.

A few real optimizer steps on CPU (tiny random Llama, a word-level tokenizer built in the test,
16 short sentences), with and without real ``peft`` LoRA: the run with the callback must log the
same loss at every step and end with parameters equal (torch.equal) to the run without
checkpointing. Also checks the callback's logs (plan summary, peak memory), that the model is
left as it was after training, that ``gradient_checkpointing=True`` in the arguments is
replaced rather than stacked, and that ``budget=`` goes through to the planner.
Run: .venv/bin/python -m pytest tests/test_trainer.py -q
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import gradckpt

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

SENTENCE_WORDS = "the a cat dog sat ran on under mat log big small red blue and then"
WORDS = SENTENCE_WORDS.split()
VOCAB = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
STEPS = 4


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def texts() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for _ in range(16)]


def tiny_llama(lora: bool) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    if lora:
        model = peft.get_peft_model(model, lora_config())
    return model


def lora_config() -> Any:
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )


def common_args(out: Path) -> dict[str, Any]:
    return {
        "output_dir": str(out),
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def run_trainer(out: Path, callbacks: list, *, lora: bool, **args: Any) -> tuple[list, dict, Any]:
    """transformers.Trainer on pre-tokenized, fixed-length examples."""
    tok = tokenizer()
    ids = [
        tok(t, padding="max_length", max_length=12, truncation=True)["input_ids"] for t in texts()
    ]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    model = tiny_llama(lora)
    targs = transformers.TrainingArguments(**{**common_args(out), **args})
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=ds, callbacks=callbacks)
    trainer.train()
    return _result(trainer)


def run_sft(out: Path, callback: Any, *, lora: bool) -> tuple[list, dict, Any]:
    """The documented recipe: SFTConfig(gradient_checkpointing=False) plus the callback."""
    trl = pytest.importorskip("trl")
    datasets.disable_progress_bars()
    args = trl.SFTConfig(**common_args(out), gradient_checkpointing=False)
    trainer = trl.SFTTrainer(
        model=tiny_llama(lora=False),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts()}),
        processing_class=tokenizer(),
        peft_config=lora_config() if lora else None,
        callbacks=[callback] if callback else None,
    )
    trainer.train()
    return _result(trainer)


def _result(trainer: Any) -> tuple[list, dict, Any]:
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == STEPS
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return losses, params, trainer


def assert_same_run(a: tuple, b: tuple) -> None:
    assert a[0] == b[0]  # the loss trajectory
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        assert torch.equal(a[1][n], b[1][n]), n


def callback(**kw: Any) -> Any:
    from gradckpt.integrations.hf import GradCkptCallback

    return GradCkptCallback(**kw)


@pytest.mark.parametrize("lora", [False, True], ids=["full-finetune", "lora"])
def test_trainer_run_identical_with_callback(tmp_path: Path, lora: bool) -> None:
    ref = run_trainer(tmp_path / "ref", [], lora=lora)
    cb = callback(policy="full")
    got = run_trainer(tmp_path / "gc", [cb], lora=lora)
    assert_same_run(ref, got)
    history = got[2].state.log_history
    assert history[0]["gradckpt/plan"] == "full: 3 recompute"
    assert all(h["gradckpt/host_max_rss_bytes"] > 1 << 20 for h in history)  # bytes, not KiB
    assert cb.plan.summary() == "full: 3 recompute"
    model = got[2].model
    assert gradckpt.applied_plan(model) is None  # disabled at train end: the model as it was
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_trainer_with_chunked_loss_head_and_accumulation(tmp_path: Path) -> None:
    """Trainer passes num_items_in_batch under gradient accumulation; the head divides by it."""
    ref = run_trainer(tmp_path / "ref", [], lora=True, gradient_accumulation_steps=2)
    cb = callback(policy="full", loss_head="chunked", loss_chunk=5)
    got = run_trainer(tmp_path / "gc", [cb], lora=True, gradient_accumulation_steps=2)
    assert cb.plan.summary() == "full: 3 recompute, chunked loss head"
    for a, b in zip(ref[0], got[0]):
        assert abs(a - b) <= 1e-5 * abs(a)
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], rtol=1e-4, atol=1e-6)


class HFCheckpointSpy(transformers.TrainerCallback):  # type: ignore[misc]
    """Counts calls of transformers' own checkpoint function during training."""

    def __init__(self) -> None:
        self.calls = 0

    def on_step_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        for m in model.modules():
            fn = m.__dict__.get("_gradient_checkpointing_func")
            if fn is not None and not getattr(fn, "spied", False):

                def spied(*a: Any, _fn: Any = fn, **k: Any) -> Any:
                    self.calls += 1
                    return _fn(*a, **k)

                spied.spied = True  # type: ignore[attr-defined]
                m._gradient_checkpointing_func = spied


def hf_checkpointing_flag(model: torch.nn.Module) -> bool:
    """HF's own flag: is_activation_checkpointing in transformers 5, is_gradient_checkpointing in 4.x."""
    new = hasattr(type(model), "is_activation_checkpointing")
    return bool(
        getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing")
    )


def test_gradient_checkpointing_true_is_replaced_not_stacked(tmp_path: Path) -> None:
    ref = run_trainer(tmp_path / "ref", [], lora=False)
    hf_only = HFCheckpointSpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        run_trainer(tmp_path / "hf", [hf_only], lora=False, gradient_checkpointing=True)
        spy = HFCheckpointSpy()
        got = run_trainer(
            tmp_path / "gc",
            [callback(policy="sqrt"), spy],
            lora=False,
            gradient_checkpointing=True,
        )
    assert hf_only.calls == 3 * STEPS  # the spy sees HF's checkpoint: once per layer and step
    assert spy.calls == 0  # with the callback, HF's checkpoint never ran
    assert_same_run(ref, got)
    assert hf_checkpointing_flag(got[2].model)  # HF's flag is back after training


@pytest.mark.parametrize("lora", [False, True], ids=["full-finetune", "lora"])
def test_sft_trainer_recipe_identical(tmp_path: Path, lora: bool) -> None:
    ref = run_sft(tmp_path / "ref", None, lora=lora)
    got = run_sft(tmp_path / "gc", callback(policy="full"), lora=lora)
    assert_same_run(ref, got)
    assert got[2].state.log_history[0]["gradckpt/plan"] == "full: 3 recompute"


def test_budget_goes_to_the_planner(tmp_path: Path) -> None:
    pytest.importorskip("gradckpt.planner")
    ref = run_trainer(tmp_path / "ref", [], lora=True)
    # Generous: on CPU the profile counts every tensor alive in the test process (other tests'
    # leftovers under pytest-xdist), so a tight budget would depend on test order.
    cb = callback(budget="64GiB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the planner says what it re-planned
        got = run_trainer(tmp_path / "gc", [cb], lora=True)
    assert_same_run(ref, got)
    plans = [h["gradckpt/plan"] for h in got[2].state.log_history if "gradckpt/plan" in h]
    assert plans and plans[-1].startswith("auto:"), plans  # planned from the first step
