"""Policy ``lean`` (offload + tiles + chunked loss head) and ``verify``'s tolerance for it.

Checks: ``lean`` makes OFFLOAD decisions with the chunked head and tiles; ``verify`` passes it
with the documented tolerance (``REORDER_RTOL`` of each tensor's largest value) and reports the
max abs/rel error, while plans that do not reorder sums stay bit-exact; ``lean`` on a model
without an lm_head keeps the model's loss; the CPU offload emulation moves the block inputs to
"host" memory under ``lean`` as under ``offload``.

Run: ``PYTHONPATH=src python -m pytest -p no:xdist -q tests/test_lean.py``
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradckpt
from gradckpt.runtime.offload import emulate_host_on_cpu
from gradckpt.verify import REORDER_RTOL

transformers = pytest.importorskip("transformers")


def _llama(vocab: int = 512) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).float()


def _batch(vocab: int = 512, seq: int = 48) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*OFFLOAD on a CPU-only run.*")


def test_lean_plan() -> None:
    assert "lean" in gradckpt.policy_names()
    plan = gradckpt.make_plan("lean", ["a", "b"])
    assert plan.decisions == (gradckpt.Decision.OFFLOAD,) * 2
    assert plan.options["loss_head"] == "chunked" and plan.options["tile_tokens"] == 4096
    model = _llama()
    plan = gradckpt.enable(model, policy="lean", loss_chunk=16, tile_tokens=32)
    assert plan.options["loss_chunk"] == 16 and plan.options["tile_tokens"] == 32
    assert plan.summary() == "lean: 3 offload, tiles of 32 tokens, chunked loss head"
    assert plan.options["tile_norms"] is True


def test_verify_lean_within_documented_tolerance() -> None:
    model = _llama()
    plan = gradckpt.make_plan("lean", [n for n, _ in gradckpt.find_blocks(model)])
    plan = gradckpt.Plan(
        plan.blocks,
        plan.decisions,
        policy="lean",
        options={**plan.options, "loss_chunk": 10, "tile_tokens": 20},
    )
    report = gradckpt.verify(model, _batch(), plan)
    assert report.passed, report.table()
    assert report.scale_rtol == REORDER_RTOL == 1e-5
    assert report.max_abs > 0 and all(g.max_rel <= REORDER_RTOL for g in report.groups)
    assert "reorders sums" in report.table()
    assert report.to_dict()["scale_rtol"] == REORDER_RTOL
    # The tolerance is what lets it pass: demanding bit-exactness fails it.
    strict = gradckpt.verify(model, _batch(), plan, scale_rtol=0.0)
    assert not strict.passed
    # Plans that do not reorder sums stay bit-exact.
    full = gradckpt.verify(model, _batch(), "full")
    assert full.passed and full.scale_rtol == 0.0 and full.max_abs == 0.0


def test_lean_on_a_model_without_lm_head() -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaModel(cfg).float()
    ids = torch.randint(0, 64, (1, 40))
    report = gradckpt.verify(model, {"input_ids": ids}, "lean")  # tiles of 4096: one tile
    assert report.passed and report.max_abs == 0.0


def test_lean_parks_block_inputs_in_host_memory() -> None:
    model = _llama()
    batch = _batch(seq=64)

    def step() -> None:
        model(**batch).loss.backward()

    with emulate_host_on_cpu():
        gradckpt.enable(model, policy="full")
        full = gradckpt.measure(step, model=model)
        model.zero_grad(set_to_none=True)
        gradckpt.enable(model, policy="lean", loss_chunk=16, tile_tokens=32, offload_min_bytes=0)
        lean = gradckpt.measure(step, model=model)
    block_input = 2 * 64 * 32 * 4  # batch x seq x hidden floats
    assert lean.host_activation_bytes >= 3 * block_input
    assert full.activation_bytes - lean.activation_bytes >= 3 * block_input
