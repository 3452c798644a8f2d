"""XLM and Flaubert train exactly under every policy: their KV cache reaches blocks as ``cache=``.

XLM and Flaubert build an ``EncoderDecoderCache`` in every forward, training included, and hand
it to each attention block as ``cache=`` (transformers 5.24; a ``{"slen": n, layer: (k, v)}``
dict before 5). A checkpointed block that appends to it appends again when backward recomputes
it, and the second pass saw keys of twice the length: backward crashed under every policy.
The HF guard passes such blocks no cache while gradients are recorded (they get an empty one
anyway) and refuses a cache that already holds tokens. FSMT hands its cache to its decoder layers
as ``layer_state=`` and builds its causal mask only when ``use_cache`` is off, so its
``use_cache`` is left as it is and only the layers' ``layer_state`` is neutralised. FSMT hands its cache to its decoder layers
as ``layer_state=`` and builds its causal mask only when ``use_cache`` is off: its cache stays on. Loss and gradients are compared bit for
bit with no checkpointing (fp32, CPU, dropout on, same seed).

Run: PYTHONPATH=src .venv/bin/python -m pytest tests/test_hf_cache_kwargs.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradckpt
from conftest import grads_of, run_step

transformers = pytest.importorskip("transformers")

_CFG = {
    "vocab_size": 64,
    "emb_dim": 32,
    "n_layers": 3,
    "n_heads": 4,
    "max_position_embeddings": 32,
    "dropout": 0.1,
    "attention_dropout": 0.1,
}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "xlm":
        return transformers.XLMWithLMHeadModel(transformers.XLMConfig(**_CFG)).train()
    return transformers.FlaubertWithLMHeadModel(
        transformers.FlaubertConfig(**_CFG, layerdrop=0.0)
    ).train()


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def _without_block_caches(model: nn.Module, policy: str) -> list[object]:
    """Hooks giving the blocks ``policy`` checkpoints no cache, as gradckpt's HF guard does."""
    names = [n for n, _ in gradckpt.find_blocks(model)]
    plan = gradckpt.make_plan(policy, names)
    skip = {n for n, d in zip(plan.blocks, plan.decisions) if d is not gradckpt.Decision.SAVE}

    def drop(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "cache": None} if "cache" in kwargs else kwargs

    return [
        m.register_forward_pre_hook(drop, with_kwargs=True)
        for n, m in gradckpt.find_blocks(model)
        if n in skip
    ]


@pytest.mark.parametrize("kind", ["xlm", "flaubert"])
def test_every_policy_exact(kind: str) -> None:
    # The guard gives the blocks no cache (an empty one would be appended to twice). Without
    # it XLM attends over its keys as they are instead of the cache's contiguous copy of them:
    # the same values in another layout, which some CPUs' kernels round differently (AMD EPYC
    # with AVX-512: a few gradients differ in the last bit, 7e-9). So the bit-for-bit
    # reference is the same step with the blocks given no cache, and the model's own step
    # (empty caches) agrees to rounding.
    model = _model(kind)
    batch = _batch()
    own = run_step(model, batch)
    names = [n for n, _ in gradckpt.find_blocks(model)]
    assert names[0] == "transformer.attentions.0"  # the blocks that take cache=
    for policy in ["full", "every:2", "selective", "offload", "sqrt"]:
        hooks = _without_block_caches(model, policy)
        try:
            ref = run_step(model, batch)
        finally:
            for h in hooks:
                h.remove()  # type: ignore[attr-defined]
        gradckpt.enable(model, policy=policy)
        try:
            loss, grads = run_step(model, batch)
        finally:
            gradckpt.disable(model)
        assert torch.equal(loss, ref[0]), f"{kind}/{policy}: loss differs"
        torch.testing.assert_close(loss, own[0], rtol=1e-6, atol=0)
        for name, g in ref[1].items():
            got = grads[name]
            assert (g is None) == (got is None), f"{kind}/{policy}: {name}"
            assert g is None or torch.equal(g, got), f"{kind}/{policy}: {name} differs"
            if g is not None:
                torch.testing.assert_close(got, own[1][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["xlm", "flaubert"])
def test_sqrt_keeps_the_inputs_of_blocks_that_do_not_chain(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # XLM's blocks are its parallel lists attentions[i] and ffns[i], called in turn; no two of
    # one list chain. sqrt was refused at the first forward; now a segment ends where another
    # list's block runs, its next block is checkpointed from its own inputs (exact:
    # test_every_policy_exact), and a warning names the blocks.
    model = _model(kind)
    gradckpt.enable(model, policy="sqrt")
    try:
        with caplog.at_level("WARNING", logger="gradckpt"):
            run_step(model, _batch())
    finally:
        gradckpt.disable(model)
    assert any(
        "block 'transformer.ffns.0' ran between two blocks of the segment from "
        "'transformer.attentions.0'" in r.getMessage()
        for r in caplog.records
    )
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_prefilled_cache_given_as_cache_is_refused() -> None:
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.46.2: XLM's cache is a plain dict
        pytest.skip("transformers 4.x: the dict cache is test_dict_cache_of_transformers_4_is_read")
    model = _model("xlm")
    batch = _batch()
    cache = transformers.EncoderDecoderCache(
        transformers.DynamicCache(config=model.config),
        transformers.DynamicCache(config=model.config),
    )
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:, :4], cache=cache)
    assert cache.get_seq_length() == 4
    gradckpt.enable(model, policy="full")
    try:
        with pytest.raises(gradckpt.GradCkptError, match=r"holding 4 token\(s\) \(cache=...\)"):
            model(input_ids=batch["input_ids"], cache=cache)
    finally:
        gradckpt.disable(model)


