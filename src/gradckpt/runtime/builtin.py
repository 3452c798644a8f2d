"""Register gradckpt's built-in decisions and the policies that need runtime code, explicitly.

Called once from ``gradckpt/__init__.py``; nothing registers itself by being imported.
Order matters only for ``policy_names()``: none, full, every:K, sqrt (in ``policies``), then
offload, selective and lean.
"""

from __future__ import annotations

from ..plans import Decision
from ..policies import register_alias, register_policy
from . import chunked_loss, lean, offload, selective, tiles
from .decisions import (
    recompute_block,
    register_block_option,
    register_decision,
    register_head,
)

__all__ = ["register_builtin"]


def register_builtin() -> None:
    """Register RECOMPUTE, SELECTIVE, OFFLOAD, SAVE (offload_saved), the loss head, tiles; policies
    offload, selective, lean and the alias ``unsloth`` (offload)."""
    register_decision(Decision.RECOMPUTE, recompute_block)
    register_decision(Decision.SELECTIVE, selective.selective_block)
    register_decision(Decision.OFFLOAD, offload.offload_block)
    register_decision(Decision.SAVE, offload.save_block)  # SAVE wraps only with offload_saved
    register_head(chunked_loss.HEAD_NAME, chunked_loss.install_chunked_head)  # loss_head="chunked"
    register_block_option("tile_tokens", tiles.install_tiles)  # sequence tiles in blocks
    register_policy("offload", offload.POLICY_HELP, options=offload.POLICY_OPTIONS)(
        offload.offload_policy
    )
    register_alias("unsloth", "offload", offload.UNSLOTH_ALIAS)
    register_policy("selective", selective.POLICY_HELP, options=selective.POLICY_OPTIONS)(
        selective.selective_policy
    )
    register_policy("lean", lean.POLICY_HELP, options=lean.POLICY_OPTIONS, exact=False)(
        lean.lean_policy
    )
