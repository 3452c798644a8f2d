"""Sequence tiles: a checkpointed block's token-wise MLP runs ``tile_tokens`` tokens at a time.

At long context what is left of a block's memory after ``full`` is its recompute's transient:
the MLP's intermediates (Llama 3 8B: gate, up and their product, 3 x 14,336 wide, 0.34 MB per
token in bf16 for one block) are all saved for the block's backward at once. With the plan
option ``tile_tokens=N`` the MLP of every RECOMPUTE/OFFLOAD block is run over sequence tiles of
``N`` tokens (of batch x sequence taken as one axis), each tile inside its own (nested, non-reentrant) checkpoint: forward, the block's
recompute and the MLP's backward hold one tile's intermediates at a time, not the sequence's.
This is ALST's TiledMLP (Snowflake, arXiv:2506.13996) expressed with torch's checkpoint.

The MLP is token-wise (each token's output depends on that token's input only), so tiles along
the sequence give the same values; gradients differ only in the order of the sums over tokens
of the weight gradients: equal within rounding (``verify``'s tolerance), not bit-identical.

Cost: no FLOPs beyond ``full``'s (exact counts in ``tests/test_tiles.py``). The tile loop is
itself one checkpoint around the MLP, so the block's recompute stops (torch's early stop) when it
has saved the MLP's input, without running the MLP, when nothing after the MLP saves tensors
(Llama, Qwen2, Mistral, Mixtral: a residual add follows); during that loop's own recompute the
tiles are not computed either (only their saved inputs, slices of the MLP's input, are needed,
so a placeholder stands in for each tile's output, which torch discards); each tile's own
recompute then runs its MLP once, up to the output projection, as ``full``'s recompute does.
A block with a saving op after its MLP (Gemma 2's post-feed-forward norm) runs the MLP once
more in its recompute, as ``full`` does, plus the tiles' recompute: one more MLP forward.

With ``tile_norms=True`` (policy ``lean``) the block's norms are tiled the same way
(``TILED_NORM_ATTRS``): their float32 intermediates are then a tile's, at the price of one more
norm forward per block in backward (pointwise, memory-bound: the norm's output is needed by the
projections after it, so the block's recompute computes it before the tiles recompute it).

With ``tile_proj=True`` (policy ``lean``) the attention's input and output projections
(``TILED_PROJ_ATTRS`` of the block's ``TILED_ATTN_ATTRS`` sub-module: ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``...) are tiled too. Each projection's own intermediates are then a tile's:
under QLoRA with peft's k-bit preparation the hidden states are float32, and each of ``q_proj``,
``k_proj`` and ``v_proj`` (their LoRA ``A`` matmul) keeps its own bfloat16 cast of the whole input
for backward (Llama 3 8B: 3 x 8 KB per token per block). FLOPs (exact counts): a plain
linear projection keeps only its input, so a tile's recompute stops before its matmul (torch's
early stop): no FLOPs beyond ``full``'s (``tests/test_tiles.py``). With LoRA adapters the
adapter's intermediate is kept too, and the base projection runs before it, so each tile's
recompute runs the base projection once more: one more forward of the projections per block
(Llama 3.1 8B QLoRA at 16K tokens: recompute FLOPs +11%, 389 -> 434 TFLOP in the estimate).

Which module is tiled: the block's attribute named in ``TILED_ATTRS`` (``mlp``, ``feed_forward``,
``ffn``), whose forward takes the hidden states ``(batch, tokens, hidden)`` first and returns one
tensor of the same leading shape (Llama, Qwen2, Mistral, Gemma 2, GPT-2, Mixtral's MoE block).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ..errors import BlockError, PolicyError
from .checkpoint import checkpoint
from .decisions import override_forward

__all__ = [
    "DEFAULT_TILE_TOKENS",
    "TILED_ATTN_ATTRS",
    "TILED_ATTRS",
    "TILED_NORM_ATTRS",
    "TILED_PROJ_ATTRS",
    "install_tiles",
    "tile_options",
    "tiled_module",
]

#: Attribute names of the token-wise part of a block, tried in this order.
TILED_ATTRS = ("mlp", "feed_forward", "ffn")

#: With ``tile_norms=True``: the block's norms, token-wise too (HF RMSNorm upcasts to float32
#: and keeps that copy for backward: 3 bytes per bf16 byte of its input, per norm).
TILED_NORM_ATTRS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "ln_1",
    "ln_2",
)

#: With ``tile_proj=True``: the block's attention sub-module (first found) and, in it, its
#: token-wise input and output projections (GPT-2's ``c_attn``/``c_proj``, fused ``qkv_proj``).
TILED_ATTN_ATTRS = ("self_attn", "attn", "attention")
TILED_PROJ_ATTRS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "c_attn", "c_proj")

#: ``tiles=True`` without ``tile_tokens``: 4,096 tokens a tile (a Llama 3 8B MLP tile's
#: intermediates are 3 x 4,096 x 14,336 x 2 bytes = 336 MiB in bf16).
DEFAULT_TILE_TOKENS = 4096


_tls = threading.local()


def _skipping() -> bool:
    return getattr(_tls, "skip", 0) > 0


@contextlib.contextmanager
def _skip_tiles() -> Iterator[None]:
    _tls.skip = getattr(_tls, "skip", 0) + 1
    try:
        yield
    finally:
        _tls.skip -= 1


def _skip_contexts() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
    """Forward: nothing; the tile loop's own recompute: skip the tiles' compute."""
    return contextlib.nullcontext(), _skip_tiles()


def _placeholder(part: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty_like(part)


def tile_options(options: dict[str, Any]) -> dict[str, Any]:
    """Take ``tile_tokens`` (or ``tiles=True``) out of ``enable``'s options, validated.

    Example:
        >>> opts = {"tile_tokens": 2048}
        >>> tile_options(opts), opts
        ({'tile_tokens': 2048}, {})
    """
    out: dict[str, Any] = {}
    for flag in ("tile_norms", "tile_proj"):
        if flag in options:
            value = options.pop(flag)
            if not isinstance(value, bool):
                raise PolicyError(f"{flag} must be True or False, got {value!r}")
            out[flag] = value
    tiles = options.pop("tiles", None)
    if tiles is not None and not isinstance(tiles, bool):
        raise PolicyError(f"tiles must be True or False, got {tiles!r}")
    if "tile_tokens" in options:
        value = options.pop("tile_tokens")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PolicyError(f"tile_tokens is a number of tokens >= 1, got {value!r}")
        if tiles is False:
            raise PolicyError("tiles=False contradicts tile_tokens=: give one of them")
        out["tile_tokens"] = value
    elif tiles:
        out["tile_tokens"] = DEFAULT_TILE_TOKENS
    return out


def tiled_module(block: nn.Module) -> nn.Module | None:
    """The block's token-wise sub-module that tiles apply to, or None."""
    for attr in TILED_ATTRS:
        sub = getattr(block, attr, None)
        if isinstance(sub, nn.Module):
            return sub
    return None


