"""QLoRA's 4-bit NormalFloat (NF4) weights in plain PyTorch, laid out as bitsandbytes stores them.

bitsandbytes cannot be installed here (and needs CUDA), so QLoRA is modelled explicitly, byte for
byte against bitsandbytes' ``Linear4bit`` with ``bnb_4bit_quant_type="nf4"`` and
``bnb_4bit_use_double_quant=True`` (Dettmers et al. 2023, "QLoRA", section 3; without double
quantization the absmax values stay fp32, 4 bytes per 64 weights):

* weights: two 4-bit codes per byte, ``numel / 2`` bytes (``uint8``);
* first-level constants: one absmax per block of 64 weights, itself quantized to 8 bits
  (``numel / 64`` bytes) with one fp32 scale per 256 absmax values and one fp32 mean offset
  ("double quantization", 0.127 bits per parameter instead of 0.5);
* compute: the layer dequantizes its weight to the compute dtype (bf16) right before the matmul
  and frees it right after, in forward and again in backward; only the base layer's input is
  not saved (the frozen weight needs no gradient), exactly like ``bnb.matmul_4bit``.

The dequantization is one custom op (``gradckpt::nf4_dequantize``) so that under fake tensors
and in ``gradckpt.measure`` it shows up as what the CUDA kernel is: one op that reads the packed
weight and writes one compute-dtype weight. On CPU it really dequantizes (chunked, so its own
temporaries stay small); the second-level quantization of the absmax values is linear 8-bit per
256 values rather than bitsandbytes' dynamic 8-bit map (same bytes, slightly different rounding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["NF4_CODE", "NF4Linear", "nf4_bytes", "quantize_linears"]

#: The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero
#: (QLoRA appendix E; the table bitsandbytes ships as ``get_4bit_type("nf4")``).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCK = 64  # weights per absmax (bitsandbytes' default blocksize for 4-bit)
BLOCK2 = 256  # absmax values per second-level fp32 scale (double quantization)
_CHUNK = 1 << 16  # blocks dequantized at a time on CPU, bounding the kernel's own temporaries


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Device bytes bitsandbytes keeps for an NF4 weight of ``numel`` values.

    Example:
        >>> nf4_bytes(4096 * 4096)  # 8 MiB of codes + 256 KiB of 8-bit absmax + 4 KiB of scales + 4 B
        8654852
        >>> nf4_bytes(4096 * 4096, double_quant=False)  # 8 MiB of codes + 1 MiB of fp32 absmax
        9437184
    """
    blocks = _ceil_div(numel, BLOCK)
    if not double_quant:
        return _ceil_div(numel, 2) + 4 * blocks
    return _ceil_div(numel, 2) + blocks + 4 * _ceil_div(blocks, BLOCK2) + 4


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


@torch.library.custom_op("gradckpt::nf4_dequantize", mutates_args=())
def nf4_dequantize(
    packed: torch.Tensor,
    absmax_q: torch.Tensor,
    absmax_scale: torch.Tensor,
    absmax_offset: torch.Tensor,
    rows: int,
    cols: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize an NF4 weight to a ``(rows, cols)`` tensor of ``dtype``."""
    numel = rows * cols
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=packed.device)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    blocks = absmax_q.numel()
    for b0 in range(0, blocks, _CHUNK):
        b1 = min(blocks, b0 + _CHUNK)
        if absmax_q.dtype == torch.float32:  # no double quantization: fp32 absmax as stored
            absmax = absmax_q[b0:b1]
        else:  # second level: 8-bit absmax -> fp32 absmax
            q = absmax_q[b0:b1].to(torch.float32) - 128.0
            scale = absmax_scale[torch.arange(b0, b1, device=packed.device) // BLOCK2]
            absmax = q / 127.0 * scale + absmax_offset
        e0, e1 = b0 * BLOCK, min(numel, b1 * BLOCK)
        p = packed[e0 // 2 : _ceil_div(e1, 2)]
        idx = torch.stack((p >> 4, p & 15), dim=-1).flatten()[: e1 - e0].long()
        vals = code[idx]
        pad = (b1 - b0) * BLOCK - (e1 - e0)
        if pad:
            vals = torch.cat((vals, vals.new_zeros(pad)))
        out[e0:e1] = (vals.view(-1, BLOCK) * absmax[:, None]).flatten()[: e1 - e0].to(dtype)
    return out.view(rows, cols)


@nf4_dequantize.register_fake
def _nf4_dequantize_fake(
    packed: torch.Tensor,
    absmax_q: torch.Tensor,
    absmax_scale: torch.Tensor,
    absmax_offset: torch.Tensor,
    rows: int,
    cols: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return packed.new_empty((rows, cols), dtype=dtype)


def quantize_nf4(
    weight: torch.Tensor, double_quant: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight to NF4, with double quantization of the absmax values or without.

    Args:
        weight: any floating tensor (real or fake).
        double_quant: ``bnb_4bit_use_double_quant``; without it the absmax values stay fp32
            (``absmax_q`` is then fp32 and the scale and offset are empty).

    Returns:
        ``(packed uint8 [ceil(n/2)], absmax_q uint8 [blocks], absmax_scale fp32 [ceil(blocks/256)],
        absmax_offset fp32 [1])``. Under fake tensors only the shapes are produced.
    """
    numel = weight.numel()
    blocks = _ceil_div(numel, BLOCK)
    dev = weight.device
    if _is_fake(weight) or weight.device.type == "meta":
        if not double_quant:
            return (
                torch.empty(_ceil_div(numel, 2), dtype=torch.uint8, device=dev),
                torch.empty(blocks, dtype=torch.float32, device=dev),
                torch.empty(0, dtype=torch.float32, device=dev),
                torch.empty(0, dtype=torch.float32, device=dev),
            )
        return (
            torch.empty(_ceil_div(numel, 2), dtype=torch.uint8, device=dev),
            torch.empty(blocks, dtype=torch.uint8, device=dev),
            torch.empty(_ceil_div(blocks, BLOCK2), dtype=torch.float32, device=dev),
            torch.empty(1, dtype=torch.float32, device=dev),
        )
    with torch.no_grad():
        flat = weight.detach().to(torch.float32).flatten()
        pad = blocks * BLOCK - numel
        if pad:
            flat = torch.cat((flat, flat.new_zeros(pad)))
        b = flat.view(blocks, BLOCK)
        absmax = b.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=dev)
        mids = (code[1:] + code[:-1]) / 2
        idx = torch.bucketize(b / absmax[:, None], mids).to(torch.uint8).flatten()[:numel]
        if numel % 2:
            idx = torch.cat((idx, idx.new_zeros(1)))
        packed = (idx[0::2] << 4) | idx[1::2]
        if not double_quant:
            empty = absmax.new_zeros(0)
            return packed.contiguous(), absmax, empty, empty.clone()
        offset = absmax.mean().reshape(1)
        centred = absmax - offset
        blocks2 = _ceil_div(blocks, BLOCK2)
        c = torch.cat((centred, centred.new_zeros(blocks2 * BLOCK2 - blocks))).view(blocks2, BLOCK2)
        scale = c.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(c / scale[:, None] * 127.0).flatten()[:blocks] + 128.0
        return packed.contiguous(), q.to(torch.uint8), scale, offset


