"""The ``lean`` policy: the least device memory gradckpt can reach, whatever it costs.

Every block is OFFLOAD (recomputed in backward, its input parked in pinned host memory and
fetched back one block ahead), the MLP, norms and attention projections of every block run over
sequence tiles (``tile_tokens``, default ``tiles.DEFAULT_TILE_TOKENS``; ``tile_norms`` and
``tile_proj``) and a causal LM's loss goes through the chunked loss head (``loss_head="chunked"``; a model without an output embedding keeps its own
loss). What stays on the device is the weights, their gradients, one block's recompute (a tile's
MLP) and one chunk's logits. On a CPU-only run OFFLOAD is RECOMPUTE (there is no device memory
to offload from), so ``lean`` is ``full`` with tiles and the chunked head there.
"""

from __future__ import annotations

from typing import Any

from ..plans import Decision, Plan
from .chunked_loss import HEAD_NAME
from .offload import offload_policy
from .tiles import DEFAULT_TILE_TOKENS

__all__ = ["POLICY_HELP", "POLICY_OPTIONS", "lean_policy"]

POLICY_HELP = (
    "least device memory: offload every block's input to host, MLP in sequence tiles, chunked "
    "loss head (loss_chunk=, tile_tokens=, offload_min_bytes=)"
)
POLICY_OPTIONS = ("offload_min_bytes",)


def lean_policy(names: Any, arg: str | None, options: dict[str, Any]) -> Plan:
    base = offload_policy(names, arg, options)
    opts = {
        **base.options,
        "loss_head": HEAD_NAME,
        "loss_head_optional": True,  # a model without an lm_head keeps its own loss
        "tile_tokens": DEFAULT_TILE_TOKENS,
        "tile_norms": True,
        "tile_proj": True,
    }
    return Plan(
        base.blocks, tuple(Decision.OFFLOAD for _ in base.blocks), policy="lean", options=opts
    )
