"""Architecture sweep: every policy on tiny random transformers models, against no checkpointing.

For each architecture in ``ARCHS`` (decoders, encoders, encoder-decoders, MoE, SSM/hybrids,
vision, speech; built from its config class with tiny sizes and random weights, no download)
and each policy in ``gradckpt.policy_names()`` (``every:K`` as ``every:2``):

1. A pristine model is built once (seed 0, train mode, every dropout at 0.1 and every LayerDrop
   at 0.3, so the recompute must replay the same random draws). Two independent copies run the
   reference step without gradckpt; if they disagree the architecture is non-deterministic on
   this machine and its cases are skipped, so no FAIL below is noise.
2. A fresh copy gets ``gradckpt.enable(copy, policy=...)`` and runs the same step (same seeds
   for torch, numpy and random). The loss is a fixed random projection of *every* floating
   output tensor that requires grad (logits, hidden states, router logits...), so a wrong
   gradient anywhere reaches some parameter. Loss, every parameter's gradient and every buffer
   (BatchNorm running statistics) must be bit-identical (``torch.equal``) to the reference;
   ``state_dict`` keys must not change.
3. ``gradckpt.disable`` must restore the model: no forward override left on any module, and a
   second step (seed 1) bit-identical to the reference's second step.
4. Per architecture, ``find_blocks`` is compared with transformers' own checkpointable layers:
   the outermost modules that are ``transformers.modeling_layers.GradientCheckpointingLayer``
   instances (where the model has any).

Outcomes per case: ``pass``; ``refusal`` (a ``gradckpt`` error whose message names a block:
documented, loud); ``refusal-unclear`` (a gradckpt error that names no block); ``FAIL`` (a
difference: which parameter and the max abs diff, or what else differed); ``crash`` (any other
exception, with the phase it was raised in); ``skip`` (the reference itself is not
deterministic).

Run: PYTHONPATH=src .venv/bin/python benchmarks/arch_sweep.py           (whole sweep, ~2-4 min, 1 core)
     PYTHONPATH=src .venv/bin/python benchmarks/arch_sweep.py --only gpt2,t5 --no-write
Writes benchmarks/results/arch-sweep-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import inspect
import io
import json
import os
import platform
import random
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# MKL's results must not depend on memory alignment (on AMD EPYC with AVX-512 a recomputed
# matmul otherwise differs in the last bit): set before torch's first computation
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import numpy as np
import torch
from torch import nn

import gradckpt
from gradckpt.errors import GradCkptError

RESULTS = Path(__file__).resolve().parent / "results"

# Generic tiny sizes, given by their generic names (transformers maps them through each config's
# attribute_map: hidden_size -> n_embd for GPT-2) and passed only where the config class has the
# field. Sizes follow transformers' own model testers (hidden 32, 4 heads, vocab 99); 4 layers
# so that ``every:2`` and ``sqrt`` (2 segments of 2 blocks) differ from ``full``.
TEXT: dict[str, Any] = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    head_dim=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    num_labels=3,
)
ENCDEC: dict[str, Any] = dict(
    TEXT,
    d_model=32,
    encoder_layers=4,
    decoder_layers=4,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    decoder_start_token_id=2,
    # T5 family
    d_kv=8,
    d_ff=64,
    num_layers=4,
    num_decoder_layers=4,
    num_heads=4,
)
MOE: dict[str, Any] = dict(
    TEXT,
    num_local_experts=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    output_router_logits=True,
)
VISION: dict[str, Any] = dict(
    image_size=32,
    patch_size=4,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    num_labels=3,
)
# wav2vec2-style feature encoders: 3 convs of stride 4 turn 1024 samples into 14 frames.
SPEECH: dict[str, Any] = dict(
    vocab_size=32,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    conv_dim=(16, 16, 16),
    conv_stride=(4, 4, 4),
    conv_kernel=(8, 8, 8),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    mask_time_length=2,
    mask_feature_length=2,
    pad_token_id=0,
)

BATCH = 2
SEQ = 16
DEC_SEQ = 8
AUDIO_SAMPLES = 1024
DROPOUT = 0.1
LAYERDROP = 0.3


@dataclass(frozen=True)
class Arch:
    """One architecture: a transformers model class and the config overrides that make it tiny.

    Attributes:
        name: short label (the model type, or a variant of it).
        family: decoder, encoder, encdec, moe, ssm, vision or speech.
        model_class: name of the ``transformers`` class to build (its ``config_class`` is used).
        config: config fields, on top of the family's generic tiny sizes.
        base: the family's generic sizes (``TEXT``, ``VISION``...).
        seq: input length in tokens (or input frames for ``input_features``).
        inputs: extra inputs (name -> ``(shape, low, high)`` integer tensors), e.g. LayoutLMv3's bbox.
        mask: pass an ``attention_mask`` with padding (where the forward takes one).
        dropout: dropout probability, when the family default cannot be used (the reason in
            ``note``).
        note: why this architecture deviates from the defaults.
    """

    name: str
    family: str
    model_class: str
    config: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    seq: int = SEQ
    inputs: dict[str, tuple[tuple[int, ...], int, int]] = field(default_factory=dict)
    mask: bool = True
    dropout: float = DROPOUT
    note: str = ""


def _a(name: str, family: str, model_class: str, base: dict[str, Any], **config: Any) -> Arch:
    seq = config.pop("_seq", SEQ)
    inputs = config.pop("_inputs", {})
    mask = config.pop("_mask", True)
    dropout = config.pop("_dropout", DROPOUT)
    note = config.pop("_note", "")
    return Arch(name, family, model_class, config, base, seq, inputs, mask, dropout, note)


ARCHS: tuple[Arch, ...] = (
    # -- decoders ------------------------------------------------------------------------------
    _a("gpt2", "decoder", "GPT2LMHeadModel", TEXT),
    _a(
        "gpt_neo",
        "decoder",
        "GPTNeoForCausalLM",
        TEXT,
        attention_types=[[["global", "local"], 2]],
        window_size=8,
    ),
    _a("gptj", "decoder", "GPTJForCausalLM", TEXT, rotary_dim=4),
    _a("gpt_neox", "decoder", "GPTNeoXForCausalLM", TEXT),
    _a("llama", "decoder", "LlamaForCausalLM", TEXT),
    _a("mistral", "decoder", "MistralForCausalLM", TEXT, sliding_window=8),
    _a("qwen2", "decoder", "Qwen2ForCausalLM", TEXT),
    _a("qwen3", "decoder", "Qwen3ForCausalLM", TEXT),
    _a("gemma", "decoder", "GemmaForCausalLM", TEXT),
    _a("gemma2", "decoder", "Gemma2ForCausalLM", TEXT, sliding_window=8),
    _a("gemma3", "decoder", "Gemma3ForCausalLM", TEXT, sliding_window=8),
    _a("phi", "decoder", "PhiForCausalLM", TEXT),
    _a("phi3", "decoder", "Phi3ForCausalLM", TEXT),
    _a("falcon", "decoder", "FalconForCausalLM", TEXT),
    _a("bloom", "decoder", "BloomForCausalLM", TEXT),
    _a("opt", "decoder", "OPTForCausalLM", TEXT, ffn_dim=64, word_embed_proj_dim=32),
    _a("codegen", "decoder", "CodeGenForCausalLM", TEXT, n_ctx=64, rotary_dim=4),
    _a("stablelm", "decoder", "StableLmForCausalLM", TEXT),
    _a("olmo", "decoder", "OlmoForCausalLM", TEXT),
    _a("olmo2", "decoder", "Olmo2ForCausalLM", TEXT),
    _a("cohere", "decoder", "CohereForCausalLM", TEXT),
    _a("starcoder2", "decoder", "Starcoder2ForCausalLM", TEXT),
    _a(
        "mpt",
        "decoder",
        "MptForCausalLM",
        TEXT,
        d_model=32,
        n_heads=4,
        n_layers=4,
        expansion_ratio=2,
        max_seq_len=64,
    ),
    _a(
        "xglm",
        "decoder",
        "XGLMForCausalLM",
        TEXT,
        d_model=32,
        num_layers=4,
        attention_heads=4,
        ffn_dim=64,
    ),
    _a("biogpt", "decoder", "BioGptForCausalLM", TEXT),
    _a("persimmon", "decoder", "PersimmonForCausalLM", TEXT),
    _a("granite", "decoder", "GraniteForCausalLM", TEXT),
    _a("helium", "decoder", "HeliumForCausalLM", TEXT),
    _a("glm", "decoder", "GlmForCausalLM", TEXT),
    _a("xlnet", "decoder", "XLNetLMHeadModel", TEXT, d_model=32, n_layer=4, n_head=4, d_inner=64),
    _a("ctrl", "decoder", "CTRLLMHeadModel", TEXT, dff=64),
    _a(
        "reformer",
        "decoder",
        "ReformerModelWithLMHead",
        TEXT,
        attn_layers=["local", "lsh", "local", "lsh"],
        axial_pos_shape=(4, 4),
        axial_pos_embds_dim=(16, 16),
        attention_head_size=8,
        feed_forward_size=64,
        local_attn_chunk_length=4,
        lsh_attn_chunk_length=4,
        num_buckets=2,
        num_hashes=1,
        max_position_embeddings=16,
        is_decoder=True,
        hash_seed=0,
        _dropout=0.0,
        _note="dropout 0: in training each Reformer layer reseeds torch's RNG from OS entropy "
        "(torch.seed()), so no two runs agree with dropout on, with or without gradckpt",
        local_num_chunks_before=1,
        lsh_num_chunks_before=1,
        local_num_chunks_after=0,
        lsh_num_chunks_after=0,
    ),
    # -- encoders ------------------------------------------------------------------------------
    _a("bert", "encoder", "BertForMaskedLM", TEXT),
    _a("roberta", "encoder", "RobertaForMaskedLM", TEXT, pad_token_id=1),
    _a("distilbert", "encoder", "DistilBertForMaskedLM", TEXT, dim=32, n_layers=4, hidden_dim=64),
    _a("albert", "encoder", "AlbertForMaskedLM", TEXT, embedding_size=16),
    _a("electra", "encoder", "ElectraForMaskedLM", TEXT, embedding_size=32),
    _a("deberta", "encoder", "DebertaForMaskedLM", TEXT, relative_attention=True),
    _a("deberta_v2", "encoder", "DebertaV2ForMaskedLM", TEXT, position_buckets=8),
    _a("xlm_roberta", "encoder", "XLMRobertaForMaskedLM", TEXT, pad_token_id=1),
    _a("mpnet", "encoder", "MPNetForMaskedLM", TEXT, pad_token_id=1),
    _a(
        "funnel",
        "encoder",
        "FunnelForMaskedLM",
        TEXT,
        block_sizes=[1, 1, 2],
        num_decoder_layers=1,
        d_model=32,
        n_head=4,
        d_head=8,
        d_inner=64,
    ),
    _a(
        "big_bird",
        "encoder",
        "BigBirdForMaskedLM",
        TEXT,
        attention_type="block_sparse",
        block_size=2,
        num_random_blocks=1,
        _note="block-sparse attention: 16 tokens > (5 + 2 * 1 random block) * block size 2",
    ),
    _a(
        "nystromformer",
        "encoder",
        "NystromformerForMaskedLM",
        TEXT,
        segment_means_seq_len=SEQ,
        num_landmarks=4,
        _mask=False,
        _note="no attention_mask: its landmark attention (num_landmarks < seq) cannot take one",
    ),
    _a(
        "layoutlmv3",
        "encoder",
        "LayoutLMv3ForSequenceClassification",
        TEXT,
        hidden_size=36,
        coordinate_size=6,
        shape_size=6,
        input_size=32,
        patch_size=4,
        pad_token_id=1,
        _inputs={"bbox": ((BATCH, SEQ, 4), 0, 500)},
    ),
    _a("convbert", "encoder", "ConvBertForMaskedLM", TEXT, embedding_size=32, conv_kernel_size=3),
    _a("squeezebert", "encoder", "SqueezeBertForMaskedLM", TEXT, embedding_size=32),
    _a("roformer", "encoder", "RoFormerForMaskedLM", TEXT, embedding_size=32),
    _a("ernie", "encoder", "ErnieForMaskedLM", TEXT),
    _a("xlm", "encoder", "XLMWithLMHeadModel", TEXT, emb_dim=32, n_layers=4, n_heads=4),
    _a("flaubert", "encoder", "FlaubertWithLMHeadModel", TEXT, emb_dim=32, n_layers=4, n_heads=4),
    _a("megatron_bert", "encoder", "MegatronBertForMaskedLM", TEXT),
    _a("esm", "encoder", "EsmForMaskedLM", TEXT, pad_token_id=1, mask_token_id=3),
    _a(
        "mobilebert",
        "encoder",
        "MobileBertForMaskedLM",
        TEXT,
        embedding_size=32,
        intra_bottleneck_size=32,
        true_hidden_size=32,
        num_feedforward_networks=2,
    ),
    _a(
        "rembert",
        "encoder",
        "RemBertForMaskedLM",
        TEXT,
        input_embedding_size=16,
        output_embedding_size=16,
    ),
    _a(
        "modernbert",
        "encoder",
        "ModernBertForMaskedLM",
        TEXT,
        global_attn_every_n_layers=2,
        local_attention=8,
    ),
    _a("longformer", "encoder", "LongformerForMaskedLM", TEXT, attention_window=4, pad_token_id=1),
    # -- encoder-decoders ----------------------------------------------------------------------
    _a("t5", "encdec", "T5ForConditionalGeneration", ENCDEC),
    _a("mt5", "encdec", "MT5ForConditionalGeneration", ENCDEC),
    _a("umt5", "encdec", "UMT5ForConditionalGeneration", ENCDEC),
    _a("longt5", "encdec", "LongT5ForConditionalGeneration", ENCDEC, local_radius=4),
    _a("bart", "encdec", "BartForConditionalGeneration", ENCDEC),
    _a("mbart", "encdec", "MBartForConditionalGeneration", ENCDEC),
    _a("pegasus", "encdec", "PegasusForConditionalGeneration", ENCDEC),
    _a("marian", "encdec", "MarianMTModel", ENCDEC, decoder_start_token_id=0),
    _a("blenderbot", "encdec", "BlenderbotForConditionalGeneration", ENCDEC),
    _a("blenderbot_small", "encdec", "BlenderbotSmallForConditionalGeneration", ENCDEC),
    _a("plbart", "encdec", "PLBartForConditionalGeneration", ENCDEC),
    _a("m2m_100", "encdec", "M2M100ForConditionalGeneration", ENCDEC),
    _a(
        "led",
        "encdec",
        "LEDForConditionalGeneration",
        ENCDEC,
        attention_window=4,
        max_encoder_position_embeddings=64,
        max_decoder_position_embeddings=64,
    ),
    _a(
        "prophetnet",
        "encdec",
        "ProphetNetForConditionalGeneration",
        ENCDEC,
        hidden_size=32,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_encoder_layers=4,
        num_decoder_layers=4,
        num_encoder_attention_heads=4,
        num_decoder_attention_heads=4,
        ngram=2,
        num_buckets=32,
        relative_max_distance=64,
    ),
    _a(
        "fsmt",
        "encdec",
        "FSMTForConditionalGeneration",
        ENCDEC,
        src_vocab_size=99,
        tgt_vocab_size=99,
        langs=["en", "de"],
    ),
    _a(
        "bigbird_pegasus",
        "encdec",
        "BigBirdPegasusForConditionalGeneration",
        ENCDEC,
        attention_type="original_full",
    ),
    # -- mixture of experts ----------------------------------------------------------------------
    _a("mixtral", "moe", "MixtralForCausalLM", MOE),
    _a(
        "qwen2_moe",
        "moe",
        "Qwen2MoeForCausalLM",
        MOE,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
    ),
    _a("qwen3_moe", "moe", "Qwen3MoeForCausalLM", MOE, decoder_sparse_step=1),
    _a("gpt_oss", "moe", "GptOssForCausalLM", MOE, sliding_window=8),
    _a(
        "llama4",
        "moe",
        "Llama4ForCausalLM",
        MOE,
        intermediate_size_mlp=64,
        interleave_moe_layer_step=2,
        num_experts_per_tok=1,
    ),
    _a(
        "dbrx",
        "moe",
        "DbrxForCausalLM",
        MOE,
        d_model=32,
        n_heads=4,
        n_layers=4,
        max_seq_len=64,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
    ),
    _a("olmoe", "moe", "OlmoeForCausalLM", MOE),
    _a(
        "deepseek_v2",
        "moe",
        "DeepseekV2ForCausalLM",
        MOE,
        n_routed_experts=4,
        n_shared_experts=1,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        first_k_dense_replace=1,
        topk_group=1,
        n_group=1,
    ),
    _a(
        "deepseek_v3",
        "moe",
        "DeepseekV3ForCausalLM",
        MOE,
        n_routed_experts=4,
        n_shared_experts=1,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        first_k_dense_replace=1,
        topk_group=1,
        n_group=1,
    ),
    _a("granitemoe", "moe", "GraniteMoeForCausalLM", MOE),
    _a("jetmoe", "moe", "JetMoeForCausalLM", MOE, kv_channels=8),
    _a("phimoe", "moe", "PhimoeForCausalLM", MOE),
    _a(
        "switch_transformers",
        "moe",
        "SwitchTransformersForConditionalGeneration",
        ENCDEC,
        num_experts=4,
        expert_capacity=8,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        output_router_logits=True,
    ),
    _a(
        "nllb_moe",
        "moe",
        "NllbMoeForConditionalGeneration",
        ENCDEC,
        num_experts=4,
        expert_capacity=8,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        output_router_logits=True,
    ),
    # -- state-space models and hybrids ------------------------------------------------------------
    _a("mamba", "ssm", "MambaForCausalLM", TEXT, state_size=8, time_step_rank=4, use_mambapy=False),
    _a(
        "mamba2",
        "ssm",
        "Mamba2ForCausalLM",
        TEXT,
        num_heads=8,
        head_dim=8,
        n_groups=1,
        state_size=8,
        chunk_size=8,
        expand=2,
    ),
    _a("falcon_mamba", "ssm", "FalconMambaForCausalLM", TEXT, state_size=8, time_step_rank=4),
    _a(
        "jamba",
        "ssm",
        "JambaForCausalLM",
        MOE,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    ),
    _a(
        "zamba",
        "ssm",
        "ZambaForCausalLM",
        TEXT,
        num_hidden_layers=5,  # 2 hybrid layers (layers 2 and 4) share one transformer
        attn_hidden_size=64,
        mamba_d_state=8,
        n_mamba_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        use_mamba_kernels=False,
    ),
    _a(
        "zamba2",
        "ssm",
        "Zamba2ForCausalLM",
        TEXT,
        mamba_d_state=8,
        mamba_headdim=8,
        n_mamba_heads=8,
        layer_types=["mamba", "hybrid", "mamba", "hybrid"],
        hybrid_layer_ids=[1, 3],
        use_mem_rope=False,
        use_mamba_kernels=False,
        chunk_size=8,
    ),
    _a(
        "bamba",
        "ssm",
        "BambaForCausalLM",
        TEXT,
        mamba_d_state=8,
        mamba_d_head=8,
        mamba_n_heads=8,
        mamba_chunk_size=8,
        attn_layer_indices=[1, 3],
        use_mamba_kernels=False,
    ),
    _a(
        "falcon_h1",
        "ssm",
        "FalconH1ForCausalLM",
        TEXT,
        mamba_d_state=8,
        mamba_d_head=8,
        mamba_n_heads=8,
        mamba_chunk_size=8,
        mamba_d_ssm=64,
    ),
    _a(
        "recurrent_gemma",
        "ssm",
        "RecurrentGemmaForCausalLM",
        TEXT,
        lru_width=32,
        attention_window_size=8,
        block_types=["recurrent", "attention"],
    ),
    _a("rwkv", "ssm", "RwkvForCausalLM", TEXT, attention_hidden_size=32, context_length=64),
    _a(
        "granitemoehybrid",
        "ssm",
        "GraniteMoeHybridForCausalLM",
        MOE,
        layer_types=["mamba", "attention", "mamba", "attention"],
        mamba_d_state=8,
        mamba_d_head=8,
        mamba_n_heads=8,
        mamba_chunk_size=8,
        shared_intermediate_size=32,
    ),
    _a("lfm2", "ssm", "Lfm2ForCausalLM", TEXT, full_attn_idxs=[1, 3]),
    # -- vision --------------------------------------------------------------------------------------
    _a("vit", "vision", "ViTForImageClassification", VISION),
    _a("deit", "vision", "DeiTForImageClassification", VISION),
    _a(
        "beit",
        "vision",
        "BeitForImageClassification",
        VISION,
        use_relative_position_bias=True,
        use_mean_pooling=True,
    ),
    _a(
        "data2vec_vision",
        "vision",
        "Data2VecVisionForImageClassification",
        VISION,
        use_relative_position_bias=True,
    ),
    _a("dinov2", "vision", "Dinov2ForImageClassification", VISION),
    _a(
        "swin",
        "vision",
        "SwinForImageClassification",
        VISION,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=2,
        patch_size=2,
    ),
    _a(
        "swinv2",
        "vision",
        "Swinv2ForImageClassification",
        VISION,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=2,
        patch_size=2,
    ),
    _a(
        "convnext",
        "vision",
        "ConvNextForImageClassification",
        VISION,
        hidden_sizes=[8, 16, 32, 64],
        depths=[1, 1, 2, 1],
    ),
    _a(
        "convnextv2",
        "vision",
        "ConvNextV2ForImageClassification",
        VISION,
        hidden_sizes=[8, 16, 32, 64],
        depths=[1, 1, 2, 1],
    ),
    _a(
        "resnet",
        "vision",
        "ResNetForImageClassification",
        VISION,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[2, 2],
        layer_type="basic",
    ),
    _a(
        "regnet",
        "vision",
        "RegNetForImageClassification",
        VISION,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[2, 2],
        groups_width=8,
    ),
    _a(
        "poolformer",
        "vision",
        "PoolFormerForImageClassification",
        VISION,
        hidden_sizes=[16, 32, 32, 64],
        depths=[1, 1, 2, 1],
    ),
    _a(
        "focalnet",
        "vision",
        "FocalNetForImageClassification",
        VISION,
        embed_dim=16,
        depths=[1, 2],
        hidden_sizes=[16, 32],
        patch_size=2,
    ),
    _a(
        "segformer",
        "vision",
        "SegformerForImageClassification",
        VISION,
        num_encoder_blocks=2,
        depths=[2, 2],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        num_attention_heads=[1, 2],
        downsampling_rates=[1, 4],
        patch_sizes=[7, 3],
        strides=[4, 2],
    ),
    _a(
        "pvt",
        "vision",
        "PvtForImageClassification",
        VISION,
        num_encoder_blocks=2,
        depths=[2, 2],
        sequence_reduction_ratios=[2, 1],
        hidden_sizes=[16, 32],
        num_attention_heads=[1, 2],
        patch_sizes=[4, 2],
        strides=[4, 2],
        mlp_ratios=[2, 2],
    ),
    _a(
        "cvt",
        "vision",
        "CvtForImageClassification",
        VISION,
        embed_dim=[16, 32],
        num_heads=[1, 2],
        depth=[1, 2],
        patch_sizes=[7, 3],
        patch_stride=[4, 2],
        patch_padding=[2, 1],
        stride_kv=[2, 2],
        cls_token=[False, True],
        mlp_ratio=[2.0, 2.0],
        attention_drop_rate=[0.0, 0.0],
        drop_rate=[0.0, 0.0],
        drop_path_rate=[0.0, 0.1],
        qkv_bias=[True, True],
        padding_kv=[1, 1],
        padding_q=[1, 1],
        stride_q=[1, 1],
        kernel_qkv=[3, 3],
        qkv_projection_method=["dw_bn", "dw_bn"],
    ),
    # -- speech ----------------------------------------------------------------------------------------
    _a("wav2vec2", "speech", "Wav2Vec2ForCTC", SPEECH),
    _a("hubert", "speech", "HubertForCTC", SPEECH),
    _a("wavlm", "speech", "WavLMForCTC", SPEECH, num_buckets=32, max_bucket_distance=64),
    _a("data2vec_audio", "speech", "Data2VecAudioForCTC", SPEECH),
    _a("unispeech", "speech", "UniSpeechForCTC", SPEECH),
    _a("unispeech_sat", "speech", "UniSpeechSatForCTC", SPEECH),
    _a(
        "wav2vec2_conformer",
        "speech",
        "Wav2Vec2ConformerForCTC",
        SPEECH,
        conv_depthwise_kernel_size=3,
        position_embeddings_type="relative",
    ),
    _a("sew", "speech", "SEWForCTC", SPEECH, squeeze_factor=2),
    _a("sew_d", "speech", "SEWDForCTC", SPEECH, squeeze_factor=2, position_buckets=8),
    _a(
        "whisper",
        "speech",
        "WhisperForConditionalGeneration",
        ENCDEC,
        num_mel_bins=16,
        max_source_positions=8,
        max_target_positions=32,
        _seq=16,
    ),
    _a(
        "speech_to_text",
        "speech",
        "Speech2TextForConditionalGeneration",
        ENCDEC,
        input_feat_per_channel=16,
        input_channels=1,
        conv_channels=16,
        conv_kernel_sizes=[5, 5],
        num_conv_layers=2,
        max_source_positions=64,
        max_target_positions=64,
    ),
)

ARCH_BY_NAME = {a.name: a for a in ARCHS}


def sweep_policies() -> list[str]:
    """Every registered policy, with ``every:K`` as ``every:2``."""
    return [p.replace(":K", ":2") for p in gradckpt.policy_names(exact=True)]


# -- building ------------------------------------------------------------------------------------


def _config_fields(cls: type) -> set[str]:
    names: set[str] = set()
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    names |= set(inspect.signature(cls.__init__).parameters)
    names |= set(getattr(cls, "attribute_map", {}))
    return names


def _set_dropouts(config: Any, dropout: float = DROPOUT) -> dict[str, float]:
    """Every dropout probability to ``dropout`` and every LayerDrop to ``LAYERDROP``."""
    changed: dict[str, float] = {}
    for key, value in list(config.to_dict().items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        k = key.lower()
        if "layerdrop" in k or k == "layer_drop":
            new = LAYERDROP
        elif "dropout" in k or "pdrop" in k or k.endswith("drop_rate") or "drop_path" in k:
            new = dropout
        else:
            continue
        setattr(config, key, new)
        changed[key] = new
    return changed


def build_config(arch: Arch) -> Any:
    import transformers

    model_cls = getattr(transformers, arch.model_class)
    cfg_cls = model_cls.config_class
    accepted = _config_fields(cfg_cls)
    amap = getattr(cfg_cls, "attribute_map", {})
    # a generic size is dropped where the architecture sets the field it maps to (Swin's
    # num_heads list, not the generic num_attention_heads=4)
    kwargs = {
        k: v
        for k, v in arch.base.items()
        if k in accepted and k not in arch.config and amap.get(k) not in arch.config
    }
    kwargs.update(arch.config)
    config = cfg_cls(**kwargs)
    _set_dropouts(config, arch.dropout)
    # use_cache stays the config's default: a user's training run has it on, and gradckpt's HF
    # guard is what must keep a KV cache out of checkpointed layers.
    if hasattr(config, "output_hidden_states"):
        config.output_hidden_states = True
    return config


def build_model(arch: Arch) -> nn.Module:
    """The architecture's model with random weights (seed 0), in train mode, fp32."""
    import transformers

    config = build_config(arch)
    torch.manual_seed(0)
    model = getattr(transformers, arch.model_class)(config)
    return model.float().train()


