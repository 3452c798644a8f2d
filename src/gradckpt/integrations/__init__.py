"""Adapters for the stacks users train with; optional dependencies are imported lazily here."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["prepare_model"]


def prepare_model(model: nn.Module) -> Callable[[], None]:
    """Make ``model`` ready for gradckpt's checkpointing; returns the function that undoes it.

    Hugging Face models (recognised by duck typing, so transformers is not imported) get their
    own gradient checkpointing turned off (no double checkpointing) and ``use_cache`` off (a KV
    cache written in forward would be written again by the recompute).
    """
    if hasattr(model, "config") and hasattr(model, "gradient_checkpointing_disable"):
        from .hf import prepare_hf_model

        return prepare_hf_model(model)
    return lambda: None
