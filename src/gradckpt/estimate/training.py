"""Training setups: full fine-tune, LoRA or QLoRA; precision; optimizer and the bytes of its states."""

from __future__ import annotations

import difflib
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from .._optional import require
from ..errors import ConfigError
from .compat import deprecated_csv
from .vision import parse_image_size

__all__ = [
    "ADAPTER_DTYPES",
    "ATTENTION",
    "CHUNKED_LOSSES",
    "HF_LOSSES",
    "METHODS",
    "OPTIMIZERS",
    "PRECISIONS",
    "TrainingSetup",
    "apply_method",
    "optimizer_state_bytes",
]

METHODS = ("full", "lora", "qlora")
#: ``bf16``: weights, gradients and (torch AdamW's) optimizer states in bf16; forward under bf16
#: autocast, as ``Trainer(bf16=True)`` runs a bf16 model (LoRA adapters, fp32, then compute in bf16).
#: ``mixed``: fp32 master weights, gradients and states, forward under bf16 autocast
#: (what ``Trainer(bf16=True)`` does with an fp32 model).
#: ``fp32``: everything in fp32, no autocast.
#: ``bf16-true``: bf16 weights, gradients and states and no autocast: the model is loaded in
#: bf16 and run as it is (Lightning's ``precision="bf16-true"``, torchtune's ``dtype: bf16``,
#: PEFT's MetaMathQA benchmark with ``use_amp: false``). Ops run in their inputs' dtypes, so
#: an fp32 adapter or an fp32 upcast (norms, the loss) stays fp32 downstream instead of
#: autocast casting it back to bf16 before the next matmul.
PRECISIONS = ("bf16", "mixed", "fp32", "bf16-true")
#: LoRA adapter weights: ``fp32`` (peft's default, ``autocast_adapter_dtype=True``: adapters
#: over a bf16 base are created in fp32) or ``weights`` (the base weights' dtype: peft with
#: ``autocast_adapter_dtype=False``, lit-gpt, torchtune).
ADAPTER_DTYPES = ("fp32", "weights")
#: The causal-LM loss: ``transformers`` (the installed release's own, default; from 4.49 it
#: upcasts the logits to fp32 and pads the labels) or ``shift-copy`` (transformers before
#: 4.49: fp32 logits plus a contiguous fp32 copy of the shifted logits, both alive through the
#: cross entropy; read in the 4.46.3 and 4.48.3 wheels' ``ForCausalLMLoss``).
#: ``chunked``: gradckpt's chunked loss head (``loss_head="chunked"``) under every policy: full
#: logits never exist. ``liger``: a model patched by Liger-Kernel's fused linear cross-entropy
#: (or Unsloth's chunked loss), estimated as the chunked head: it too holds one chunk's logits
#: at a time; it computes the head's gradients in forward and so runs no second ``lm_head``
#: forward, which the chunked head does (the estimate's time is an upper bound for it).
HF_LOSSES = ("transformers", "shift-copy", "chunked", "liger")
#: The losses computed by a chunked head (the plan option ``loss_head="chunked"``).
CHUNKED_LOSSES = ("chunked", "liger")
#: ``adamw``: torch.optim.AdamW, fused: 2 states per trainable parameter in its dtype.
#: ``adamw-8bit``: bitsandbytes AdamW8bit: 2 uint8 states + one fp32 absmax per 256 values for
#: tensors of >= 4096 values (``min_8bit_size``), 2 fp32 states for smaller ones.
#: ``sgd``: no state. ``sgd-momentum``: one momentum buffer per trainable parameter.
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd", "sgd-momentum")
ATTENTION = ("sdpa", "flash", "eager")


