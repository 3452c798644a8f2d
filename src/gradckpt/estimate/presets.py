"""Model presets: published Hugging Face ``config.json`` values of common models, and config loading.

Each preset copies the architecture fields of the model's ``config.json`` on the Hugging Face Hub
(the repository is named in ``source``); fields that do not change memory or FLOPs (token ids,
initializer range) are left out. Any local ``config.json`` works too, and so does a
``transformers.PretrainedConfig`` object.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._optional import require
from ..errors import ConfigError
from .hub import is_hub_id, load_hub_config

__all__ = ["MODEL_PRESETS", "ModelPreset", "ModelSpec", "hf_transformers", "resolve_model"]


@dataclass(frozen=True)
class ModelPreset:
    """A model by name: its ``config.json`` fields and where they come from.

    Attributes:
        name: what users type (``"mistral-7b"``).
        source: the Hugging Face repository the values are copied from.
        config: ``config.json`` fields (``model_type`` included).
        params: the published parameter count, as a check on the config (e.g. ``"7.24B"``).
    """

    name: str
    source: str
    config: dict[str, Any]
    params: str


def _p(name: str, source: str, params: str, **config: Any) -> ModelPreset:
    return ModelPreset(name, source, config, params)


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Qwen2-VL 7B and Qwen2.5-VL 7B: the same language model and special tokens
_QWEN_VL_TOKENS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)
_QWEN_VL_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)

# fmt: off
_PRESETS = [
    _p("mistral-7b", "mistralai/Mistral-7B-v0.3", "7.25B", model_type="mistral",
       vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
       rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False),
    _p("llama-2-7b", "meta-llama/Llama-2-7b-hf", "6.74B", model_type="llama",
       vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    _p("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "8.03B", model_type="llama",
       vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    _p("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "8.03B", model_type="llama",
       vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
       rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=False),
    _p("llama-3.1-70b", "meta-llama/Llama-3.1-70B", "70.6B", model_type="llama",
       vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
       rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=False),
    _p("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "1.24B", model_type="llama",
       vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
       rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True),
    _p("llama-3.2-3b", "meta-llama/Llama-3.2-3B", "3.21B", model_type="llama",
       vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
       num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
       rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True),
    _p("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "0.49B", model_type="qwen2",
       vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    _p("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", "1.54B", model_type="qwen2",
       vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    _p("qwen2.5-7b", "Qwen/Qwen2.5-7B", "7.62B", model_type="qwen2",
       vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    _p("qwen2.5-14b", "Qwen/Qwen2.5-14B", "14.77B", model_type="qwen2",
       vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
       num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=131072,
       rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    _p("gemma-2-2b", "google/gemma-2-2b", "2.61B", model_type="gemma2",
       vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
       num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
       final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
       rope_theta=10000.0, tie_word_embeddings=True),
    _p("gemma-2-9b", "google/gemma-2-9b", "9.24B", model_type="gemma2",
       vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
       num_attention_heads=16, num_key_value_heads=8, head_dim=256, max_position_embeddings=8192,
       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
       final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
       rope_theta=10000.0, tie_word_embeddings=True),
    _p("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", "3.82B", model_type="phi3",
       vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
       original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
       sliding_window=2047, tie_word_embeddings=False),
    _p("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", "46.7B", model_type="mixtral",
       vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
       num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
       sliding_window=None, tie_word_embeddings=False),
    _p("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct", "8.29B", model_type="qwen2_vl",
       architectures=["Qwen2VLForConditionalGeneration"], **_QWEN_VL_TOKENS,
       text_config={**_QWEN_VL_TEXT, "model_type": "qwen2_vl_text",
                    "max_position_embeddings": 32768},
       vision_config=dict(
           depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=3584,
           patch_size=14, spatial_merge_size=2, temporal_patch_size=2)),
    _p("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "8.29B", model_type="qwen2_5_vl",
       architectures=["Qwen2_5_VLForConditionalGeneration"], **_QWEN_VL_TOKENS,
       text_config={**_QWEN_VL_TEXT, "model_type": "qwen2_5_vl_text",
                    "max_position_embeddings": 128000},
       vision_config=dict(
           depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
           in_chans=3, out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
           temporal_patch_size=2)),
    _p("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "7.06B", model_type="llava",
       architectures=["LlavaForConditionalGeneration"], image_token_index=32000,
       projector_hidden_act="gelu", vision_feature_layer=-2,
       vision_feature_select_strategy="default",
       text_config=dict(
           model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
           max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
           tie_word_embeddings=False),
       vision_config=dict(
           model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
           projection_dim=768, hidden_act="quick_gelu")),
    _p("gpt2", "openai-community/gpt2", "124M", model_type="gpt2",
       vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024, n_inner=None,
       activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
    _p("gpt2-xl", "openai-community/gpt2-xl", "1.56B", model_type="gpt2",
       vocab_size=50257, n_embd=1600, n_layer=48, n_head=25, n_positions=1024, n_inner=None,
       activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
]
# fmt: on

#: Preset name -> ModelPreset.
MODEL_PRESETS: dict[str, ModelPreset] = {p.name: p for p in _PRESETS}


@dataclass
class ModelSpec:
    """A model to estimate: a display name and a ``transformers`` config object.

    Attributes:
        name: the preset name, the config file's path, or the config's ``model_type``.
        config: a ``transformers.PretrainedConfig`` (never mutated by the estimator).
        source: where the values come from (Hub repository, file path or ``"config object"``).
    """

    name: str
    config: Any
    source: str = ""
    notes: list[str] = field(default_factory=list)


def hf_transformers() -> Any:
    """The ``transformers`` module, its logging quieted (estimates build many models), or ConfigError."""
    t = require("transformers", "hf", purpose="estimating a model")
    t.logging.set_verbosity_error()
    return t


def _config_from_dict(data: dict[str, Any], where: str) -> Any:
    t = hf_transformers()
    data = dict(data)
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ConfigError(f"{where} is not a Hugging Face config.json: it has no 'model_type'")
    try:
        return t.AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as e:
        if "auto_map" in data:  # the repository ships its own modeling code
            raise ConfigError(
                f"{where}: model type {model_type!r} needs the repository's own code (auto_map), "
                "which gradckpt never runs (no trust_remote_code); use a transformers release "
                "that has this architecture"
            ) from None
        raise ConfigError(
            f"{where}: transformers cannot build a {model_type!r} config: {e}"
        ) from None


def resolve_model(model: Any) -> ModelSpec:
    """Turn a preset name, a ``config.json`` path or a config object into a ``ModelSpec``.

    Args:
        model: a key of ``MODEL_PRESETS`` (case-insensitive), a path to a ``config.json`` (or a
            directory holding one), a Hugging Face Hub id (``"Qwen/Qwen2.5-7B"``: its
            ``config.json`` from the local cache, else the Hub; see ``hub``), or a
            ``transformers.PretrainedConfig``.

    Returns:
        A ``ModelSpec``.

    Raises:
        ConfigError: unknown name (with the closest preset), unreadable or malformed file.

    Example:
        >>> resolve_model("llama-3-8b").config.num_hidden_layers
        32
    """
    if model is not None and not isinstance(model, (str, Path)) and hasattr(model, "to_dict"):
        return ModelSpec(getattr(model, "model_type", "model") or "model", model, "config object")
    if not isinstance(model, (str, Path)) or not str(model).strip():
        raise ConfigError(
            "model must be a preset name (see `gradckpt plan --list-models`), a config.json path "
            f"or a transformers config, got {model!r}"
        )
    key = str(model).strip()
    preset = MODEL_PRESETS.get(key.lower())
    if preset is not None:
        return ModelSpec(preset.name, _config_from_dict(preset.config, preset.name), preset.source)
    path = Path(key)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path} is not a Hugging Face config.json: it holds a {type(data).__name__}, not an object"
            )
        return ModelSpec(str(path), _config_from_dict(data, str(path)), str(path))
    if is_hub_id(key):
        data, where = load_hub_config(key)
        return ModelSpec(
            key, _config_from_dict(data, f"{key} ({where})"), f"{key} (Hugging Face Hub)"
        )
    if key.endswith(".json") or "/" in key or "\\" in key:
        raise ConfigError(f"config file {key} does not exist")
    close = difflib.get_close_matches(key.lower(), list(MODEL_PRESETS), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown model {key!r}: {hint}see `gradckpt plan --list-models`, or pass a config.json path"
    )
