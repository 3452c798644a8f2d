"""GPU presets (memory, bf16 dense throughput, memory bandwidth) and the roofline time model.

Throughputs are NVIDIA's datasheet figures for dense bf16 tensor-core math with fp32 accumulate
(what training uses; the sparse figures are twice these). Memory is the capacity the driver
reports (``nvidia-smi``'s total), since that is what a process can at most allocate.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..units import parse_size

__all__ = ["GPU", "GPU_PRESETS", "MATH_EFFICIENCY", "MEMORY_EFFICIENCY", "get_gpu"]

MiB = 1024**2
GiB = 1024**3
GB = 10**9

#: Fraction of datasheet bf16 throughput that large training matmuls sustain. 0.6 is a typical
#: model-FLOPs utilisation ceiling for a single-GPU fine-tune (PaLM reports 46-57% on TPUs,
#: torchtitan 40-60% on H100); it sets absolute times only: speed costs are ratios.
MATH_EFFICIENCY = 0.6
#: Fraction of datasheet memory bandwidth that pointwise kernels sustain (STREAM-like kernels
#: reach 80-90% on A100/H100).
MEMORY_EFFICIENCY = 0.8


@dataclass(frozen=True)
class GPU:
    """One accelerator, as the estimator sees it.

    Attributes:
        name: preset name (``"rtx-4090"``) or the size typed (``"24GB"``).
        memory_bytes: device memory a process can use, in bytes.
        bf16_tflops: dense bf16 tensor throughput (fp32 accumulate), 1e12 FLOP/s; None when unknown.
        bandwidth_gbs: memory bandwidth, 1e9 bytes/s; None when unknown.
        source: where the figures come from.
        host_link_gbs: host<->device copy bandwidth each way, 1e9 bytes/s, as pinned-memory
            copies sustain it (what OFFLOAD's copies run at); None when unknown.
    """

    name: str
    memory_bytes: int
    bf16_tflops: float | None = None
    bandwidth_gbs: float | None = None
    source: str = ""
    host_link_gbs: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Name, memory and throughput as reports give them (``source`` aside)."""
        return {
            "name": self.name,
            "memory_bytes": self.memory_bytes,
            "bf16_tflops": self.bf16_tflops,
            "bandwidth_gbs": self.bandwidth_gbs,
        }

    @property
    def has_speed(self) -> bool:
        return bool(self.bf16_tflops) and bool(self.bandwidth_gbs)

    def op_seconds(self, flops: int, nbytes: int) -> float:
        """Roofline time of one kernel: ``max(flops / sustained math, bytes / sustained bandwidth)``.

        Example:
            >>> round(GPU_PRESETS["a100-80gb"].op_seconds(2 * 4096**3, 3 * 2 * 4096**2) * 1e3, 3)
            0.734
        """
        tflops, bandwidth = self.bf16_tflops, self.bandwidth_gbs
        if not tflops or not bandwidth:  # has_speed, spelled out so the types narrow
            raise ConfigError(
                f"GPU {self.name!r} has no throughput figures; use a preset such as 'a100-80gb'"
            )
        return max(
            flops / (tflops * 1e12 * MATH_EFFICIENCY),
            nbytes / (bandwidth * 1e9 * MEMORY_EFFICIENCY),
        )


#: Host<->device copy bandwidth of pinned memory, each way. PCIe 4.0 x16 is 31.5 GB/s per
#: direction on paper; CUDA's bandwidthTest with pinned buffers reaches 24-26 GB/s on such
#: links (RTX 3090/4090, L4, A10G, and A100 SXM, whose host link is PCIe 4.0 x16), so 25.
#: PCIe 5.0 x16 (H100 SXM) is 63 GB/s on paper, ~50 GB/s in bandwidthTest. Copies each way
#: run concurrently (two copy engines), so a direction gets the whole figure.
PCIE3_HOST_GBS = 12.0  # T4: PCIe 3.0 x16
PCIE4_HOST_GBS = 25.0
PCIE5_HOST_GBS = 50.0

# fmt: off
GPU_PRESETS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("rtx-3090", 24576 * MiB, 71.0, 936.0,
            "GeForce RTX 3090: Ampere GA102 whitepaper (bf16 tensor, fp32 accumulate, dense 71 TFLOPS), GDDR6X 936 GB/s", host_link_gbs=PCIE4_HOST_GBS),
        GPU("rtx-4090", 24564 * MiB, 165.2, 1008.0,
            "GeForce RTX 4090: Ada whitepaper (fp16/bf16 tensor, fp32 accumulate, dense 165.2 TFLOPS), 1008 GB/s", host_link_gbs=PCIE4_HOST_GBS),
        GPU("l4", 23034 * MiB, 121.0, 300.0,
            "NVIDIA L4 datasheet: bf16 tensor 242 TFLOPS with sparsity (121 dense), 300 GB/s", host_link_gbs=PCIE4_HOST_GBS),
        GPU("a10g", 23028 * MiB, 70.0, 600.0,
            "AWS A10G (g5 instances): bf16 tensor 70 TFLOPS dense, GDDR6 600 GB/s", host_link_gbs=PCIE4_HOST_GBS),
        GPU("a100-40gb", 40960 * MiB, 312.0, 1555.0,
            "NVIDIA A100 datasheet: bf16 tensor 312 TFLOPS dense, HBM2 1555 GB/s (40GB SXM)", host_link_gbs=PCIE4_HOST_GBS),
        GPU("a100-80gb", 81920 * MiB, 312.0, 2039.0,
            "NVIDIA A100 datasheet: bf16 tensor 312 TFLOPS dense, HBM2e 2039 GB/s (80GB SXM)", host_link_gbs=PCIE4_HOST_GBS),
        GPU("h100", 81559 * MiB, 989.0, 3350.0,
            "NVIDIA H100 SXM datasheet: bf16 tensor 1979 TFLOPS with sparsity (989 dense), HBM3 3.35 TB/s", host_link_gbs=PCIE5_HOST_GBS),
        GPU("h100-pcie", 81559 * MiB, 756.0, 2000.0,
            "NVIDIA H100 PCIe datasheet: bf16 tensor 1513 TFLOPS with sparsity (756 dense), HBM2e 2.0 TB/s; "
            "80 GB as the SXM part reports it", host_link_gbs=PCIE5_HOST_GBS),
        GPU("h100-nvl", 94 * GB, 835.0, 3900.0,
            "NVIDIA H100 NVL datasheet: bf16 tensor 1671 TFLOPS with sparsity (835 dense), HBM3 3.9 TB/s; "
            "memory: the datasheet's 94 GB (1e9 B), not a driver reading", host_link_gbs=PCIE5_HOST_GBS),
        GPU("h200", 143771 * MiB, 989.0, 4800.0,
            "NVIDIA H200 datasheet: bf16 tensor 1979 TFLOPS with sparsity (989 dense), HBM3e 4.8 TB/s, "
            "141 GB; 143,771 MiB as nvidia-smi reports it", host_link_gbs=PCIE5_HOST_GBS),
        GPU("b200", 180 * GB, 2250.0, 8000.0,
            "NVIDIA HGX B200 datasheet: bf16 tensor 4.5 PFLOPS with sparsity per GPU (2.25 dense), "
            "HBM3e 8 TB/s; memory: 180 GB (1e9 B, the datasheet's), not a driver reading", host_link_gbs=PCIE5_HOST_GBS),
        GPU("l40s", 46068 * MiB, 362.05, 864.0,
            "NVIDIA L40S datasheet: bf16 tensor 733 TFLOPS with sparsity (362 dense), GDDR6 864 GB/s, "
            "48 GB; 46,068 MiB as nvidia-smi reports it with ECC on", host_link_gbs=PCIE4_HOST_GBS),
        GPU("a6000", 49140 * MiB, 154.8, 768.0,
            "NVIDIA RTX A6000 datasheet: tensor 309.7 TFLOPS with sparsity (154.8 dense, bf16 at the "
            "fp16 rate), GDDR6 768 GB/s, 48 GB; 49,140 MiB as nvidia-smi reports it", host_link_gbs=PCIE4_HOST_GBS),
        GPU("rtx-5090", 32607 * MiB, 209.5, 1792.0,
            "GeForce RTX 5090: Blackwell GB202 whitepaper (fp16/bf16 tensor, fp32 accumulate, dense "
            "209.5 TFLOPS), GDDR7 1792 GB/s, 32 GB; 32,607 MiB as nvidia-smi reports it", host_link_gbs=PCIE5_HOST_GBS),
        GPU("t4", 15360 * MiB, 65.0, 320.0,
            "NVIDIA T4 datasheet: fp16 tensor 65 TFLOPS (Turing has no bf16: train with fp16 "
            "autocast; the figure is fp16's), GDDR6 320 GB/s, 16 GB; 15,360 MiB as nvidia-smi reports it", host_link_gbs=PCIE3_HOST_GBS),
        GPU("mi300x", 192 * GB, 1307.4, 5300.0,
            "AMD Instinct MI300X datasheet: bf16 matrix 1307.4 TFLOPS dense, HBM3 5.3 TB/s, 192 GB "
            "(1e9 B, the datasheet's). ROCm builds of torch hipify the same caching allocator "
            "(c10/cuda/CUDACachingAllocator.cpp), so its rounding and pools are the ones modelled", host_link_gbs=PCIE5_HOST_GBS),
    )
}
# fmt: on
_ALIASES = {
    "h100-80gb": "h100",
    "h100-sxm": "h100",
    "h200-141gb": "h200",
    "rtx-a6000": "a6000",
    "5090": "rtx-5090",
    "a100": "a100-80gb",
    "4090": "rtx-4090",
    "3090": "rtx-3090",
}
_SIZE = re.compile(r"^\s*[0-9.]+\s*[a-zA-Z]*\s*$")


