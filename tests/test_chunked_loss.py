"""The chunked loss head (``loss_head="chunked"``): same loss and gradients, no full logits.

Checks, on tiny random-weight Hugging Face models built from configs (fp32, CPU):
- loss and every gradient equal the unchunked model's within 1e-5 relative, for Llama, Qwen2,
  Gemma 2 (soft-capped logits), Mistral, GPT-2 and Mixtral (router aux loss on), with and
  without LoRA; ignore_index, num_items_in_batch and shift_labels as transformers computes them;
- ``outputs.logits`` is None while the head runs, the model's own logits without labels or
  under no_grad, and equal to them with ``keep_logits=True``;
- exact bytes (``gradckpt.measure``): the logits' bytes leave what forward holds for backward
  and the step's peak;
- disable restores the model; bad options are refused with PolicyError / ConfigError.

Run: ``PYTHONPATH=src python -m pytest -p no:xdist -q tests/test_chunked_loss.py``
"""

from __future__ import annotations

import pytest
import torch

import gradckpt
from gradckpt.runtime.chunked_loss import CHUNKED_RTOL, chunk_tokens, chunked_causal_lm_loss

transformers = pytest.importorskip("transformers")

VOCAB = 320
SEQ = 24


def _config(kind: str) -> object:
    common = dict(vocab_size=VOCAB, num_hidden_layers=2)
    if kind == "gpt2":
        return transformers.GPT2Config(
            n_embd=32,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    llama_like = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        **common,
    )
    if kind == "llama":
        return transformers.LlamaConfig(**llama_like)
    if kind == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if kind == "mistral":
        return transformers.MistralConfig(**llama_like)
    if kind == "gemma2":
        return transformers.Gemma2Config(
            head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=50.0, **llama_like
        )
    if kind == "mixtral":
        return transformers.MixtralConfig(
            num_local_experts=4,
            num_experts_per_tok=2,
            output_router_logits=True,
            router_aux_loss_coef=0.02,
            **llama_like,
        )
    raise AssertionError(kind)


ARCHS = ["llama", "qwen2", "gemma2", "mistral", "gpt2", "mixtral"]


def _model(kind: str, *, lora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind)).float()
    if kind == "gemma2":  # eager attention: sdpa does not soft-cap
        model.config._attn_implementation = "eager"
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
        )
        for n, p in model.named_parameters():  # non-zero B: adapters change the logits
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
    return model


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt, ignored
    labels[1, -3:] = -100  # padding
    return {"input_ids": ids, "labels": labels}


