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

Which module is tiled: the block's attribute named in ``TILED_ATTRS`` (``mlp``, ``feed_forward``,
``ffn``), whose forward takes the hidden states ``(batch, tokens, hidden)`` first and returns one
tensor of the same leading shape (Llama, Qwen2, Mistral, Gemma 2, GPT-2, Mixtral's MoE block).
"""

from __future__ import annotations

import contextlib
import threading
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
    "TILED_ATTRS",
    "TILED_NORM_ATTRS",
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
    if "tile_norms" in options:
        norms = options.pop("tile_norms")
        if not isinstance(norms, bool):
            raise PolicyError(f"tile_norms must be True or False, got {norms!r}")
        out["tile_norms"] = norms
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


def install_tiles(
    name: str, block: nn.Module, options: Mapping[str, Any]
) -> Callable[[], None] | None:
    """Run ``block``'s MLP (and norms, with ``tile_norms``) over tiles of ``tile_tokens`` tokens.

    Called by ``apply.install`` for each RECOMPUTE/OFFLOAD block when the plan has
    ``tile_tokens``; a block without a token-wise module (``TILED_ATTRS``) is left as it is
    (None returned). Returns the function that undoes it.
    """
    tile = options.get("tile_tokens")
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        return None
    modules = []
    mlp = tiled_module(block)
    if mlp is not None:
        modules.append(mlp)
    if options.get("tile_norms"):
        modules += [
            m for a in TILED_NORM_ATTRS if isinstance(m := getattr(block, a, None), nn.Module)
        ]
    if not modules:
        return None
    undo = [_tile(m, f"block {name!r}'s {type(m).__name__}", tile) for m in modules]

    def restore() -> None:
        for u in reversed(undo):
            u()

    return restore


def _tile(module: nn.Module, label: str, tile: int) -> Callable[[], None]:
    """Override ``module.forward`` with its tiled run; return the undo."""
    forward = module.forward

    def run_tiles(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # During this function's own recompute (see the module docstring) only the tiles'
        # saved inputs matter: the tiles are not computed, a placeholder stands in.
        fn = _placeholder if _skipping() else forward
        # Tiles over batch x tokens as one axis: contiguous slices of a contiguous input (GPT-2's
        # Conv1D and MoE routers .view() their input), and full tiles whatever the batch.
        # split, not narrow: one SplitBackward joins the tiles' gradients, where each narrow's
        # backward would write its tile's gradient into a zero tensor of the whole input.
        rows = x.reshape(1, -1, x.shape[-1])
        outs = []
        for part in rows.split(tile, dim=-2):
            out = checkpoint(fn, part, *args, **kwargs)
            if not isinstance(out, torch.Tensor) or out.shape[:-1] != part.shape[:-1]:
                raise BlockError(
                    f"{label} returned {type(out).__name__} "
                    f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}: tiles need a "
                    "token-wise module returning one tensor shaped like its input; leave "
                    "tile_tokens out for this model"
                )
            outs.append(out)
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
        return checkpoint(run_tiles, x, *args, context_fn=_skip_contexts, **kwargs)

    return override_forward(module, tiled_forward)
