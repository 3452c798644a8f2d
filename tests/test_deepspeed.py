"""DeepSpeed ZeRO-3 through the HF Trainer with GradCkptCallback, on 2 CPU processes (gloo).

The worker (this file run as a script under torchrun) trains a tiny Llama with ZeRO-3, full
fine-tune and PEFT LoRA, each without gradckpt and with policy ``full`` (torch's non-reentrant
checkpoint: ZeRO-3 gathers the parameters again inside each recompute). Checked: the
parameters really are partitioned (each rank holds half), ``full`` logs the losses of no
checkpointing bit for bit, and both equal one process without DeepSpeed within rounding. The
LoRA run is the case of huggingface/transformers#47254 (frozen parameters + ZeRO-3 +
non-reentrant checkpointing: CheckpointError before DeepSpeed 0.19.3); older DeepSpeed is
refused by ``gradckpt.guards.deepspeed.check_zero3``, tested here without DeepSpeed.

DeepSpeed is not among ``make test``'s pinned packages, so the distributed test is skipped
there. It runs on CPU (DeepSpeed's CPU accelerator, gloo) in a venv with deepspeed >= 0.19.3:
    pip install --no-build-isolation deepspeed    # next to torch==2.13.0 (CPU)
    PYTHONPATH=src python -m pytest -p no:xdist -q tests/test_deepspeed.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gradckpt.errors import ConfigError
from gradckpt.guards.deepspeed import check_zero3

VOCAB, SEQ, STEPS, GLOBAL_BATCH = 128, 16, 3, 4
ROOT = Path(__file__).resolve().parents[1]


def build(lora: bool) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    if lora:
        import peft

        lc = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
        model = peft.get_peft_model(model, lc)
    return model


def train(lora: bool, policy: str, world: int, deepspeed: bool, workdir: str) -> dict[str, Any]:
    import datasets
    import transformers

    from gradckpt.integrations.hf import GradCkptCallback

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH * STEPS, SEQ), generator=g).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    zero3 = {
        "zero_optimization": {"stage": 3},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_allow_untested_optimizer": True,
    }
    targs = transformers.TrainingArguments(
        output_dir=workdir,
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_cpu=True,  # gloo processes; with deepspeed, its CPU accelerator
        deepspeed=zero3 if deepspeed else None,
        gradient_checkpointing=False,
    )
    callbacks = [] if policy == "none" else [GradCkptCallback(policy=policy)]
    trainer = transformers.Trainer(
        model=build(lora), args=targs, train_dataset=ds, callbacks=callbacks
    )
    trainer.train()
    history = trainer.state.log_history
    p = next(iter(trainer.model.parameters()))
    ds_tensor = getattr(p, "ds_tensor", None)
    return {
        "losses": [h["loss"] for h in history if "loss" in h],
        "plans": [h["gradckpt/plan"] for h in history if "gradckpt/plan" in h],
        "wrapped_by": type(trainer.model_wrapped).__name__,
        "shard_of": None if ds_tensor is None else [ds_tensor.numel(), p.ds_numel],
    }


def worker() -> None:
    world = int(os.environ["WORLD_SIZE"])
    out = {}
    for lora in (False, True):
        for policy in ("none", "full"):
            name = f"{'lora' if lora else 'full-ft'}/{policy}"
            out[name] = train(lora, policy, world, True, os.environ["GRADCKPT_WORKDIR"])
    if int(os.environ["RANK"]) == 0:
        Path(os.environ["GRADCKPT_OUT"]).write_text(json.dumps(out))


# -- tests ------------------------------------------------------------------------------------


class _Partitioned(torch.nn.Linear):
    """A linear whose parameters look like ZeRO-3's (``ds_id``, ``ds_status``)."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        for i, p in enumerate(self.parameters()):
            p.ds_id, p.ds_status = i, "NOT_AVAILABLE"  # type: ignore[attr-defined]


def test_old_deepspeed_with_frozen_zero3_params_is_refused() -> None:
    m = _Partitioned()
    check_zero3(m, version="0.19.2")  # every parameter trainable: never failed
    m.bias.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"DeepSpeed 0\.19\.2 ZeRO-3 .* deepspeed>=0\.19\.3"):
        check_zero3(m, version="0.19.2")
    check_zero3(m, version="0.19.3")
    check_zero3(m, version="0.20.0+cpu")
    check_zero3(torch.nn.Linear(2, 2), version="0.10.0")  # not partitioned: not ZeRO-3


def test_refused_by_enable_before_the_model_is_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradckpt
    from gradckpt.guards import deepspeed as guard

    model = torch.nn.Sequential(_Partitioned(), _Partitioned())
    model[0].weight.requires_grad_(False)
    real = guard.check_zero3
    monkeypatch.setattr(guard, "check_zero3", lambda m, version=None: real(m, "0.19.2"))
    from gradckpt.guards import prepare

    monkeypatch.setattr(prepare, "check_zero3", guard.check_zero3)
    with pytest.raises(ConfigError, match="transformers#47254"):
        gradckpt.enable(model, "full", blocks=["0", "1"])
    assert gradckpt.applied_plan(model) is None
    assert not any("forward" in m.__dict__ for m in model.modules())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_zero3_trainer_two_processes(tmp_path: Path) -> None:
    pytest.importorskip(
        "deepspeed",
        reason="DeepSpeed is not installed (not pinned for make test); see this file's docstring",
    )
    pytest.importorskip("peft")
    pytest.importorskip("datasets")
    out = tmp_path / "result.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GRADCKPT_OUT": str(out),
        "GRADCKPT_WORKDIR": str(tmp_path / "w"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_free_port()), __file__,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    for kind in ("full-ft", "lora"):
        none, full = got[f"{kind}/none"], got[f"{kind}/full"]
        assert full["plans"] == ["full: 3 recompute"] and none["plans"] == []
        assert full["wrapped_by"] == "DeepSpeedEngine"
        held, total = full["shard_of"]
        assert held * 2 == total  # really partitioned: each of 2 ranks holds half
        assert full["losses"] == none["losses"], kind  # bit for bit
        ref = train(kind == "lora", "none", 1, False, str(tmp_path / f"one-{kind}"))
        assert torch.allclose(
            torch.tensor(full["losses"]), torch.tensor(ref["losses"]), rtol=1e-6, atol=0
        ), (kind, full["losses"], ref["losses"])


if __name__ == "__main__":
    worker()
