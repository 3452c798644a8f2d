"""DeepSpeed ZeRO-3: refuse the combination known to fail in backward on DeepSpeed < 0.19.3.

ZeRO-3 partitions each parameter in place after its module's forward (``param.data =
torch.empty(0)``), and does so again at the end of every recompute. torch's non-reentrant
checkpoint keeps a live, undetached reference to the tensors of the recompute that do not
require grad, so a *frozen* parameter (a LoRA base, a quantized layer) it saved shrinks to
shape ``[0]`` before torch compares it with the forward's: ``CheckpointError ... saved
{'shape': [1024]} vs recomputed {'shape': [0]}`` (huggingface/transformers#47254). gradckpt
checkpoints with torch's non-reentrant checkpoint, so it meets the same failure. DeepSpeed
fixed it in deepspeedai/DeepSpeed#8148 (commit a31eb3165: frozen parameters are not
re-partitioned during a recompute), first released in v0.19.3. Full fine-tunes (every
parameter trainable) never failed: trainable tensors are saved detached.

Found by duck typing (ZeRO-3 parameters carry ``ds_id`` and ``ds_status``), so DeepSpeed is not
imported unless such parameters exist.
"""

from __future__ import annotations

import re
from importlib import metadata

from torch import nn

from ..errors import ConfigError

__all__ = ["ZERO3_FROZEN_FIX", "check_zero3"]

#: The first DeepSpeed release whose ZeRO-3 keeps frozen parameters gathered in a recompute.
ZERO3_FROZEN_FIX = (0, 19, 3)


def _release(version: str) -> tuple[int, ...]:
    """``"0.19.2+cpu"`` -> ``(0, 19, 2)``; a pre-release (``"0.19.3rc1"``) counts as its release."""
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])


def check_zero3(model: nn.Module, version: str | None = None) -> None:
    """Refuse checkpointing a ZeRO-3-partitioned model with frozen parameters on old DeepSpeed.

    Args:
        model: the model a plan is about to be installed on.
        version: DeepSpeed's version (default: the installed one, read from its metadata).

    Raises:
        ConfigError: ZeRO-3 parameters, some frozen, and DeepSpeed older than
            ``ZERO3_FROZEN_FIX``; the message names the version to install.
    """
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") and hasattr(p, "ds_status") for p in params):
        return
    frozen = sum(1 for p in params if not p.requires_grad)
    if not frozen:
        return
    if version is None:
        try:
            version = metadata.version("deepspeed")
        except metadata.PackageNotFoundError:
            return  # partitioned by something that is not DeepSpeed: nothing known to fail
    if _release(version) < ZERO3_FROZEN_FIX:
        need = ".".join(map(str, ZERO3_FROZEN_FIX))
        raise ConfigError(
            f"DeepSpeed {version} ZeRO-3 with {frozen} frozen parameters (LoRA, a quantized base) "
            "fails in backward with non-reentrant checkpointing, which gradckpt uses "
            f"(huggingface/transformers#47254); install deepspeed>={need}, which fixes it"
        )