def tiled_projections(block: nn.Module) -> list[nn.Module]:
    """The block's attention projections that ``tile_proj`` tiles ([] if none found)."""
    for attr in TILED_ATTN_ATTRS:
        attn = getattr(block, attr, None)
        if isinstance(attn, nn.Module):
            return [
                m for a in TILED_PROJ_ATTRS if isinstance(m := getattr(attn, a, None), nn.Module)
            ]
    return []


def install_tiles(
    name: str, block: nn.Module, options: Mapping[str, Any]
) -> Callable[[], None] | None:
    """Run ``block``'s MLP (and norms, projections: ``tile_norms``, ``tile_proj``) over tiles.

    Called by ``apply.install`` for each RECOMPUTE/OFFLOAD block when the plan has
    ``tile_tokens``; a block without a token-wise module (``TILED_ATTRS``) is left as it is
    (None returned). Returns the function that undoes it.
    """
    tile = options.get("tile_tokens")
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        return None
    modules: list[tuple[nn.Module, str]] = []
    mlp = tiled_module(block)
    if mlp is not None:
        modules.append((mlp, "mlp"))
    if options.get("tile_norms"):
        modules += [
            (m, "norm")
            for a in TILED_NORM_ATTRS
            if isinstance(m := getattr(block, a, None), nn.Module)
        ]
    if options.get("tile_proj"):
        modules += [(m, "proj") for m in tiled_projections(block)]
    if not modules:
        return None
    undo = [
        _tile(m, f"block {name!r}'s {type(m).__name__}", tile, role=role) for m, role in modules
    ]

    def restore() -> None:
        for u in reversed(undo):
            u()

    return restore


class _Shared:
    """The input gradient the tiles of one tile loop write into, one slice each."""

    __slots__ = ("buf", "count", "done", "shape", "task")

    def __init__(self, shape: torch.Size, count: int) -> None:
        self.shape, self.count = shape, count
        self.buf: torch.Tensor | None = None
        self.done: set[int] = set()
        self.task = -1  # the backward pass (autograd graph task) the buffer belongs to