class _MatMul4Bit(torch.autograd.Function):
    """``x @ dequant(W).T + b`` saving nothing for backward but the layer (like ``bnb.matmul_4bit``)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, layer: NF4Linear, bias: torch.Tensor | None
    ) -> torch.Tensor:
        w = layer.dequantize(x.dtype)
        out = nn.functional.linear(x, w, bias)
        del w  # the dequantized weight is a temporary, freed before the next layer runs
        ctx.layer = layer
        ctx.has_bias = bias is not None and bias.requires_grad
        if layer.keeps_input and any(ctx.needs_input_grad):
            # bitsandbytes < 0.44: ``ctx.tensors = (A, B)`` kept the input although backward
            # never reads it; a plain attribute, so checkpointing's saved-tensor hooks do not
            # see it either (0.44.0 stores ``(None, B)``)
            ctx.kept_input = x
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = ctx.layer.dequantize(grad.dtype)
            grad_x = grad @ w
            del w
        grad_b = grad.flatten(0, -2).sum(0) if ctx.has_bias else None
        return grad_x, None, grad_b


class NF4Linear(nn.Linear):
    """A frozen linear layer whose weight is stored in NF4 (bitsandbytes ``Linear4bit`` layout).

    It subclasses ``nn.Linear`` so that peft's LoRA wraps it like any linear layer. ``weight``
    is the packed ``uint8`` codes (a frozen parameter, as bitsandbytes' ``Params4bit``); the
    quantization constants are buffers. ``forward`` casts its input to ``compute_dtype``, runs
    the matmul on the dequantized weight and casts back, as ``Linear4bit.forward`` does.
    """

    def __init__(
        self,
        linear: nn.Module,
        compute_dtype: torch.dtype,
        keeps_input: bool = False,
        double_quant: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        #: keep the (compute-dtype) input until backward, as bitsandbytes < 0.44 did
        self.keeps_input = keeps_input
        weight = linear.weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{type(linear).__name__} has no weight tensor to quantize")
        if isinstance(linear, nn.Linear):
            self.in_features, self.out_features = linear.in_features, linear.out_features
        else:  # transformers' Conv1D (GPT-2): weight is (in, out); bitsandbytes transposes it
            self.in_features, self.out_features = int(weight.shape[0]), int(weight.shape[1])
            weight = weight.t()
        self.compute_dtype = compute_dtype
        packed, absmax_q, absmax_scale, absmax_offset = quantize_nf4(weight, double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("absmax_q", absmax_q)
        self.register_buffer("absmax_scale", absmax_scale)
        self.register_buffer("absmax_offset", absmax_offset)
        self.bias = linear.bias  # type: ignore[assignment]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a ``(out_features, in_features)`` tensor of ``dtype`` (default: compute dtype)."""
        return torch.ops.gradckpt.nf4_dequantize(
            self.weight,
            self.absmax_q,
            self.absmax_scale,
            self.absmax_offset,
            self.out_features,
            self.in_features,
            dtype or self.compute_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = _MatMul4Bit.apply(x.to(self.compute_dtype), self, bias)
        return out.to(in_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, compute={self.compute_dtype}"


def _quantizable(mod: nn.Module) -> bool:
    return type(mod) is nn.Linear or type(mod).__name__ == "Conv1D"


def quantize_linears(
    model: nn.Module,
    compute_dtype: torch.dtype,
    skip: tuple[str, ...] = (),
    keeps_input: bool = False,
    double_quant: bool = True,
) -> int:
    """Replace every linear layer of ``model`` (except modules named in ``skip``) by an ``NF4Linear``.

    Linear layers are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2): the two kinds
    transformers' bitsandbytes integration quantizes. It keeps the output embedding
    (``lm_head``) unquantized: pass its name in ``skip`` to do the same. ``keeps_input``: each
    layer keeps its input until backward, as bitsandbytes before 0.44.0 did; ``double_quant``:
    ``bnb_4bit_use_double_quant``. Returns the number of layers replaced.
    """
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if _quantizable(mod) and name not in skip and name.rpartition(".")[2] not in skip
    ]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear(mod, compute_dtype, keeps_input, double_quant))
    return len(targets)