def _choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    close = difflib.get_close_matches(str(value).lower(), choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown {what} {value!r}{hint}; choose one of: {', '.join(choices)}")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ConfigError(f"{what} must be >= 1, got {value}")
    return value


@dataclass(frozen=True, kw_only=True)
class TrainingSetup:
    """How the model is trained: everything except the checkpointing policy.

    Attributes:
        method: ``"full"`` (every parameter trained), ``"lora"`` (frozen base, LoRA adapters via
            peft) or ``"qlora"`` (LoRA on an NF4-quantized base, see ``estimate.nf4``).
        batch: micro-batch size (sequences per forward).
        seq: tokens per sequence.
        grad_accum: micro-batches per optimizer step; > 1 keeps gradients alive through the
            forward passes, so they count at the peak.
        precision: ``"bf16"``, ``"mixed"`` or ``"fp32"`` (see ``PRECISIONS``).
        optimizer: ``"adamw"``, ``"adamw-8bit"``, ``"sgd"`` or ``"sgd-momentum"``.
        attention: ``"sdpa"`` (transformers' SDPA path, as on a GPU), ``"flash"``
            (flash-attention-2: one fused kernel, no mask, output + logsumexp kept) or
            ``"eager"`` (seq x seq scores kept).
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (scaling only: no effect on memory).
        lora_dropout: dropout on the adapter input (peft's default 0.0; > 0 keeps a mask and
            a dropped copy of each adapted layer's input).
        lora_targets: module names to adapt (a list, or one name), or ``"all-linear"`` (every
            linear but the output layer, as recommended by the QLoRA paper). A comma-separated
            string (``"q_proj,v_proj"``) is still split, with a DeprecationWarning, until the
            next release.
        adapter_dtype: ``"fp32"`` (peft's default) or ``"weights"`` (see ``ADAPTER_DTYPES``).
        kbit_prep: QLoRA only: run peft's ``prepare_model_for_kbit_training`` on the quantized
            model, as the QLoRA recipes of peft, TRL and the QLoRA paper's ``qlora.py`` do (the
            default). It casts every parameter that is not quantized (embeddings, norms,
            ``lm_head``) to fp32, so the logits come out of an fp32 ``lm_head``. False: they
            stay in the weights' dtype (torchtune, lit-gpt, Unsloth's own path).
        nf4_keeps_input: QLoRA only: each 4-bit layer keeps its input until backward, as
            bitsandbytes up to 0.43 did (``MatMul4Bit`` stored ``ctx.tensors = (A, B)``; 0.44.0
            stores ``(None, B)``). Default False: current bitsandbytes.
        nf4_double_quant: QLoRA only: ``bnb_4bit_use_double_quant`` (default True, as the QLoRA
            paper and peft's QLoRA examples set it; False keeps fp32 absmax values, 0.5 bits
            per weight instead of 0.127).
        hf_loss: ``"transformers"``, ``"shift-copy"``, ``"chunked"`` or ``"liger"`` (see
            ``HF_LOSSES``).
        image_size: vision-language models: the images' size in pixels, ``(height, width)``
            (``448`` or ``"448x336"`` are read too; see ``estimate.vision``). None: a text model.
        images: images per sequence (VLMs; default 1).
    """

    method: str = "full"
    batch: int = 1
    seq: int = 2048
    grad_accum: int = 1
    precision: str = "bf16"
    optimizer: str = "adamw"
    attention: str = "sdpa"
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | str = "all-linear"
    adapter_dtype: str = "fp32"
    kbit_prep: bool = True
    nf4_keeps_input: bool = False
    nf4_double_quant: bool = True
    hf_loss: str = "transformers"
    image_size: tuple[int, int] | None = None
    images: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", _choice(self.method, METHODS, "method"))
        object.__setattr__(self, "precision", _choice(self.precision, PRECISIONS, "precision"))
        object.__setattr__(self, "optimizer", _choice(self.optimizer, OPTIMIZERS, "optimizer"))
        object.__setattr__(self, "attention", _choice(self.attention, ATTENTION, "attention"))
        object.__setattr__(
            self, "adapter_dtype", _choice(self.adapter_dtype, ADAPTER_DTYPES, "adapter dtype")
        )
        object.__setattr__(self, "hf_loss", _choice(self.hf_loss, HF_LOSSES, "hf_loss"))
        for flag in ("kbit_prep", "nf4_keeps_input", "nf4_double_quant"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        _positive_int(self.batch, "batch")
        _positive_int(self.seq, "sequence length")
        _positive_int(self.grad_accum, "grad_accum")
        _positive_int(self.lora_rank, "lora_rank")
        _positive_int(self.images, "images")
        if self.image_size is not None:
            object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or self.lora_alpha <= 0
        ):
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        targets = self.lora_targets
        if isinstance(targets, str):
            targets = targets.strip()
            if "," in targets:
                names = deprecated_csv(targets, "lora_targets", "['q_proj', 'v_proj']")
                targets = tuple(t for t in names if t)
            elif targets != "all-linear":
                targets = (targets,) if targets else ()
        else:
            targets = tuple(str(t) for t in targets)
        if not targets:
            raise ConfigError(
                "lora_targets is empty: name modules to adapt (e.g. q_proj and v_proj) or use 'all-linear'"
            )
        object.__setattr__(self, "lora_targets", targets)

    # -- derived ------------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype the model's (non-quantized) weights are stored in."""
        return torch.bfloat16 if self.precision in ("bf16", "bf16-true") else torch.float32

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype matmuls run in (bf16 under autocast, fp32 for ``fp32``)."""
        return torch.float32 if self.precision == "fp32" else torch.bfloat16

    @property
    def autocast(self) -> bool:
        """Whether the forward runs under bf16 autocast (``bf16`` and ``mixed``)."""
        return self.precision in ("bf16", "mixed")

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step: batch x seq x grad_accum."""
        return self.batch * self.seq * self.grad_accum

    def with_(self, **changes: Any) -> TrainingSetup:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready data (``lora_targets`` a list, or ``"all-linear"``)."""
        targets = self.lora_targets
        out = {
            **asdict(self),
            "lora_targets": targets if isinstance(targets, str) else list(targets),
        }
        if self.image_size is None:  # a text model's setup: no image fields
            del out["image_size"], out["images"]
        else:
            out["image_size"] = list(self.image_size)
        return out


_MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer8bit: smaller tensors keep 32-bit states
_8BIT_BLOCK = 256  # bitsandbytes blockwise 8-bit optimizers: one fp32 absmax per 256 values


def optimizer_state_bytes(params: list[nn.Parameter] | list[torch.Tensor], optimizer: str) -> int:
    """Bytes of optimizer state for the trainable tensors ``params`` (after the first step).

    torch's AdamW and SGD allocate their states with ``zeros_like(param)``: same dtype as the
    parameter (bf16 under pure bf16 training, fp32 with fp32 master weights).

    Example:
        >>> optimizer_state_bytes([torch.zeros(10, dtype=torch.float32)], "adamw")
        80
    """
    total = 0
    for p in params:
        n = p.numel()
        if optimizer == "adamw":
            total += 2 * n * p.element_size()
        elif optimizer == "sgd-momentum":
            total += n * p.element_size()
        elif optimizer == "adamw-8bit":
            if n >= _MIN_8BIT_SIZE:
                total += 2 * (n + 4 * -(-n // _8BIT_BLOCK))
            else:
                total += 2 * 4 * n
        elif optimizer == "sgd":
            pass
        else:  # pragma: no cover - validated by TrainingSetup
            raise ConfigError(f"unknown optimizer {optimizer!r}")
    return total


def apply_method(model: nn.Module, setup: TrainingSetup) -> tuple[nn.Module, list[str]]:
    """Make ``model`` trainable as ``setup`` says (freeze, quantize, add LoRA).

    Runs the real peft code (``get_peft_model``), so adapter dtypes and the casts peft inserts
    are what users get: peft keeps adapters in fp32 over a bf16 base (``autocast_adapter_dtype``)
    and casts each adapted layer's input to fp32 for them. Call it inside the ``FakeTensorMode``
    the model was built in (or on a real model).

    Returns:
        ``(model, notes)``: the model to train (a ``PeftModel`` for LoRA/QLoRA) and notes on
        what was modelled.
    """
    notes: list[str] = []
    if setup.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, notes
    peft = require("peft", "hf", purpose="LoRA/QLoRA estimates")
    for p in model.parameters():
        p.requires_grad_(False)
    if setup.method == "qlora":
        from .nf4 import quantize_linears

        get_out = getattr(model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else None
        skip = tuple(n for n, m in model.named_modules() if out is not None and m is out)
        quantize_linears(
            model,
            setup.compute_dtype,
            skip=skip,
            keeps_input=setup.nf4_keeps_input,
            double_quant=setup.nf4_double_quant,
        )
        kept = str(setup.weight_dtype).removeprefix("torch.")
        if setup.kbit_prep:
            # peft's own function: it casts every bf16/fp16 parameter that is not 4-bit to
            # fp32 (our NF4 codes are uint8, untouched). Checkpointing is gradckpt's to set.
            peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            kept = "fp32 (peft's prepare_model_for_kbit_training)"
        notes.append(
            "QLoRA: the blocks' linear layers stored as NF4 "
            + ("with double quantization " if setup.nf4_double_quant else "with fp32 absmax ")
            + "(bitsandbytes layout, modelled in plain PyTorch: bitsandbytes needs CUDA); "
            f"embeddings, norms and the output layer in {kept}"
        )
    targets: Any = setup.lora_targets
    cfg = peft.LoraConfig(
        r=setup.lora_rank,
        lora_alpha=setup.lora_alpha,
        lora_dropout=setup.lora_dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
    )
    peft_kwargs = {"autocast_adapter_dtype": setup.adapter_dtype == "fp32"}
    try:
        with warnings.catch_warnings():
            # GPT-2's Conv1D layers: peft switches fan_in_fan_out on by itself, and says so
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            # peft reads transformers' renamed is_gradient_checkpointing flag
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(model, cfg, **peft_kwargs)
    except ValueError as e:
        raise ConfigError(
            f"LoRA targets {targets!r} do not match this model's modules: {e}"
        ) from None
    return model, notes