def _step(model: torch.nn.Module, **extra: object) -> tuple[object, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**_batch(), **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_close(ref: tuple, got: tuple) -> None:
    (ref_out, ref_g), (got_out, got_g) = ref, got
    torch.testing.assert_close(got_out.loss, ref_out.loss, rtol=CHUNKED_RTOL, atol=0)
    assert ref_g.keys() == got_g.keys() and ref_g
    for n, g in ref_g.items():
        err = (got_g[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)
        assert err <= CHUNKED_RTOL, f"{n}: relative error {err:.2e}"


@pytest.mark.parametrize("lora", [False, True], ids=["full-ft", "lora"])
@pytest.mark.parametrize("kind", ARCHS)
def test_loss_and_grads_match_unchunked(kind: str, lora: bool) -> None:
    model = _model(kind, lora=lora)
    ref = _step(model)
    gradckpt.enable(model, policy="full", loss_head="chunked", loss_chunk=7)  # 48 tokens: 7 chunks
    got = _step(model)
    assert got[0].logits is None
    _assert_close(ref, got)
    if kind == "mixtral":
        assert got[0].aux_loss is not None  # the router loss is part of both
    gradckpt.disable(model)
    again = _step(model)
    assert torch.equal(again[0].loss, ref[0].loss) and again[0].logits is not None


def test_num_items_in_batch_and_shift_labels() -> None:
    model = _model("llama")
    n = torch.tensor(29)
    batch = _batch()
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    ref = _step(model, num_items_in_batch=n)
    gradckpt.enable(model, policy="none", loss_head="chunked", loss_chunk=5)
    _assert_close(ref, _step(model, num_items_in_batch=n))
    # shift_labels given instead of labels (what sequence-parallel trainers pass)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], shift_labels=shift)
    torch.testing.assert_close(
        out.loss, ref[0].loss * 29 / (shift != -100).sum(), rtol=1e-5, atol=0
    )


def test_logits_none_kept_on_request_and_untouched_without_labels() -> None:
    model = _model("gemma2")
    batch = _batch()
    with torch.no_grad():
        ref_logits = model(**batch).logits
    gradckpt.enable(model, policy="full", loss_head="chunked", loss_chunk=10, keep_logits=True)
    out = model(**batch)
    assert out.logits is not None and not out.logits.requires_grad
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-6, atol=1e-6)
    gradckpt.enable(model, policy="full", loss_head="chunked", loss_chunk=10)
    out = model(**batch)
    assert out.logits is None and "logits" not in out and out.loss is not None
    with torch.no_grad():  # evaluation: the model's own head
        torch.testing.assert_close(model(**batch).logits, ref_logits, rtol=0, atol=0)
    no_labels = model(input_ids=batch["input_ids"])
    assert no_labels.loss is None and no_labels.logits.shape == (2, SEQ, VOCAB)


def test_logits_bytes_leave_the_peak() -> None:
    """Exact bytes: a 4,096-word vocabulary at 2 x 256 tokens, fp32 (logits = 8 MiB)."""
    vocab, seq = 4096, 256
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float()
    ids = torch.randint(0, vocab, (2, seq))
    logits_bytes = 2 * seq * vocab * 4

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    gradckpt.enable(model, policy="full")
    before = gradckpt.measure(step, model=model)
    model.zero_grad(set_to_none=True)
    gradckpt.enable(model, policy="full", loss_head="chunked", loss_chunk=64)
    after = gradckpt.measure(step, model=model)
    chunk_bytes = 64 * vocab * 4
    # Forward keeps the log-softmax of the logits (8 MiB) for backward without the head; with
    # it, only the chunk sums (the hidden states the chunks read are kept anyway).
    assert before.activation_bytes - after.activation_bytes >= logits_bytes - 64
    assert after.activation_bytes < logits_bytes // 16
    # The step's peak (above what existed before it) loses more than two logits' worth
    # (logits, log-softmax, their gradient), less one chunk's transients.
    assert before.baseline_bytes == after.baseline_bytes
    assert before.peak_bytes - after.peak_bytes >= 2 * logits_bytes - 4 * chunk_bytes
    # Extra work: one more lm_head forward (the chunks' recompute), nothing else.
    lm_head_flops = 2 * 2 * seq * 32 * vocab
    assert after.recompute_flops - before.recompute_flops == lm_head_flops


def test_plan_round_trip_and_summary() -> None:
    model = _model("llama")
    plan = gradckpt.enable(model, policy="full", loss_head="chunked", loss_chunk=8)
    assert plan.options["loss_head"] == "chunked" and "chunked loss head" in plan.summary()
    again = gradckpt.Plan.from_json(plan.to_json())
    assert again == plan
    gradckpt.disable(model)
    ref = _step(model)
    gradckpt.enable(model, plan=again)
    _assert_close(ref, _step(model))
    gradckpt.disable(model)
    assert "forward" not in model.__dict__


def test_bad_options_refused() -> None:
    model = _model("llama")
    with pytest.raises(gradckpt.PolicyError, match="loss_head must be 'chunked'"):
        gradckpt.enable(model, policy="full", loss_head="tiled")
    with pytest.raises(gradckpt.PolicyError, match="loss_chunk is a number of tokens"):
        gradckpt.enable(model, policy="full", loss_head="chunked", loss_chunk=0)
    with pytest.raises(gradckpt.PolicyError, match="need loss_head=.chunked."):
        gradckpt.enable(model, policy="full", loss_chunk=64)
    encoder = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    with pytest.raises(gradckpt.ConfigError, match="needs a causal language model"):
        gradckpt.enable(encoder, policy="full", loss_head="chunked")
    assert gradckpt.applied_plan(encoder) is None


def test_chunk_tokens_default_and_function_alone() -> None:
    assert chunk_tokens(128_256, {}) == 523  # 256 MiB of fp32 logits
    assert chunk_tokens(128_256, {"loss_chunk": 4096}) == 4096
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    h = torch.randn(3, 10, 8, requires_grad=True)
    y = torch.randint(0, 50, (3, 10))
    y[1, 4] = -100
    ref = transformers.loss.loss_utils.ForCausalLMLoss(head(h), y, 50)
    got, logits = chunked_causal_lm_loss(h, head, y, chunk=4)
    assert logits is None
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