class _TileSlice(torch.autograd.Function):
    """``x.narrow(-2, start, length)`` whose backward writes into one shared input gradient.

    ``split``'s backward holds every tile's gradient until the last one arrives, then
    concatenates them: two input-sized tensors at that moment. Here each tile's gradient is
    copied into the shared buffer as it arrives and freed; the tile that completes it returns
    the buffer as the input's gradient, the others return none: one input-sized tensor. The
    values are the same (copies, no sums). The buffer belongs to one backward pass: a tile
    arriving in another pass (one that stopped before every tile had run) starts it over.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, shared: _Shared, index: int, start: int, length: int
    ) -> torch.Tensor:
        ctx.shared, ctx.index, ctx.start, ctx.length = shared, index, start, length
        return x.narrow(-2, start, length)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        s = ctx.shared
        task = torch._C._current_graph_task_id()
        if s.buf is None or s.task != task or ctx.index in s.done:
            s.buf, s.done, s.task = grad.new_empty(s.shape), set(), task
        s.buf.narrow(-2, ctx.start, ctx.length).copy_(grad)
        s.done.add(ctx.index)
        if len(s.done) < s.count:
            return None, None, None, None, None
        out, s.buf, s.done = s.buf, None, set()
        return out, None, None, None, None


def _tile_slices(rows: torch.Tensor, tile: int) -> list[torch.Tensor]:
    """``rows.split(tile, dim=-2)``, with one shared input gradient (``_TileSlice``)."""
    n = rows.shape[-2]
    starts = range(0, n, tile)
    if not rows.requires_grad:
        return list(rows.split(tile, dim=-2))
    shared = _Shared(rows.shape, len(starts))
    return [_TileSlice.apply(rows, shared, i, s, min(tile, n - s)) for i, s in enumerate(starts)]


def _norm_source(x: torch.Tensor) -> tuple[Callable[..., Any], torch.Tensor] | None:
    """(norm forward, its input) when ``x`` is the unmodified output of a tiled norm."""
    entry = getattr(_tls, "norm", None)
    if entry is None:
        return None
    out_ref, out_version, norm_forward, src_ref, src_version = entry
    src = src_ref()
    if out_ref() is not x or x._version != out_version or src is None:
        return None
    if src._version != src_version or src.shape[:-1] != x.shape[:-1]:
        return None
    return norm_forward, src


def _fused(norm_forward: Callable[..., Any], forward: Callable[..., Any]) -> Callable[..., Any]:
    def unit(part: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return forward(norm_forward(part), *args, **kwargs)

    return unit


def _no_contexts() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
    return contextlib.nullcontext(), contextlib.nullcontext()


def _tile(module: nn.Module, label: str, tile: int, *, role: str = "mlp") -> Callable[[], None]:
    """Override ``module.forward`` with its tiled run; return the undo.

    ``role``: ``"mlp"``, ``"norm"`` or ``"proj"``. A norm's or a projection's tiles make no
    data-dependent decision (a norm, a linear layer with its adapter), so their checkpoints
    keep none (``checkpoint``'s decision replay, a dispatch mode over every op, is left out);
    an MLP's tiles keep theirs (a mixture of experts routes tokens in it).

    A tiled norm records its output; a tiled consumer of that very output
    (the MLP after ``post_attention_layernorm``, the projections after ``input_layernorm``)
    then tiles the norm's input and applies the norm inside each tile, so that the norm's
    whole output is not kept for backward (the norm's input is, by the norm itself). Values
    are the norm's own on each tile's tokens; any other user of the norm's output still gets it.
    """
    forward = module.forward
    norm = role == "norm"
    tile_contexts = None if role == "mlp" else _no_contexts

    def run_tiles(unit: Callable[..., Any], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # During this function's own recompute (see the module docstring) only the tiles'
        # saved inputs matter: the tiles are not computed, a placeholder stands in.
        fn = _placeholder if _skipping() else unit
        # Tiles over batch x tokens as one axis: contiguous slices of a contiguous input (GPT-2's
        # Conv1D and MoE routers .view() their input), and full tiles whatever the batch.
        rows = x.reshape(1, -1, x.shape[-1])
        outs = []
        for part in _tile_slices(rows, tile):
            ctx = None if torch.compiler.is_compiling() else tile_contexts
            out = checkpoint(fn, part, *args, context_fn=ctx, **kwargs)
            if not isinstance(out, torch.Tensor) or out.shape[:-1] != part.shape[:-1]:
                raise BlockError(
                    f"{label} returned {type(out).__name__} "
                    f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}: tiles need a "
                    "token-wise module returning one tensor shaped like its input; leave "
                    "tile_tokens out for this model"
                )
            outs.append(out)
        if len({o.requires_grad for o in outs}) > 1:  # the shared input gradient needs them all
            raise BlockError(
                f"{label}: some tiles' outputs require grad and some do not; leave tile_tokens "
                "out for this model"
            )
        return torch.cat(outs, dim=-2).reshape(*x.shape[:-1], -1)

    run_tiles._gradckpt_label = label  # type: ignore[attr-defined]

    def tiled_forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() < 2
            or x.numel() // max(1, x.shape[-1]) <= tile
            or not torch.is_grad_enabled()
        ):
            return forward(x, *args, **kwargs)
        unit, src = forward, x
        pending = None if norm else _norm_source(x)
        if pending is not None:
            unit, src = _fused(pending[0], forward), pending[1]
        out = checkpoint(run_tiles, unit, src, *args, context_fn=_skip_contexts, **kwargs)
        if norm and not args and not kwargs and isinstance(out, torch.Tensor):
            _tls.norm = (weakref.ref(out), out._version, forward, weakref.ref(x), x._version)
        return out

    return override_forward(module, tiled_forward)
