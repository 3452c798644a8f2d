"""Hugging Face Trainer/TRL: ``GradCkptCallback`` (apply a plan at train start, log it and peak memory).

What ``gradckpt.enable`` changes on a Hugging Face model (its own checkpointing flag off, no KV
cache while gradients are recorded) is ``gradckpt.guards.hf``'s job; this module holds what
users import: the callback and ``peak_memory_logs``. transformers is imported only when the
callback class is first used.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._optional import require
from ..errors import ConfigError, PolicyError
from ..plans import Plan

__all__ = ["GradCkptCallback", "TrainerChoice", "peak_memory_logs", "trainer_choice"]  # noqa: F822

logger = logging.getLogger("gradckpt")


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


@dataclass(frozen=True)
class TrainerChoice:
    """What ``GradCkptCallback`` installs once it has read the trainer's own settings.

    Attributes:
        policy: the policy name for ``gradckpt.enable`` (None when a budget or a plan was given).
        options: policy options for ``gradckpt.enable``.
        message: the one info line saying how the trainer's settings were mapped (None when the
            trainer asked for nothing gradckpt had to interpret).
    """

    policy: str | None
    options: dict[str, Any] = field(default_factory=dict)
    message: str | None = None


# gradient_checkpointing_kwargs keys torch.utils.checkpoint takes: the value gradckpt always
# runs with, and why it does not follow another.
_CKPT_KWARGS: dict[str, tuple[object, str]] = {
    "use_reentrant": (
        False,
        "gradckpt always runs torch's non-reentrant checkpoint (reentrant gives adapters over "
        "frozen embeddings no gradient)",
    ),
    "preserve_rng_state": (True, "gradckpt always replays the forward's RNG state"),
    "determinism_check": (
        "default",
        "gradckpt always checks the recompute saves what forward saved",
    ),
}


def trainer_choice(
    args: Any,
    policy: str | None = None,
    *,
    budget: int | str | None = None,
    plan: Plan | None = None,
    options: dict[str, Any] | None = None,
) -> TrainerChoice:
    """Map a trainer's own checkpointing settings onto gradckpt's, instead of silently overriding.

    Read from ``args`` (``TrainingArguments``, or TRL's ``SFTConfig``/``DPOConfig``...):
    ``gradient_checkpointing`` (True: policy ``full``, what transformers does),
    ``gradient_checkpointing_kwargs`` (``use_reentrant``, ``preserve_rng_state``,
    ``determinism_check``: gradckpt's behaviour is fixed, the line says what it does) and TRL's
    ``activation_offloading`` (True: policy ``offload``, each block's input kept in host memory
    and the block recomputed: with ``gradient_checkpointing=True`` that is what TRL's offloading
    amounts to). A policy, budget or plan given to the callback wins; the line then says what it
    replaced.

    Args:
        args: the trainer's arguments (any object; missing attributes count as unset).
        policy, budget, plan, options: what the callback was given.

    Returns:
        A ``TrainerChoice``.

    Example:
        >>> trainer_choice(SFTConfig(gradient_checkpointing=True, activation_offloading=True)).policy
        'offload'
    """
    options = dict(options or {})
    hf_ckpt = bool(getattr(args, "gradient_checkpointing", False))
    offloading = bool(getattr(args, "activation_offloading", False))
    kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(
            f"gradient_checkpointing_kwargs must be a dict, got {type(kwargs).__name__}"
        )
    given = (
        f"policy {policy!r}"
        if policy is not None
        else f"budget {budget!r}"
        if budget is not None
        else "the plan given"
        if plan is not None
        else None
    )
    said: list[str] = []
    if given is None:
        if offloading:
            policy = "offload"
            said.append(
                "activation_offloading=True -> gradckpt policy 'offload' (each block's input in "
                "host memory, the block recomputed in backward)"
            )
        elif hf_ckpt:
            policy = "full"
            said.append("gradient_checkpointing=True -> gradckpt policy 'full'")
    else:
        if hf_ckpt:
            said.append(f"gradient_checkpointing=True replaced by gradckpt's {given}")
        if offloading:
            said.append(
                f"activation_offloading=True kept next to gradckpt's {given} (TRL moves only "
                "tensors saved outside the blocks)"
            )
    if hf_ckpt or offloading:
        for key in sorted(kwargs):
            same, why = _CKPT_KWARGS.get(key, (None, "an option gradckpt does not take"))
            if key in _CKPT_KWARGS and kwargs[key] == same:
                continue  # what gradckpt does anyway (TRL's default use_reentrant=False)
            said.append(f"gradient_checkpointing_kwargs {key}={kwargs[key]!r} not used: {why}")
    message = None
    if said:
        tail = " (transformers' own checkpointing switched off: nothing checkpointed twice)"
        message = "gradckpt: " + "; ".join(said) + (tail if hf_ckpt else "")
    return TrainerChoice(policy=policy, options=options, message=message)


def _make_callback() -> type:
    TrainerCallback = require("transformers", "hf", purpose="GradCkptCallback").TrainerCallback
    from ..enable import applied_plan, disable, enable

    class GradCkptCallback(TrainerCallback):  # type: ignore[misc,valid-type]
        """Apply a gradckpt plan when training starts; log the plan and peak memory.

        The trainer's own settings are read, not silently overridden (``trainer_choice``):
        without ``policy``/``budget``/``plan``, ``gradient_checkpointing=True`` means ``full``
        and TRL's ``activation_offloading=True`` means ``offload``; one info line on the
        ``gradckpt`` logger says how they were mapped. gradckpt switches the model's own
        checkpointing off, so nothing is checkpointed twice.

        Args:
            policy: a policy name (``"full"``, ``"sqrt"``... ``gradckpt.policy_names()``, or
                ``"unsloth"``, an alias of ``"offload"``); default: from the trainer's arguments,
                else ``"full"``.
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
                raise PolicyError(
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
            self.choice: TrainerChoice | None = None

        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any
        ) -> None:
            if model is None:
                raise ConfigError(
                    "GradCkptCallback got no model at train start; pass it to a transformers "
                    "Trainer (or call gradckpt.enable(model) yourself)"
                )
            choice = trainer_choice(
                args, self.policy, budget=self.budget, plan=self._given_plan, options=self.options
            )
            if choice.message is not None:
                logger.info("%s", choice.message)
            self.choice = choice
            self.plan = enable(
                model,
                choice.policy,
                budget=self.budget,
                plan=self._given_plan,
                blocks=self.blocks,
                **choice.options,
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
            self.plan = applied_plan(self._model) or self.plan
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
                disable(self._model)
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