def make_inputs(arch: Arch, model: nn.Module) -> dict[str, Any]:
    """Generic inputs: what ``main_input_name`` says, an attention mask with padding, decoder ids."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    main = getattr(model, "main_input_name", "input_ids")
    params = inspect.signature(model.forward).parameters
    vocab = int(getattr(cfg, "vocab_size", None) or getattr(cfg, "src_vocab_size", 99))
    inputs: dict[str, Any] = {}
    if main == "input_ids":
        inputs["input_ids"] = torch.randint(3, vocab, (BATCH, arch.seq), generator=g)
        if arch.mask and "attention_mask" in params:
            mask = torch.ones(BATCH, arch.seq, dtype=torch.long)
            mask[1, -3:] = 0  # right padding in the second row
            inputs["attention_mask"] = mask
    elif main == "pixel_values":
        size = int(getattr(cfg, "image_size", 32))
        channels = int(getattr(cfg, "num_channels", 3))
        inputs["pixel_values"] = torch.randn(BATCH, channels, size, size, generator=g)
    elif main == "input_values":
        inputs["input_values"] = torch.randn(BATCH, AUDIO_SAMPLES, generator=g)
    elif main == "input_features":
        if hasattr(cfg, "num_mel_bins"):  # Whisper: (batch, mel bins, 2 * source positions)
            shape: tuple[int, ...] = (BATCH, cfg.num_mel_bins, 2 * cfg.max_source_positions)
        else:  # Speech2Text: (batch, frames, features)
            shape = (BATCH, arch.seq * 2, cfg.input_feat_per_channel * cfg.input_channels)
        inputs["input_features"] = torch.randn(*shape, generator=g)
    else:
        raise ValueError(f"{arch.name}: no input recipe for main_input_name {main!r}")
    for name, (shp, low, high) in arch.inputs.items():
        t = torch.randint(low, high, shp, generator=g)
        if name == "bbox":  # boxes need x0 <= x1 and y0 <= y1
            t = torch.stack(
                [
                    torch.minimum(t[..., 0], t[..., 2]),
                    torch.minimum(t[..., 1], t[..., 3]),
                    torch.maximum(t[..., 0], t[..., 2]),
                    torch.maximum(t[..., 1], t[..., 3]),
                ],
                dim=-1,
            )
        inputs[name] = t
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        dec_vocab = int(getattr(cfg, "tgt_vocab_size", None) or vocab)
        inputs["decoder_input_ids"] = torch.randint(3, dec_vocab, (BATCH, DEC_SEQ), generator=g)
    return inputs


# -- one step ----------------------------------------------------------------------------------------


def grad_tensors(out: Any) -> list[torch.Tensor]:
    """Every floating tensor in a model output that requires grad, in a fixed traversal order."""
    found: list[torch.Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and x.requires_grad:
                found.append(x)
        elif isinstance(x, dict):  # ModelOutput is an OrderedDict
            for k, v in x.items():
                # The KV cache is no result of the step, and gradckpt turns it off: transformers
                # 4.x (4.46) returns it as tensors that would enter the loss of the reference only.
                if k != "past_key_values":
                    walk(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)

    walk(out)
    return found


def loss_of(out: Any) -> torch.Tensor:
    """A fixed random projection of every output tensor requiring grad.

    A plain sum would give every element the same upstream gradient, under which the gradient
    through a softmax or a normalisation is ~0 and a wrong recompute could hide.
    """
    tensors = grad_tensors(out)
    if not tensors:
        raise RuntimeError("the model returned no tensor that requires grad")
    total = torch.zeros((), dtype=torch.float32)
    for i, t in enumerate(tensors):
        g = torch.Generator().manual_seed(1000 + i)
        w = torch.randn(t.shape, generator=g, dtype=torch.float32)
        total = total + (t.float() * w).sum() / t.numel()
    return total


@dataclass
class Step:
    """What one step left: loss, gradients, buffers, and how often each module with parameters
    of its own was called (a recomputed block's modules run again during backward)."""

    loss: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]
    n_outputs: int
    calls: dict[str, int]


