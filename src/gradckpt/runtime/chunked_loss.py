"""Chunked loss head: ``lm_head`` + cross-entropy per chunk of tokens, so full logits never exist.

A causal LM trained with ``labels`` normally builds logits for every token (``tokens x vocab``:
0.25 MB per token for Llama 3.1's 128,256-word vocabulary in bf16, then an fp32 copy in the
loss) and keeps them until backward. With the plan option ``loss_head="chunked"`` the model's
forward runs as usual up to its output embedding (``get_output_embeddings()``, the ``lm_head``),
which is skipped: the hidden states it would have received are taken instead, and the loss is
computed ``loss_chunk`` tokens at a time, each chunk inside a (non-reentrant) checkpoint whose
only saved tensor is its slice of the hidden states. Backward recomputes one chunk's logits at
a time. Extra work: one more ``lm_head`` forward per step (the recompute); peak: one chunk's
logits instead of the whole sequence's.

The loss is transformers' ``ForCausalLMLoss`` (``transformers/loss/loss_utils.py``): labels
shifted by one (padded with ``ignore_index`` at the end) or the ``shift_labels`` given,
logits upcast to float32, cross-entropy with ``ignore_index`` (default -100), mean over the
non-ignored tokens, or the sum divided by ``num_items_in_batch`` when the Trainer passes it
(gradient accumulation). What the model does to logits between ``lm_head`` and the loss is
applied per chunk: Gemma 2/3's ``final_logit_softcapping`` (``tanh(x / c) * c``), Cohere's
``logit_scale`` (multiplied) and Granite's ``logits_scaling`` (divided). For MoE models whose
output carries ``aux_loss`` (Mixtral, Qwen2-MoE with ``output_router_logits=True``),
``router_aux_loss_coef * aux_loss`` is added as they do. Only the order of the floating-point
sums differs from the unchunked loss: losses and gradients are equal within rounding, not
bit-identical (``verify`` compares them with ``CHUNKED_RTOL``).

``outputs.logits``: while the chunked head runs (``labels`` given and grad enabled) it is
``None``, unless the plan option ``keep_logits=True`` asks for them (then the chunks' logits are
returned detached and concatenated: memory for one copy in the model's dtype, no autograd graph).
Without ``labels`` or under ``torch.no_grad()`` (evaluation, ``generate``) the model runs
unchanged and returns its logits. Hugging Face ``Trainer`` reads ``outputs.loss`` and passes
``num_items_in_batch``: handled. TRL's ``SFTTrainer`` (1.x) installs its own fused LM head and
calls the model with ``fused_lm_head=True``; such calls run unchanged (no full logits either).
PEFT works (the head is installed on the ``PeftModel``'s base model; a LoRA ``lm_head`` runs
per chunk like any other module).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, PolicyError
from .checkpoint import checkpoint
from .decisions import override_forward

__all__ = [
    "CHUNKED_RTOL",
    "DEFAULT_CHUNK_BYTES",
    "HEAD_NAME",
    "chunk_tokens",
    "check_head_options",
    "chunked_causal_lm_loss",
    "head_options",
    "install_chunked_head",
    "loss_target",
]

#: The plan option value that selects this head (``loss_head="chunked"``).
HEAD_NAME = "chunked"

#: With ``loss_chunk`` not given, a chunk holds as many tokens as fit this many bytes of float32
#: logits: 256 MiB is 523 tokens of a 128,256-word vocabulary (Llama 3), 2,048 of a 32,000 one.
#: The backward transient is a few of these (logits, their fp32 copy, the softmax gradient).
DEFAULT_CHUNK_BYTES = 256 << 20

#: Relative tolerance (of the largest gradient magnitude) within which chunked losses and their
#: gradients equal the unchunked ones in float32; only the summation order differs.
CHUNKED_RTOL = 1e-5


# -- options -----------------------------------------------------------------------------------


def head_options(options: dict[str, Any]) -> dict[str, Any]:
    """Take ``loss_head``, ``loss_chunk`` and ``keep_logits`` out of ``enable``'s options, validated.

    Args:
        options: the keyword options given to ``enable``; the three keys are removed from it.

    Returns:
        What the plan's ``options`` should carry (only the keys that were given).

    Example:
        >>> opts = {"loss_head": "chunked", "loss_chunk": 1024}
        >>> head_options(opts), opts
        ({'loss_head': 'chunked', 'loss_chunk': 1024}, {})
    """
    out: dict[str, Any] = {}
    if "loss_head" in options:
        value = options.pop("loss_head")
        if value is not None and value is not False:
            if value is True:
                value = HEAD_NAME
            if value != HEAD_NAME:
                raise PolicyError(
                    f"loss_head must be {HEAD_NAME!r} (or None for the model's own), got {value!r}"
                )
            out["loss_head"] = HEAD_NAME
    if "loss_chunk" in options:
        value = options.pop("loss_chunk")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PolicyError(f"loss_chunk is a number of tokens >= 1, got {value!r}")
        out["loss_chunk"] = value
    if "keep_logits" in options:
        value = options.pop("keep_logits")
        if not isinstance(value, bool):
            raise PolicyError(f"keep_logits must be True or False, got {value!r}")
        out["keep_logits"] = value
    return out


def check_head_options(options: Mapping[str, Any]) -> None:
    """Refuse a plan's ``loss_chunk``/``keep_logits`` without a loss head to apply them to."""
    if ("loss_chunk" in options or "keep_logits" in options) and not options.get("loss_head"):
        raise PolicyError("loss_chunk and keep_logits need loss_head='chunked' (or policy='lean')")


