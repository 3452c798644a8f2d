"""What offloading costs in an estimate: host bytes, and the copy time compute does not hide.

OFFLOAD (``runtime.offload``) parks each block's input in pinned host memory during forward
(device-to-host copy on a side stream) and fetches it back one block ahead during backward
(host-to-device on another stream, started when the next block's recompute ends). In an estimate the same code runs on fake tensors, so the
device bytes leave the predicted peak and the host copies are counted (``timeline``'s
``host_peak``); this module prices the copies over the host link (``GPU.host_link_gbs``).

Overlap model, per direction: the copies run while the GPU computes, so a direction costs the
time by which its copies outlast the compute they run beside (forward for device-to-host;
backward, without the recompute, for host-to-device), plus one block's fetch that nothing hides (the
last block's input is needed as soon as backward starts). With long sequences a block's
compute grows faster than its input (attention is quadratic, the input linear), so the copies
hide entirely; with short ones and a slow link they do not.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gpus import GPU

__all__ = ["OffloadCost", "offload_cost"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OffloadCost:
    """Host memory and link time of one step's offloaded tensors.

    Attributes:
        host_bytes: most host bytes alive at once (the parked block inputs).
        copy_s: seconds the copies take over the link, both directions together.
        exposed_s: the part of ``copy_s`` that compute does not hide (added to the step time).
        link_gbs: the host link bandwidth used (1e9 bytes/s each way), None when unknown.
    """

    host_bytes: int
    copy_s: float
    exposed_s: float
    link_gbs: float | None


def offload_cost(
    host_bytes: int, blocks: int, forward_s: float, backward_s: float, gpu: GPU
) -> OffloadCost:
    """The link time of moving ``host_bytes`` out in forward and back in backward on ``gpu``.

    Args:
        host_bytes: bytes parked in host memory in one micro-batch's forward.
        blocks: how many blocks parked them (the fetch nothing hides is one block's share).
        forward_s: forward compute time the device-to-host copies run beside.
        backward_s: backward time the host-to-device copies run beside.
        gpu: the GPU (its ``host_link_gbs``; without one, the copies are not priced).

    Example:
        >>> from gradckpt.estimate.gpus import GPU_PRESETS
        >>> c = offload_cost(32 * 2**30, 32, 1.0, 2.0, GPU_PRESETS["rtx-4090"])
        >>> round(c.copy_s, 2), round(c.exposed_s, 3)
        (2.75, 0.417)
    """
    link = gpu.host_link_gbs
    if host_bytes <= 0 or not link:
        return OffloadCost(host_bytes=max(0, host_bytes), copy_s=0.0, exposed_s=0.0, link_gbs=link)
    one_way = host_bytes / (link * 1e9)
    first_fetch = one_way / max(1, blocks)
    exposed = max(0.0, one_way - forward_s) + max(0.0, one_way - backward_s) + first_fetch
    return OffloadCost(host_bytes=host_bytes, copy_s=2 * one_way, exposed_s=exposed, link_gbs=link)