class Phase:
    """Which part of a case is running, for crash reports."""

    def __init__(self) -> None:
        self.name = "setup"


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)  # wav2vec2-style SpecAugment masks come from numpy
    random.seed(seed)


@contextlib.contextmanager
def _quiet() -> Iterable[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def run_step(
    model: nn.Module, inputs: dict[str, Any], seed: int, phase: Phase | None = None
) -> Step:
    """One forward and backward from fixed RNG states; the loss, gradients and buffers after it."""
    phase = phase or Phase()
    model.zero_grad(set_to_none=True)
    calls: dict[str, int] = {}
    # Pre-hooks: a recompute that early stop cuts short right after a module's last saved
    # tensor never reaches that module's forward hook (a block that is one convolution, as
    # PoolFormer's patch embeddings, looked "not recomputed"), but always starts its forward.
    handles = [
        m.register_forward_pre_hook(_counter(calls, name))
        for name, m in model.named_modules()
        if name and any(True for _ in m.parameters(recurse=False))
    ]
    _seed(seed)
    try:
        with _quiet():
            phase.name = "forward"
            out = model(**inputs)
            n = len(grad_tensors(out))
            loss = loss_of(out)
            phase.name = "backward"
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    grads = {
        name: (None if p.grad is None else p.grad.detach().clone())
        for name, p in model.named_parameters()
    }
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return Step(loss.detach(), grads, buffers, n, calls)


def _counter(calls: dict[str, int], name: str) -> Callable[..., None]:
    def count(_m: nn.Module, _args: Any) -> None:
        calls[name] = calls.get(name, 0) + 1

    return count


def not_recomputed(plan: Any, ref: Step, got: Step) -> list[str]:
    """Blocks the plan checkpoints in which no module ran again during backward.

    A checkpointed block's recompute calls its submodules a second time (early stop may cut
    the tail short, never the first module's start: calls are counted by forward pre-hooks),
    so a block whose modules all ran as often as without gradckpt was not checkpointed at all:
    no memory saved, whatever the plan says.
    """
    from gradckpt.plans import Decision

    in_segment = {i for a, b in plan.segments for i in range(a, b)}
    missing = []
    for i, (name, decision) in enumerate(zip(plan.blocks, plan.decisions)):
        if decision is Decision.SAVE and i not in in_segment:
            continue
        inner = [m for m in got.calls if m.startswith(name + ".")]
        if inner and not any(got.calls[m] > ref.calls.get(m, 0) for m in inner):
            missing.append(name)
    return missing


def compare(ref: Step, got: Step) -> dict[str, Any] | None:
    """None when bit-identical, else what differs: the parameter with the largest difference."""
    if ref.grads.keys() != got.grads.keys():
        return {"what": "parameter names differ"}
    missing = [n for n in ref.grads if (ref.grads[n] is None) != (got.grads[n] is None)]
    if missing:
        n = missing[0]
        has = "no gradient" if got.grads[n] is None else "a gradient where the reference has none"
        return {"what": f"{n} gets {has}", "param": n, "count": len(missing)}
    worst: tuple[float, str] | None = None
    count = 0
    for n, a in ref.grads.items():
        b = got.grads[n]
        if a is None or b is None:
            continue
        if a.shape != b.shape:
            return {"what": f"{n}: gradient shape {tuple(b.shape)} != {tuple(a.shape)}"}
        if not torch.equal(a, b):
            count += 1
            d = float((a.double() - b.double()).abs().nan_to_num(float("inf")).max())
            if worst is None or d > worst[0]:
                worst = (d, n)
    loss_equal = torch.equal(ref.loss, got.loss)
    if worst is not None:
        return {
            "what": f"{count} gradient(s) differ; largest on {worst[1]}",
            "param": worst[1],
            "max_abs_diff": worst[0],
            "count": count,
            "loss_equal": loss_equal,
        }
    if not loss_equal:
        d = float((ref.loss.double() - got.loss.double()).abs())
        return {"what": "loss differs, gradients equal", "max_abs_diff": d}
    for n, a in ref.buffers.items():
        b = got.buffers.get(n)
        if b is None or a.shape != b.shape or not torch.equal(a, b):
            return {"what": f"buffer {n} differs after the step (updated twice?)", "param": n}
    return None


# -- ground truth for find_blocks ---------------------------------------------------------------------


def checkpoint_layers(model: nn.Module) -> list[str] | None:
    """Outermost ``GradientCheckpointingLayer`` modules, or None when the model has none."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52 has no such base class
        return None
    found: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, GradientCheckpointingLayer):
            continue
        if any(name.startswith(f + ".") for f in found):
            continue
        found.append(name)
    return found or None


def check_find_blocks(model: nn.Module) -> dict[str, Any]:
    """``find_blocks`` against transformers' checkpointable layers."""
    truth = checkpoint_layers(model)
    try:
        found = [n for n, _ in gradckpt.find_blocks(model)]
    except GradCkptError as e:
        found, error = None, f"{type(e).__name__}: {e}"
    else:
        error = None
    res: dict[str, Any] = {"found": found, "truth": truth}
    if error:
        res["error"] = error
    if truth is None:
        res["status"] = "n/a" if found is not None else "no blocks"
    elif found is None:
        res["status"] = "differs"
        res["what"] = f"find_blocks refuses ({error}); transformers has {len(truth)} layers"
    elif found == truth:
        res["status"] = "agrees"
    else:
        missing = [n for n in truth if n not in found]
        extra = [n for n in found if n not in truth]
        res["status"] = "differs"
        parts = []
        if missing:
            parts.append(f"misses {_short(missing)}")
        if extra:
            parts.append(f"adds {_short(extra)}")
        if not parts:
            parts.append("same layers in another order")
        res["what"] = "; ".join(parts)
    return res


def _short(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# -- one architecture -----------------------------------------------------------------------------------


@dataclass
class ArchRun:
    """What every policy of one architecture is compared with (built once, copied per case)."""

    arch: Arch
    model: nn.Module | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    ref: Step | None = None
    ref2: Step | None = None
    keys: list[str] = field(default_factory=list)
    forwards: set[str] = field(default_factory=set)
    error: str | None = None  # the reference itself could not run
    deterministic: bool = True
    find_blocks: dict[str, Any] = field(default_factory=dict)
    n_params: int = 0
    seconds: float = 0.0


def _instance_forwards(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if "forward" in m.__dict__}


def prepare(arch: Arch) -> ArchRun:
    """Build the model and run the reference (twice, on two copies, to prove it deterministic)."""
    t0 = time.perf_counter()
    run = ArchRun(arch)
    try:
        with _quiet():
            model = build_model(arch)
        run.inputs = make_inputs(arch, model)
        run.n_params = sum(p.numel() for p in model.parameters())
        run.keys = list(model.state_dict().keys())
        run.forwards = _instance_forwards(model)
        run.find_blocks = check_find_blocks(model)
        run.model = copy.deepcopy(model)  # pristine: the reference steps below change buffers
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        run.ref = run_step(a, run.inputs, seed=0)
        run.ref2 = run_step(a, run.inputs, seed=1)
        again = run_step(b, run.inputs, seed=0)
        if compare(run.ref, again) is not None:
            run.deterministic = False
    except Exception as e:
        run.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        run.model = None
    run.seconds = time.perf_counter() - t0
    return run


def _matches_without_cache(run: ArchRun, got: Step) -> bool:
    """Whether ``got`` equals the reference step run with ``use_cache=False``."""
    assert run.model is not None
    if "use_cache" not in inspect.signature(run.model.forward).parameters:
        return False
    if not getattr(run.model.config, "use_cache", False):
        return False
    try:
        ref = run_step(copy.deepcopy(run.model), {**run.inputs, "use_cache": False}, seed=0)
    except Exception:
        return False
    return compare(ref, got) is None


def _names_a_block(msg: str, model: nn.Module, plan: Any) -> bool:
    names: set[str] = set(getattr(plan, "blocks", ()) or ())
    with contextlib.suppress(GradCkptError):
        names |= {n for n, _ in gradckpt.find_blocks(model)}
    if any(n and n in msg for n in names):
        return True
    # a class name counts when it is a submodule's (the model's own class names no block)
    classes = {type(m).__name__ for n, m in model.named_modules() if n}
    classes -= {"ModuleList", "Sequential", "ModuleDict"}
    return any(c in msg for c in classes)


def run_case(run: ArchRun, policy: str) -> dict[str, Any]:
    """One (architecture, policy) case: enable, step, compare, disable, step, compare."""
    if run.model is None or run.ref is None or run.ref2 is None:
        return {"status": "skip", "what": f"reference did not run: {run.error}"}
    if not run.deterministic:
        return {"status": "skip", "what": "the reference itself is not deterministic"}
    t0 = time.perf_counter()
    model = copy.deepcopy(run.model)
    try:
        res = _case(run, model, policy)
    finally:
        gradckpt.disable(model)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


def _case(run: ArchRun, model: nn.Module, policy: str) -> dict[str, Any]:
    assert run.ref is not None and run.ref2 is not None
    phase = Phase()
    plan = None
    res: dict[str, Any]
    try:
        phase.name = "enable"
        with _quiet():
            plan = gradckpt.enable(model, policy=policy)
        res = {"plan": plan.summary() if hasattr(plan, "summary") else str(plan)}
        if list(model.state_dict().keys()) != run.keys:
            res.update(status="FAIL", what="state_dict keys changed under enable")
            return res
        got = run_step(model, run.inputs, seed=0, phase=phase)
        diff = compare(run.ref, got)
        if diff is not None:
            res.update(status="FAIL", phase="step", **diff)
            if _matches_without_cache(run, got):
                res["matches_use_cache_false"] = True
                res["note"] = (
                    "bit-identical to the reference run with use_cache=False: gradckpt turns the "
                    "KV cache off, and this model's training forward depends on use_cache"
                )
            return res
        idle = not_recomputed(plan, run.ref, got)
        if idle:
            res.update(
                status="FAIL",
                phase="step",
                what=f"plan checkpoints {len(idle)} block(s) that were not recomputed in "
                f"backward (no memory saved): {_short(idle)}",
            )
            return res
        phase.name = "disable"
        gradckpt.disable(model)
        left = _instance_forwards(model) - run.forwards
        if left:
            res.update(
                status="FAIL", what=f"disable left a forward override on {_short(sorted(left))}"
            )
            return res
        if list(model.state_dict().keys()) != run.keys:
            res.update(status="FAIL", what="state_dict keys changed after disable")
            return res
        got2 = run_step(model, run.inputs, seed=1, phase=phase)
        diff = compare(run.ref2, got2)
        if diff is not None:
            res.update(status="FAIL", phase="after disable", **diff)
            return res
        res["status"] = "pass"
        return res
    except GradCkptError as e:
        msg = str(e)
        ok = _names_a_block(msg, model, plan)
        return {
            "status": "refusal" if ok else "refusal-unclear",
            "phase": phase.name,
            "error": f"{type(e).__name__}: {msg}",
        }
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = next(
            (
                f"{Path(f.filename).name}:{f.lineno}"
                for f in reversed(tb)
                if "gradckpt" in f.filename
            ),
            f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "",
        )
        return {
            "status": "crash",
            "phase": phase.name,
            "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
            "where": where,
        }


# -- the sweep -------------------------------------------------------------------------------------------

STATUSES = ("pass", "refusal", "refusal-unclear", "FAIL", "crash", "skip")


def sweep(
    archs: Sequence[Arch] = ARCHS,
    policies: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = print,
    command: str = "PYTHONPATH=src .venv/bin/python benchmarks/arch_sweep.py",
) -> dict[str, Any]:
    """Run every (architecture, policy) case; returns the JSON-ready result."""
    policies = list(policies or sweep_policies())
    t0 = time.perf_counter()
    rows = []
    for i, arch in enumerate(archs, 1):
        run = prepare(arch)
        cases = {p: run_case(run, p) for p in policies}
        fb = run.find_blocks
        row = {
            "name": arch.name,
            "family": arch.family,
            "model_class": arch.model_class,
            "note": arch.note,
            "params": run.n_params,
            "reference_error": run.error,
            "deterministic": run.deterministic,
            "find_blocks": fb,
            "cases": cases,
            "seconds": round(run.seconds + sum(c.get("seconds", 0.0) for c in cases.values()), 2),
        }
        rows.append(row)
        if progress:
            cells = " ".join(f"{p}={c['status']}" for p, c in cases.items())
            fbs = fb.get("status", "-")
            progress(
                f"[{i:3d}/{len(archs)}] {arch.name:20s} {row['seconds']:6.1f}s  "
                f"find_blocks={fbs}  {cells}" + (f"  ({run.error})" if run.error else "")
            )
    counts = {s: 0 for s in STATUSES}
    for row in rows:
        for c in row["cases"].values():
            counts[c["status"]] += 1
    fb_counts: dict[str, int] = {}
    for row in rows:
        s = row["find_blocks"].get("status", "error")
        fb_counts[s] = fb_counts.get(s, 0) + 1
    return {
        "date": dt.date.today().isoformat(),
        "command": command,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "gradckpt": gradckpt.__version__,
            "commit": _commit(),
        },
        "settings": {
            "batch": BATCH,
            "seq": SEQ,
            "decoder_seq": DEC_SEQ,
            "audio_samples": AUDIO_SAMPLES,
            "dropout": DROPOUT,
            "layerdrop": LAYERDROP,
            "dtype": "float32",
            "device": "cpu",
            "threads": torch.get_num_threads(),
        },
        "policies": policies,
        "architectures": len(rows),
        "cases": sum(len(r["cases"]) for r in rows),
        "counts": counts,
        "find_blocks_counts": fb_counts,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }


def _version(pkg: str) -> str | None:
    try:
        return __import__(pkg).__version__
    except Exception:
        return None


def _commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except Exception:
        return None
    commit = out.stdout.strip()
    # uncommitted changes to the code under test make the commit alone not reproduce the table
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "src", "benchmarks/arch_sweep.py"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (commit + ("+dirty" if dirty else "")) or None


# -- rendering -------------------------------------------------------------------------------------------

_CELL = {
    "pass": "pass",
    "refusal": "refusal",
    "refusal-unclear": "**refusal?**",
    "FAIL": "**FAIL**",
    "crash": "**crash**",
    "skip": "skip",
}


def _detail(c: dict[str, Any]) -> str:
    if c["status"] == "FAIL":
        s = c.get("what", "")
        if "max_abs_diff" in c:
            s += f" (max abs diff {c['max_abs_diff']:.3g}"
            s += ", loss equal)" if c.get("loss_equal") else ")"
        s += f" [{c['phase']}]" if c.get("phase") else ""
        return s + (f"; {c['note']}" if c.get("note") else "")
    if c["status"] in ("crash", "refusal", "refusal-unclear"):
        where = f" at {c['where']}" if c.get("where") else ""
        return f"[{c.get('phase', '?')}{where}] {c.get('error', '')}"
    return c.get("what", "")


def render_md(res: dict[str, Any]) -> str:
    pols = res["policies"]
    v = res["versions"]
    s = res["settings"]
    out = [
        f"# Architecture sweep, {res['date']}",
        "",
        f"`{res['command']}` — torch {v['torch']}, transformers {v['transformers']}, "
        f"gradckpt {v['gradckpt']} ({v['commit']}); {s['device']}, {s['dtype']}, "
        f"{s['threads']} thread(s), {res['seconds']:.0f} s.",
        "",
        f"Every policy on {res['architectures']} tiny random transformers models (batch {s['batch']}, "
        f"{s['seq']} tokens, dropout {s['dropout']}, LayerDrop {s['layerdrop']}, same seed), "
        "compared with no checkpointing: loss, every gradient and every buffer bit-identical, "
        "`state_dict` keys unchanged, `disable` restoring the model exactly. `find_blocks` is "
        "compared with transformers' own `GradientCheckpointingLayer` modules.",
        "",
        f"**{res['cases']} cases:** "
        + ", ".join(f"{k} {n}" for k, n in res["counts"].items() if n)
        + ". **find_blocks:** "
        + ", ".join(f"{k} {n}" for k, n in sorted(res["find_blocks_counts"].items())),
        "",
        "| architecture | family | find_blocks | " + " | ".join(pols) + " |",
        "|---|---|---|" + "---|" * len(pols),
    ]
    for row in res["rows"]:
        fb = row["find_blocks"].get("status", "?")
        fb_cell = f"**{fb}**" if fb in ("differs", "no blocks") else fb
        cells = [_CELL[row["cases"][p]["status"]] for p in pols]
        out.append(f"| {row['name']} | {row['family']} | {fb_cell} | " + " | ".join(cells) + " |")
    out += ["", "## Not passing", ""]
    any_bad = False
    for row in res["rows"]:
        if row["reference_error"]:
            out.append(f"- **{row['name']}**: reference did not run: {row['reference_error']}")
            any_bad = True
        fb = row["find_blocks"]
        if fb.get("status") in ("differs", "no blocks"):
            truth = fb.get("truth")
            out.append(
                f"- **{row['name']}** find_blocks {fb['status']}: {fb.get('what', fb.get('error', ''))}"
                + (f" (transformers: {_short(truth)})" if truth else "")
            )
            any_bad = True
        for p in pols:
            c = row["cases"][p]
            if c["status"] in ("pass", "skip"):
                continue
            out.append(f"- **{row['name']}** `{p}` {c['status']}: {_detail(c)}")
            any_bad = True
    if not any_bad:
        out.append("Nothing: every case passes.")
    notes = [r for r in res["rows"] if r.get("note")]
    if notes:
        out += ["", "## Settings that differ from the defaults", ""]
        out += [f"- **{r['name']}**: {r['note']}" for r in notes]
    return "\n".join(out) + "\n"


def _command(argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run (the interpreter relative to the repository)."""
    root = Path(__file__).resolve().parent.parent
    exe = Path(sys.executable)
    try:
        python = str(exe.relative_to(root))
    except ValueError:  # a checkout's shared venv (git worktrees): named as make creates it
        python = (
            f"{exe.parent.parent.name}/bin/{exe.name}"
            if exe.parent.parent.name.startswith(".venv")
            else str(exe)
        )
    given = list(sys.argv[1:] if argv is None else argv)
    args: list[str] = []
    skip = False
    for a in given:  # where the files went is no part of what they hold
        if skip or a.startswith("--out"):
            skip = a == "--out"
            continue
        args.append(a)
    return " ".join(["PYTHONPATH=src", python, "benchmarks/arch_sweep.py", *args])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated architecture names (default: all)")
    p.add_argument("--policies", help="comma-separated policies (default: every registered one)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and Markdown")
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
    p.add_argument(
        "--suffix",
        default="",
        help="appended to the file names (--suffix=-transformers-4.46.2 for another stack)",
    )
    p.add_argument("--list", action="store_true", help="list the architectures and exit")
    args = p.parse_args(argv)
    if args.list:
        for a in ARCHS:
            print(f"{a.name:20s} {a.family:8s} {a.model_class}")
        return 0
    archs = list(ARCHS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in ARCH_BY_NAME]
        if unknown:
            p.error(f"unknown architecture(s): {', '.join(unknown)} (see --list)")
        archs = [ARCH_BY_NAME[n] for n in names]
    policies = [x.strip() for x in args.policies.split(",")] if args.policies else None
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    res = sweep(archs, policies, command=_command(argv))
    md = render_md(res)
    print()
    print(md.split("\n## Not passing")[0].splitlines()[6])
    print("## Not passing" + md.split("## Not passing", 1)[1])
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"arch-sweep-{res['date']}{args.suffix}"
        # not with_suffix: a suffix with a version in it ("-4.46.2") has a dot of its own
        stem.with_name(stem.name + ".json").write_text(json.dumps(res, indent=1) + "\n")
        stem.with_name(stem.name + ".md").write_text(md)
        print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
