"""Hugging Face transformers: turn off the model's own checkpointing and KV cache while enabled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["prepare_hf_model"]


def prepare_hf_model(model: nn.Module) -> Callable[[], None]:
    """Switch off HF gradient checkpointing and ``use_cache``; return the function restoring both."""
    hf: Any = model
    # transformers >= 5 renamed the flag (the old name warns); read whichever exists.
    flag = "is_activation_checkpointing" if hasattr(type(hf), "is_activation_checkpointing") else "is_gradient_checkpointing"
    was_gc = bool(getattr(hf, flag, False))
    gc_kwargs = getattr(hf, "_gradckpt_hf_gc_kwargs", None)
    if was_gc:
        hf.gradient_checkpointing_disable()
    configs = [c for c in {id(c): c for c in _configs(hf)}.values()]
    old_cache = [(c, c.use_cache) for c in configs if getattr(c, "use_cache", None)]
    for c, _ in old_cache:
        c.use_cache = False

    def restore() -> None:
        for c, v in old_cache:
            c.use_cache = v
        if was_gc:
            if gc_kwargs is not None:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            else:
                hf.gradient_checkpointing_enable()

    return restore


def _configs(model: Any) -> list[Any]:
    out = []
    cfg = getattr(model, "config", None)
    if cfg is not None:
        out.append(cfg)
        for sub in ("text_config", "decoder", "encoder"):
            c = getattr(cfg, sub, None)
            if c is not None and hasattr(c, "use_cache"):
                out.append(c)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "use_cache"):
        out.append(gen)
    return out