def chunk_tokens(vocab: int, options: Mapping[str, Any]) -> int:
    """Tokens per chunk: the ``loss_chunk`` option, else what ``DEFAULT_CHUNK_BYTES`` holds."""
    given = options.get("loss_chunk")
    if isinstance(given, int) and not isinstance(given, bool) and given >= 1:
        return given
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(1, vocab)))


# -- the loss ----------------------------------------------------------------------------------


LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    head: LogitsFn,
    labels: torch.Tensor | None,
    *,
    chunk: int,
    num_items_in_batch: Any = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    keep_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' ``ForCausalLMLoss(head(hidden), labels, ...)`` without full logits.

    Args:
        hidden: ``(..., tokens, hidden_size)`` states the model's ``lm_head`` would receive.
        head: hidden -> logits (the ``lm_head`` and whatever the model applies after it).
        labels: ``(..., tokens)`` token ids, shifted here as transformers does; or None when
            ``shift_labels`` is given.
        chunk: tokens per chunk (of the flattened batch x sequence).
        num_items_in_batch: when given (Trainer, gradient accumulation), the summed loss is
            divided by it instead of averaged over the non-ignored tokens.
        keep_logits: also return the logits, detached, in ``head``'s dtype.

    Returns:
        ``(loss, logits or None)``.
    """
    if shift_labels is None:
        if labels is None:
            raise ConfigError("the chunked loss needs labels or shift_labels")
        padded = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    if targets.numel() != flat_h.shape[0]:
        raise ConfigError(
            f"labels hold {targets.numel()} tokens but the model produced {flat_h.shape[0]} "
            "hidden states: give labels shaped like input_ids (and no logits_to_keep)"
        )

    def one_chunk(h: torch.Tensor, y: torch.Tensor) -> Any:
        logits = head(h)
        total = F.cross_entropy(logits.float(), y, ignore_index=ignore_index, reduction="sum")
        return (total, logits.detach()) if keep_logits else total

    parts: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    # split, not slicing: one SplitBackward concatenates the chunks' gradients once, where each
    # slice's backward would write its gradient into a zero tensor of the whole hidden states
    # (chunks x tokens x hidden bytes of traffic: 765 such tensors at 400K tokens).
    for h, y in zip(flat_h.split(chunk), targets.split(chunk)):
        if torch.is_grad_enabled() and h.requires_grad:
            out = checkpoint(one_chunk, h, y)
        else:
            out = one_chunk(h, y)
        if keep_logits:
            parts.append(out[0])
            kept.append(out[1])
        else:
            parts.append(out)
    total = torch.stack(parts).sum() if len(parts) > 1 else parts[0]
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    else:
        loss = total / (targets != ignore_index).sum()
    logits = None
    if keep_logits:
        logits = torch.cat(kept).reshape(*hidden.shape[:-1], -1)
    return loss, logits


# -- installing it on a Hugging Face causal LM ---------------------------------------------------


def loss_target(model: nn.Module) -> nn.Module:
    """The module whose forward takes ``labels`` and calls the output embedding.

    A ``PeftModel`` forwards to its base model (``get_base_model()``), whose forward is the one
    that calls ``lm_head``; any other model is its own target.

    Raises:
        ConfigError: the model has no output embedding (not a causal LM).
    """
    target = model
    base = getattr(model, "get_base_model", None)
    if callable(base):
        inner = base()
        if isinstance(inner, nn.Module):
            target = inner
    get_out = getattr(target, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if not isinstance(head, nn.Module):
        raise ConfigError(
            f"loss_head='chunked' needs a causal language model with an output embedding "
            f"(get_output_embeddings(), the lm_head); {type(target).__name__} has none: leave "
            "loss_head out for this model"
        )
    return target


def _post_logits(target: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model's forward does to logits between ``lm_head`` and the loss (see module doc)."""
    config = getattr(target, "config", None)
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(target, "logit_scale", None)  # Cohere: logits * self.logit_scale
    divide = getattr(config, "logits_scaling", None)  # Granite: logits / config.logits_scaling

    def post(logits: torch.Tensor) -> torch.Tensor:
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        if isinstance(divide, (int, float)) and not isinstance(divide, bool):
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return post


