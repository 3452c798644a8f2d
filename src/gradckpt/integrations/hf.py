"""Hugging Face transformers: one checkpointing (gradckpt's), no KV cache writes in training, a Trainer callback.

Works with transformers 4.45 and later (tested with 5.x), found by duck typing so that
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
  its cache.
- **No ``enable_input_require_grads``.** gradckpt's checkpoint is the non-reentrant one, which
  gives adapters their gradients when the embeddings are frozen.

The weights, ``state_dict`` keys and ``save_pretrained`` files are those of the model without
gradckpt: nothing is wrapped, only each block's ``forward`` is overridden on the instance.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import GradCkptError
from ..plan import Decision, Plan

# GradCkptCallback is built on first access (module __getattr__ below).
__all__ = ["GradCkptCallback", "HFGuard", "peak_memory_logs"]  # noqa: F822

logger = logging.getLogger("gradckpt")

# Keyword names layers take their KV cache under (transformers >= 5.24 `cache`, 5.x
# `past_key_values`, 4.x Llama-likes `past_key_value`, 4.x GPT-2-likes `layer_past`).
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _is_hf_model(m: nn.Module) -> bool:
    """A ``PreTrainedModel`` or a wrapper of one (PEFT's ``PeftModel``), by duck typing."""
    return getattr(m, "config", None) is not None and hasattr(m, "get_input_embeddings")


def _cached_tokens(cache: Any) -> int:
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
        return _cached_tokens([v for k, v in cache.items() if k != "slen"])
    if isinstance(cache, (tuple, list)):
        for item in cache:
            if isinstance(item, torch.Tensor):
                return int(item.shape[-2]) if item.dim() >= 2 else int(item.numel())
            n = _cached_tokens(item)
            if n:
                return n
    return 0


class HFGuard:
    """What ``enable`` changes on a Hugging Face-style model, and how to undo it (``remove``)."""

    def __init__(self, flag_modules: list[nn.Module], configs: list[Any]) -> None:
        self._flag_modules = flag_modules
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
        hf_models = [m for m in model.modules() if _is_hf_model(m)]
        if not flag_modules and not hf_models:
            return None
        decisions = plan.decisions if plan is not None else ()
        checkpointed = [blk for (_, blk), d in zip(blocks, decisions) if d is not Decision.SAVE]
        # Layers that only read the cache (transformers' `_can_checkpoint_with_cache`) keep it.
        writers = [b for b in checkpointed if not getattr(b, "_can_checkpoint_with_cache", False)]
        configs: list[Any] = []
        if writers and len(writers) == len(checkpointed):
            seen: set[int] = set()
            for m in hf_models:
                cfg = m.config
                if isinstance(getattr(cfg, "use_cache", None), bool) and id(cfg) not in seen:
                    seen.add(id(cfg))
                    configs.append(cfg)
        guard = cls(flag_modules, configs)
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
        if kwargs.get("use_cache"):
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
        for key in _CACHE_KWARGS:
            cache = kwargs.get(key)
            if cache is None:
                continue
            n = _cached_tokens(cache)
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


# -- Trainer callback -----------------------------------------------------------------------


def peak_memory_logs(model: nn.Module) -> dict[str, int]:
    """Peak memory numbers cheap enough to log every few steps, labelled with what they are.

    On CUDA: ``gradckpt/peak_allocated_bytes``, the allocator's peak on the model's device
    (``torch.cuda.max_memory_allocated``) since the callback reset it at train start. Elsewhere:
    ``gradckpt/host_max_rss_bytes``, the process's peak resident set size since it started
    (``getrusage``): an upper bound that includes Python, libraries and data, not a per-step
    activation figure (per-step tracking as in ``gradckpt.measure`` would slow every step down
    several-fold on CPU).

    Args:
        model: the model being trained (its first parameter says which device to read).

    Returns:
        ``{name: bytes}`` with one of the two keys above, or ``{}`` where neither is available.

    Example:
        >>> peak_memory_logs(model)
        {'gradckpt/host_max_rss_bytes': 621527040}
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda" and torch.cuda.is_available():
        return {"gradckpt/peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device))}
    try:
        import resource
    except ImportError:  # Windows
        return {}
    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    # Linux reports KiB, macOS bytes (getrusage(2) on each).
    return {"gradckpt/host_max_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}


def _make_callback() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as e:  # pragma: no cover - exercised only without the hf extra
        raise GradCkptError(
            "GradCkptCallback needs Hugging Face transformers: pip install 'gradckpt[hf]'"
        ) from e
    from .. import apply

    class GradCkptCallback(TrainerCallback):  # type: ignore[misc]
        """Apply a gradckpt plan when training starts; log the plan and peak memory.

        Use it with ``gradient_checkpointing=False`` in the Trainer's arguments (gradckpt
        switches the model's own checkpointing off anyway, so nothing is checkpointed twice).

        Args:
            policy: a policy name (``"full"``, ``"sqrt"``... ``gradckpt.policy_names()``).
            budget: a memory budget (``"20GiB"`` or bytes), passed to ``gradckpt.enable``.
            plan: a ``gradckpt.Plan`` made earlier.
            blocks: which modules are blocks (default: ``gradckpt.find_blocks``).
            disable_at_end: remove gradckpt from the model when training ends (default True),
                leaving it exactly as it was.
            **options: policy options passed to ``gradckpt.enable``.

        The plan summary goes into the first log entry as ``gradckpt/plan``, and again
        whenever the installed plan changes (a budget without ``example=`` is planned from
        the first training step); every log entry gets peak memory (``peak_memory_logs``).
        Both land in ``trainer.state.log_history`` and in the ``logs`` that reporters
        called after this callback receive. ``self.plan`` is the plan installed last.

        Example:
            >>> from gradckpt.integrations.hf import GradCkptCallback
            >>> trainer = SFTTrainer(model=model, args=SFTConfig(gradient_checkpointing=False),
            ...                      train_dataset=ds, callbacks=[GradCkptCallback(policy="full")])
        """

        def __init__(
            self,
            policy: str | None = None,
            *,
            budget: int | str | None = None,
            plan: Plan | None = None,
            blocks: Any = None,
            disable_at_end: bool = True,
            **options: Any,
        ) -> None:
            given = [
                k
                for k, v in (("policy", policy), ("budget", budget), ("plan", plan))
                if v is not None
            ]
            if len(given) > 1:
                raise GradCkptError(
                    f"give one of policy=, budget= or plan=, not {' and '.join(given)}"
                )
            self.policy = policy
            self.budget = budget
            self.blocks = blocks
            self.options = options
            self.disable_at_end = disable_at_end
            self.plan: Plan | None = plan
            self._given_plan = plan
            self._model: nn.Module | None = None
            self._logged_plan: str | None = None

        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any
        ) -> None:
            if model is None:
                raise GradCkptError(
                    "GradCkptCallback got no model at train start; pass it to a transformers "
                    "Trainer (or call gradckpt.enable(model) yourself)"
                )
            self.plan = apply.enable(
                model,
                self.policy,
                budget=self.budget,
                plan=self._given_plan,
                blocks=self.blocks,
                **self.options,
            )
            self._model = model
            self._logged_plan = None
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            if device.type == "cuda" and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats(device)
            logger.info("gradckpt plan for %s:\n%s", type(model).__name__, self.plan.table())

        def on_log(
            self,
            args: Any,
            state: Any,
            control: Any,
            logs: dict[str, Any] | None = None,
            **kw: Any,
        ) -> None:
            if self._model is None or self.plan is None:
                return
            extra: dict[str, Any] = {}
            self.plan = apply.applied_plan(self._model) or self.plan
            summary = self.plan.summary()
            if summary != self._logged_plan:
                extra["gradckpt/plan"] = self._logged_plan = summary
            extra.update(peak_memory_logs(self._model))
            if logs is not None:
                logs.update(extra)
            # Trainer.log appended a copy of `logs` to the history before calling callbacks.
            history = getattr(state, "log_history", None)
            if history and history[-1].get("step") == state.global_step:
                history[-1].update(extra)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.disable_at_end and self._model is not None:
                apply.disable(self._model)
                self._model = None

    GradCkptCallback.__module__ = __name__
    return GradCkptCallback


def __getattr__(name: str) -> Any:
    # GradCkptCallback subclasses transformers.TrainerCallback, so it is built on first use:
    # importing this module (which gradckpt.enable does for every HF-like model) stays cheap.
    if name == "GradCkptCallback":
        cls = _make_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
