"""Hugging Face transformers: one checkpointing (gradckpt's) and no KV cache writes in training.

Works with transformers 4.46.2 and later (tested: 4.46.2, 5.24.0), found by duck typing so that
``import gradckpt`` never imports transformers. What ``gradckpt.enable`` does to such a model,
all undone by ``gradckpt.disable``:

- **No double checkpointing.** Every module's own ``gradient_checkpointing`` flag (the decoder
  layers in transformers 5, the base model in 4.x) is switched off; when something switches it
  on again later (``Trainer(args=TrainingArguments(gradient_checkpointing=True))`` after
  ``enable``), the next forward switches it off again and logs one warning.
- **No KV cache while gradients are recorded.** A checkpointed layer that writes a KV cache in
  forward would write it a second time when backward recomputes it. During a forward with grad
  enabled, ``config.use_cache`` reads ``False`` (restored when the forward returns, so
  ``save_pretrained`` writes the config unchanged) and an explicit ``use_cache=True`` is turned
  off; a cache that already holds tokens (prefix tuning) reaching a checkpointed block is
  refused with a ``GradCkptError``. Inference under ``torch.no_grad()`` (``generate``) keeps
  its cache. A model whose training forward computes something else without the cache (FSMT:
  ``_FORWARD_READS_USE_CACHE``) keeps ``use_cache`` as it is; only its layers get no cache.
- **No ``enable_input_require_grads``.** gradckpt's checkpoint is the non-reentrant one, which
  gives adapters their gradients when the embeddings are frozen.

The weights, ``state_dict`` keys and ``save_pretrained`` files are those of the model without
gradckpt: nothing is wrapped, only each block's ``forward`` is overridden on the instance.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import GradCkptError
from ..plans import Decision, Plan

# GradCkptCallback is built on first access (module __getattr__ below).
__all__ = ["HFGuard", "cached_tokens", "is_hf_model"]

logger = logging.getLogger("gradckpt")

# Keyword names layers take their KV cache under (transformers >= 5.24 `cache`, 5.x
# `past_key_values`, 4.x Llama-likes `past_key_value`, 4.x GPT-2-likes `layer_past`).
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
# Names that hold a cache in some models only (FSMT's decoder layers take theirs as
# `layer_state`): neutralised when the value is a cache (a `Cache` object or a dict of them).
_CACHE_LIKE_KWARGS = ("layer_state",)

# Models whose training forward computes something else when use_cache is switched off, so
# gradckpt leaves use_cache as it is for them (their layers' cache arguments are still
# neutralised, so nothing is written twice). FSMTModel builds its decoder's causal mask only
# when use_cache is False (modeling_fsmt.py, transformers 4.46 to 5.24): with the config's
# default use_cache=True it trains its decoder without one, and switching the cache off changed
# every decoder gradient (up to 3.4e-3 in benchmarks/arch_sweep.py).
_FORWARD_READS_USE_CACHE = {
    "FSMTModel": "builds its decoder's causal mask only when use_cache=False (with "
    "use_cache=True it trains its decoder without one)",
}


def is_hf_model(m: nn.Module) -> bool:
    """A ``PreTrainedModel`` or a wrapper of one (PEFT's ``PeftModel``), by duck typing."""
    return getattr(m, "config", None) is not None and hasattr(m, "get_input_embeddings")


def cached_tokens(cache: Any) -> int:
    """Tokens already held by a KV cache (a ``Cache`` object, legacy tuples, or the dict XLM
    and Flaubert used before transformers 5: ``{"slen": n, layer_id: (k, v)}``); 0 when empty."""
    if hasattr(cache, "get_seq_length"):
        try:
            return int(cache.get_seq_length())
        except Exception:  # a cache type whose length cannot be read: treat as holding tokens
            return 1
    if isinstance(cache, Mapping):
        slen = cache.get("slen")
        if isinstance(slen, int) and not isinstance(slen, bool) and slen > 0:
            return slen
        return cached_tokens([v for k, v in cache.items() if k != "slen"])
    if isinstance(cache, (tuple, list)):
        for item in cache:
            if isinstance(item, torch.Tensor):
                return int(item.shape[-2]) if item.dim() >= 2 else int(item.numel())
            n = cached_tokens(item)
            if n:
                return n
    return 0


def _is_cache(value: Any) -> bool:
    """A KV cache object (transformers' ``Cache``) or a dict of cached keys and values."""
    return hasattr(value, "get_seq_length") or isinstance(value, Mapping)


def _reads_use_cache(models: Sequence[nn.Module]) -> tuple[str, str, Any] | None:
    """The first model in ``_FORWARD_READS_USE_CACHE``: its class name, why, its config."""
    for m in models:
        why = _FORWARD_READS_USE_CACHE.get(type(m).__name__)
        if why is not None:
            return type(m).__name__, why, m.config
    return None


class HFGuard:
    """What ``enable`` changes on a Hugging Face-style model, and how to undo it (``remove``)."""

    def __init__(
        self, flag_modules: list[nn.Module], configs: list[Any], keep_use_cache: bool = False
    ) -> None:
        self._flag_modules = flag_modules
        self._keep_use_cache = keep_use_cache  # no use_cache=True kwarg is turned off either
        # module -> (had an instance attribute, its value) before gradckpt switched it off
        self._flags: dict[nn.Module, tuple[bool, Any]] = {}
        self._configs = configs
        self._stash: list[tuple[Any, bool]] = []
        self._entered: list[bool] = []
        self._handles: list[RemovableHandle] = []
        self._warned_flags = False
        self._told_cache = False

    @classmethod
    def install(
        cls, model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], plan: Plan | None
    ) -> HFGuard | None:
        """Apply the changes described in this module's docstring; None when ``model`` is not HF-like."""
        flag_modules = [
            m
            for m in model.modules()
            if isinstance(getattr(m, "gradient_checkpointing", None), bool)
        ]
        hf_models = [m for m in model.modules() if is_hf_model(m)]
        if not flag_modules and not hf_models:
            return None
        decisions = plan.decisions if plan is not None else ()
        checkpointed = [blk for (_, blk), d in zip(blocks, decisions) if d is not Decision.SAVE]
        # Layers that only read the cache (transformers' `_can_checkpoint_with_cache`) keep it.
        writers = [b for b in checkpointed if not getattr(b, "_can_checkpoint_with_cache", False)]
        configs: list[Any] = []
        reads = _reads_use_cache(hf_models)
        if writers and len(writers) == len(checkpointed) and not reads:
            seen: set[int] = set()
            for m in hf_models:
                cfg = m.config
                if isinstance(getattr(cfg, "use_cache", None), bool) and id(cfg) not in seen:
                    seen.add(id(cfg))
                    configs.append(cfg)
        if reads and writers:
            name, why, cfg = reads
            if getattr(cfg, "use_cache", False):
                logger.warning(
                    "gradckpt: %s %s; gradckpt leaves use_cache on, so gradients are those "
                    "of training without gradckpt (checkpointed layers get no cache to "
                    "write). Set model.config.use_cache = False if that is not what you want",
                    name,
                    why,
                )
        guard = cls(flag_modules, configs, keep_use_cache=bool(reads))
        guard._switch_off_flags()
        try:
            if checkpointed:
                for m in hf_models:
                    guard._handles.append(
                        m.register_forward_pre_hook(guard._model_pre, with_kwargs=True)
                    )
                    guard._handles.append(
                        m.register_forward_hook(guard._model_post, always_call=True)
                    )
            for b in writers:
                guard._handles.append(
                    b.register_forward_pre_hook(guard._block_pre, with_kwargs=True)
                )
        except BaseException:
            guard.remove()
            raise
        return guard

    # -- the model's own checkpointing flag ------------------------------------------------
    def _switch_off_flags(self) -> bool:
        switched = False
        for m in self._flag_modules:
            if m.gradient_checkpointing:
                if m not in self._flags:
                    self._flags[m] = (
                        "gradient_checkpointing" in m.__dict__,
                        m.gradient_checkpointing,
                    )
                setattr(m, "gradient_checkpointing", False)  # noqa: B010 - nn.Module typing
                switched = True
        return switched

    # -- hooks ----------------------------------------------------------------------------
    def _model_pre(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not torch.is_grad_enabled():
            self._entered.append(False)
            return None
        self._entered.append(True)
        if self._switch_off_flags() and not self._warned_flags:
            self._warned_flags = True
            logger.warning(
                "Hugging Face gradient checkpointing was switched on after gradckpt.enable(); "
                "gradckpt switched it off again so no layer is checkpointed twice "
                "(gradckpt.disable() turns it back on)"
            )
        if sum(self._entered) == 1:  # the outermost forward recording gradients
            for cfg in self._configs:
                if cfg.use_cache:
                    self._stash.append((cfg, True))
                    cfg.use_cache = False
        if kwargs.get("use_cache") and not self._keep_use_cache:
            if not self._told_cache:
                self._told_cache = True
                logger.info(
                    "gradckpt: use_cache=True ignored while gradients are recorded (a checkpointed "
                    "layer would write its KV cache twice)"
                )
            return args, {**kwargs, "use_cache": False}
        return None

    def _model_post(self, module: nn.Module, args: Any, output: Any) -> None:
        entered = self._entered.pop() if self._entered else False
        if entered and not any(self._entered):
            self._restore_configs()

    def _block_pre(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not torch.is_grad_enabled():
            return None
        changed: dict[str, Any] | None = None
        for key in (*_CACHE_KWARGS, *_CACHE_LIKE_KWARGS):
            cache = kwargs.get(key)
            if cache is None:
                continue
            if key in _CACHE_LIKE_KWARGS and not _is_cache(cache):
                continue
            n = cached_tokens(cache)
            if n:
                raise GradCkptError(
                    f"{type(module).__name__} received a KV cache already holding {n} token(s) "
                    f"({key}=...) while gradients are recorded; its checkpointed forward would "
                    "append to that cache again when backward recomputes it. Train without a "
                    "cache (prefix tuning needs this block's activations kept: Decision.SAVE), "
                    "or run under torch.no_grad()"
                )
            changed = dict(kwargs) if changed is None else changed
            changed[key] = None  # empty: nothing to lose, and nothing gets written twice
        return None if changed is None else (args, changed)

    # -- undo -----------------------------------------------------------------------------
    def _restore_configs(self) -> None:
        for cfg, value in reversed(self._stash):
            cfg.use_cache = value
        self._stash.clear()

    def remove(self) -> None:
        """Undo everything ``install`` did (hooks, flags, configs)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._restore_configs()
        self._entered.clear()
        for m, (had, value) in self._flags.items():
            if had:
                setattr(m, "gradient_checkpointing", value)  # noqa: B010 - nn.Module typing
            else:
                m.__dict__.pop("gradient_checkpointing", None)
        self._flags.clear()