def test_dict_cache_of_transformers_4_is_read() -> None:
    # XLM/Flaubert before transformers 5 kept {"slen": tokens, layer_id: (k, v)}; it was read
    # as empty, so a prefilled one was dropped silently instead of refused.
    from gradckpt.guards.hf import cached_tokens as _cached_tokens

    k = torch.zeros(1, 4, 3, 8)
    assert _cached_tokens({"slen": 3, 0: (k, k)}) == 3
    assert _cached_tokens({0: (k, k)}) == 3  # no "slen": the keys' length
    assert _cached_tokens({"slen": 0}) == 0
    assert _cached_tokens({}) == 0


def _fsmt(use_cache: bool) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.FSMTConfig(
        langs=["en", "de"],
        src_vocab_size=64,
        tgt_vocab_size=64,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
        dropout=0.1,
        pad_token_id=1,
        use_cache=use_cache,
    )
    return transformers.FSMTForConditionalGeneration(cfg).train()


@pytest.mark.parametrize("use_cache", [True, False])
def test_fsmt_keeps_its_use_cache_and_is_exact(
    use_cache: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # FSMTModel builds the decoder's causal mask only when use_cache is False. The guard turned
    # the cache off, so with the config's default use_cache=True every decoder gradient changed
    # (46 in the sweep, up to 3.4e-3) under every policy, with no error.
    model = _fsmt(use_cache)
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(4, 64, (2, 10), generator=g),
        "decoder_input_ids": torch.randint(4, 64, (2, 6), generator=g),
    }
    w = torch.randn(2, 6, 64, generator=g)

    def step() -> tuple[torch.Tensor, dict]:
        # No labels: with labels FSMT switches use_cache off itself (a loss of your own on the
        # logits is where the cache decided the mask).
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = (model(**batch).logits * w).mean()
        loss.backward()
        return loss.detach(), grads_of(model)

    ref = step()
    for policy in ["full", "sqrt", "selective"]:
        with caplog.at_level("WARNING", logger="gradckpt"):
            gradckpt.enable(model, policy=policy)
        try:
            loss, grads = step()
            assert model.config.use_cache is use_cache  # seen by the forward, restored after
        finally:
            gradckpt.disable(model)
        assert torch.equal(loss, ref[0]), f"fsmt/{policy}: loss differs"
        for name, g_ref in ref[1].items():
            got = grads[name]
            assert g_ref is None or torch.equal(g_ref, got), f"fsmt/{policy}: {name} differs"
    warned = [r.getMessage() for r in caplog.records if "FSMTModel builds" in r.getMessage()]
    assert bool(warned) is use_cache  # told only when the model trains without a causal mask
