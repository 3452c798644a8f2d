"""The estimator with the long-context decisions: offload leaves device memory, host bytes, link time.

Checks, on a tiny Llama config (fake tensors, no weights): ``offload`` keeps no block inputs on
the device (the offload code runs on the fake tensors) and reports them as ``host_bytes``,
exactly blocks x batch x seq x hidden x 2 bytes (bf16); ``lean`` has no logits at its peak and a
smaller backward transient than ``full``; ``host_budget`` below the host bytes makes a policy not
fit; ``max_positions`` lets a sequence past the config's limit be estimated; the link model.

Run: ``PYTHONPATH=src python -m pytest -p no:xdist -q tests/test_estimate_longctx.py``
"""

from __future__ import annotations

import pytest

import gradckpt
from gradckpt.estimate.gpus import GPU_PRESETS
from gradckpt.estimate.offload_cost import offload_cost

transformers = pytest.importorskip("transformers")

LAYERS, HIDDEN, SEQ = 3, 256, 8192  # lean's default loss chunk: 2,097 tokens of 32,000 words


def _config() -> object:
    return transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=HIDDEN,
        intermediate_size=1024,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )


def test_offload_and_lean_in_the_estimate() -> None:
    r = gradckpt.estimate(
        _config(),
        method="lora",
        seq=SEQ,
        policies=["full", "offload", "lean"],
        gpu="rtx-4090",
        full_depth=True,
    )
    full, off, lean = r.result("full"), r.result("offload"), r.result("lean")
    block_inputs = LAYERS * SEQ * HIDDEN * 2  # bf16 hidden states, one per block
    assert full.host_bytes == 0
    assert off.host_bytes == block_inputs == lean.host_bytes
    assert full.breakdown["activations"] - off.breakdown["activations"] == block_inputs
    assert off.peak_bytes < full.peak_bytes
    # no logits (2048 x 32000 in bf16 and fp32: > 300 MB) at lean's peak; what the category still
    # holds is the final norm's output and the chunk sums
    assert lean.breakdown["logits_loss"] * 20 < full.breakdown["logits_loss"]
    assert lean.breakdown["backward_transient"] < full.breakdown["backward_transient"]
    assert off.offload_s >= 0 and off.step_time_s >= full.step_time_s * 0.99
    assert any("leave device memory" in n for n in r.notes)

    tight = gradckpt.estimate(
        _config(),
        method="lora",
        seq=SEQ,
        policies=["offload"],
        gpu="rtx-4090",
        host_budget=block_inputs - 1,
    ).result("offload")
    assert tight.host_fits is False and tight.fits is False
    assert "host memory would run out" in tight.verdict("rtx-4090")


def test_max_positions_extends_the_context() -> None:
    with pytest.raises(gradckpt.ConfigError, match="max_positions"):
        gradckpt.estimate(_config(), method="lora", seq=2 * SEQ, policies=["full"])
    r = gradckpt.estimate(
        _config(), method="lora", seq=2 * SEQ, policies=["full"], max_positions=4 * SEQ
    )
    assert r.result("full").peak_bytes > 0
    assert any("context extended" in n for n in r.notes)


def test_link_model() -> None:
    gpu = GPU_PRESETS["rtx-4090"]
    assert gpu.host_link_gbs == 25.0 and GPU_PRESETS["h100"].host_link_gbs == 50.0
    one_way = 32 * 2**30 / 25e9
    hidden = offload_cost(32 * 2**30, 32, 10.0, 20.0, gpu)  # compute hides the copies
    assert hidden.exposed_s == pytest.approx(one_way / 32)  # but the first fetch
    assert hidden.copy_s == pytest.approx(2 * one_way)
    slow = offload_cost(32 * 2**30, 32, 0.5, 1.0, gpu)
    assert slow.exposed_s == pytest.approx((one_way - 0.5) + (one_way - 1.0) + one_way / 32)
    assert offload_cost(0, 32, 1.0, 1.0, gpu).exposed_s == 0.0


def test_loss_chunked_and_liger_use_the_chunked_head_under_every_policy() -> None:
    """``loss="chunked"``/``"liger"`` (``plan --loss``): full logits never exist, whatever the
    policy; the two have the same bytes, and the notes say how Liger is modelled."""
    kw = dict(method="lora", seq=SEQ, policies=["none", "full"], alternatives=False)
    plain = gradckpt.estimate(_config(), **kw)
    chunked = gradckpt.estimate(_config(), hf_loss="chunked", **kw)
    liger = gradckpt.estimate(_config(), hf_loss="liger", **kw)
    logits = SEQ * 32000 * 2  # bf16 logits of the whole sequence
    for policy in ("none", "full"):
        p, c, g = plain.result(policy), chunked.result(policy), liger.result(policy)
        assert "chunked loss head" in c.plan and "chunked loss head" not in p.plan
        assert p.peak_bytes - c.peak_bytes >= logits
        assert c.peak_bytes == g.peak_bytes
        assert c.recompute_flops > p.recompute_flops  # one more lm_head forward
    assert any("Liger-Kernel" in n for n in liger.notes)
    assert not any("Liger-Kernel" in n for n in chunked.notes)
    with pytest.raises(gradckpt.ConfigError, match="hf_loss"):
        gradckpt.estimate(_config(), hf_loss="fused", **kw)


def test_auto_adds_the_chunked_head_and_may_offload() -> None:
    """``auto`` on a GPU that no per-block plan fits (the logits alone are over it): the planner
    adds the chunked loss head and the plan fits. On the fake model (a CUDA device's stand-in)
    OFFLOAD is offered and its block keeps nothing on the device: its input is in host memory."""
    import torch

    from gradckpt.estimate import fake_model
    from gradckpt.estimate.training import TrainingSetup
    from gradckpt.planner.api import profile_model
    from gradckpt.plans import Decision

    kw = dict(method="lora", seq=SEQ, alternatives=False)
    r = gradckpt.estimate(_config(), policies=["full", "lean"], **kw)
    full, lean = r.result("full"), r.result("lean")
    gpu = f"{(full.peak_bytes + lean.peak_bytes) / 2e9:.3f}GB"
    auto = gradckpt.estimate(_config(), policies=["auto"], gpu=gpu, **kw).result("auto")
    assert "chunked loss head" in auto.plan and auto.fits
    assert full.peak_bytes > auto.peak_bytes

    st = TrainingSetup(method="lora", seq=SEQ)
    sess = fake_model.get_session(_config(), st, LAYERS, None)
    with sess.mode:
        ids = torch.randint(0, sess.vocab, (1, SEQ))
    with sess.mode, torch.autocast("cpu", dtype=torch.bfloat16):
        prof = profile_model(
            sess.model,
            {"input_ids": ids, "labels": ids},
            blocks=sess.blocks,
            decisions=list(Decision),
        )
    for opts in prof.options:
        assert opts[Decision.OFFLOAD].kept == 0 < opts[Decision.RECOMPUTE].kept