class _Capture:
    """Stands in for ``lm_head.forward`` during one model forward: keeps its input, returns no logits."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] = []

    def __call__(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.hidden.append(hidden)
        # (..., tokens, 0): what follows in the model's forward (softcapping, .float()) runs on
        # an empty tensor, and the output's logits field is dropped afterwards.
        return hidden.new_empty((*hidden.shape[:-1], 0))


def install_chunked_head(model: nn.Module, options: Mapping[str, Any]) -> Callable[[], None]:
    """Run ``model``'s loss through ``chunked_causal_lm_loss``; return the function that undoes it.

    Called by ``apply.install`` for plans with ``loss_head="chunked"``. The target's ``forward``
    is overridden on the instance (its parameters and ``state_dict`` are untouched).
    """
    try:
        target = loss_target(model)
    except ConfigError:
        if options.get("loss_head_optional"):  # policy lean on a model without an lm_head
            return lambda: None
        raise
    head = target.get_output_embeddings()  # type: ignore[operator]
    forward = target.forward
    try:
        sig: inspect.Signature | None = inspect.signature(forward)
    except (TypeError, ValueError):
        sig = None
    keep_logits = bool(options.get("keep_logits", False))
    post = _post_logits(target)
    vocab = int(getattr(getattr(target, "config", None), "vocab_size", 0) or 0)
    chunk = chunk_tokens(vocab or int(getattr(head, "out_features", 0) or 0), options)
    coef = getattr(target, "router_aux_loss_coef", None)

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        return post(head(h))

    def chunked_forward(*args: Any, **kwargs: Any) -> Any:
        labels, rest, kw = _take_labels(sig, args, kwargs)
        shift = kw.get("shift_labels")
        if (labels is None and shift is None) or not torch.is_grad_enabled():
            return forward(*args, **kwargs)  # evaluation, generate: the model's own head
        if kw.get("fused_lm_head"):
            # TRL's SFTTrainer (>= 1.x) patches in its own fused LM head and asks for it with
            # fused_lm_head=True: it builds no full logits either, so it runs as it is.
            return forward(*args, **kwargs)
        capture = _Capture()
        had = "forward" in head.__dict__
        old = head.__dict__.get("forward")
        head.forward = capture
        try:
            out = forward(*rest, **kw)
        finally:
            if had:
                head.forward = old
            else:
                head.__dict__.pop("forward", None)
        if len(capture.hidden) != 1:
            raise ConfigError(
                f"loss_head='chunked': {type(target).__name__}'s forward called its output "
                f"embedding {len(capture.hidden)} times (expected once); leave loss_head out "
                "for this model"
            )
        loss, logits = chunked_causal_lm_loss(
            capture.hidden[0],
            logits_of,
            labels,
            chunk=chunk,
            num_items_in_batch=kw.get("num_items_in_batch"),
            ignore_index=kw.get("ignore_index", -100),
            shift_labels=shift,
            keep_logits=keep_logits,
        )
        aux = getattr(out, "aux_loss", None)
        if isinstance(aux, torch.Tensor) and isinstance(coef, (int, float)):
            loss = loss + coef * aux.to(loss.device)
        return _with_loss(out, loss, logits)

    return override_forward(target, chunked_forward)


def _take_labels(
    sig: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """``labels`` out of a forward call (keyword or positional), and the call without them."""
    kwargs = dict(kwargs)
    if "labels" in kwargs:
        return kwargs.pop("labels"), args, kwargs
    if sig is None or not args:
        return None, args, kwargs
    names = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if "labels" not in names or names.index("labels") >= len(args):
        return None, args, kwargs
    i = names.index("labels")
    # Pass everything from labels on by name, so positions after it stay right.
    rest = {n: a for n, a in zip(names[i + 1 :], args[i + 1 :])}
    return args[i], args[:i], {**kwargs, **rest}


def _with_loss(out: Any, loss: torch.Tensor, logits: torch.Tensor | None) -> Any:
    """The model's output with the chunked ``loss`` and ``logits`` (None: not kept) put in.

    A ``ModelOutput`` is rebuilt without its (empty) logits: setting a field to None on one
    leaves the old value in its dict view, which ``out["logits"]`` and ``to_tuple()`` read.
    """
    if isinstance(out, Mapping) and hasattr(out, "loss"):
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        cls: Any = type(out)
        return cls(loss=loss, logits=logits, **fields)
    if isinstance(out, tuple):  # return_dict=False: (logits, ...) -> (loss, [logits,] ...)
        return (loss, *((logits,) if logits is not None else ()), *out[1:])
    raise ConfigError(
        f"loss_head='chunked': the model returned a {type(out).__name__}, not a ModelOutput or "
        "tuple; leave loss_head out for this model"
    )