def get_gpu(gpu: str | GPU) -> GPU:
    """A GPU by preset name, or a bare memory size (``"24GB"``, ``"24GiB"``: no speed figures).

    Raises:
        ConfigError: unknown name (with the closest preset) or a malformed size.

    Example:
        >>> get_gpu("24GiB").memory_bytes
        25769803776
    """
    if isinstance(gpu, GPU):
        return gpu
    if not isinstance(gpu, str) or not gpu.strip():
        raise ConfigError(
            f"GPU must be a preset name ({', '.join(GPU_PRESETS)}) or a size like '24GB', got {gpu!r}"
        )
    key = gpu.strip().lower()
    key = _ALIASES.get(key, key)
    if key in GPU_PRESETS:
        return GPU_PRESETS[key]
    if _SIZE.match(key) and (key[0].isdigit() or key.startswith(".")):
        try:
            return GPU(
                gpu.strip(),
                parse_size(gpu, what="GPU memory"),
                source="memory size given by the user",
            )
        except ValueError as e:  # a size typo: a bad setting, same message
            raise ConfigError(str(e)) from None
    close = difflib.get_close_matches(key, list(GPU_PRESETS) + list(_ALIASES), n=1, cutoff=0.5)
    hint = f"did you mean {_ALIASES.get(close[0], close[0])!r}? " if close else ""
    raise ConfigError(
        f"unknown GPU {gpu!r}: {hint}presets: {', '.join(GPU_PRESETS)}, or a size like '24GB'"
    )
