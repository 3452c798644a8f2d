"""Data-parallel sharding across GPUs: the per-GPU share of weights, gradients and optimizer states.

Pure arithmetic over byte counts (no model, no fake tensors): the estimator runs one GPU's step
(activations are never sharded: each GPU runs its own micro-batch) and this module turns the
model's tensor totals into what each of ``gpus`` GPUs holds under a sharding mode, plus the
communication buffers alive at the step's peak.

Modes (``SHARD_MODES``), with P the trainable parameters' bytes, G their gradients', O the
optimizer states', N the number of GPUs:

- ``ddp``: torch DistributedDataParallel. Everything replicated, plus DDP's gradient buckets:
  with ``gradient_as_bucket_view=False`` (DDP's and accelerate's default) the reducer keeps a
  flat copy of every gradient, "the saved memory size will be equal to the total gradients size"
  when it is True (torch DDP docs). ``--gpus 1`` is one process without DDP: no buckets.
- ``fsdp2``: ``fully_shard`` per block and on the root. Parameters, gradients and optimizer
  states sharded N ways in the dtype they are stored in; ``precision="mixed"`` is FSDP2's
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: fp32 sharded parameters,
  gradients and states, bf16 compute (the step is the bf16 one: no autocast weight copies).
  Buffers at the peak: the root's parameters (embeddings, final norm, output layer) unsharded for
  the whole step (FSDP2 does not reshard the root after forward), one block's parameters
  unsharded and the next one prefetched, and one block's unsharded gradients before their
  reduce-scatter (plus their fp32 copy when ``reduce_dtype`` is fp32).
- ``zero1`` / ``zero2`` / ``zero3``: DeepSpeed ZeRO stages as Rajbhandari et al. (2020, "ZeRO:
  Memory Optimizations Toward Training Trillion Parameter Models", section 5 and Figure 1)
  define them: stage 1 partitions the optimizer states, stage 2 also the gradients, stage 3
  also the parameters. DeepSpeed's bf16 mode (``precision="bf16"``) keeps bf16 parameters and
  gradients and, in the optimizer partition, fp32 master weights plus fp32 states: K = 12 bytes
  per parameter for Adam, so 2 + 2 + 12 = 16 bytes per parameter unsharded (7.5B parameters:
  120 GB; on 64 GPUs 31.4 GB with stage 1, 16.6 GB with stage 2, 1.9 GB with stage 3: Figure 1,
  reproduced by ``tests/test_sharding.py``). ``precision="fp32"``: fp32 everything, no master
  copy. ``precision="mixed"`` (fp32 model weights) is refused: DeepSpeed's bf16 mode casts the
  model to bf16. Buffers: stages 2 and 3 reduce one block's gradients at a time (a proxy for
  DeepSpeed's ``reduce_bucket_size``; HF's ``"auto"`` sets hidden_size**2 elements); stage 3
  gathers one block's parameters and prefetches the next.

Frozen weights (LoRA/QLoRA bases, buffers) are sharded with the parameters (``fsdp2``,
``zero3``) or replicated (the rest). Not counted: NCCL's own buffers (allocated outside torch's
caching allocator, typically a few hundred MiB per GPU), communication time (assumed overlapped
with compute), and tensor or pipeline parallelism.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ConfigError
from .report import PolicyEstimate
from .training import TrainingSetup

__all__ = ["GPU_COUNTS", "SHARD_MODES", "ShardTotals", "Sharding", "shard_totals", "sharding"]

SHARD_MODES = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
#: GPU counts ``--gpus auto`` tries, in order: a single node's 1-8, then whole 8-GPU nodes.
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_DEEPSPEED = ("zero1", "zero2", "zero3")


@dataclass(frozen=True, kw_only=True)
class ShardTotals:
    """The byte counts sharding works on, for the full-depth model (see the module docstring).

    Attributes:
        weight_bytes: parameters and buffers as stored (the setup's precision).
        trainable_params: the number of trainable parameters.
        trainable_bytes: their bytes as stored.
        grad_bytes: their gradients' bytes (same dtype as the parameters).
        optimizer_bytes: optimizer states (torch's: in the parameters' dtype).
        step_grad_bytes: the gradients' bytes in the step that was run (bf16 for ``mixed`` under
            FSDP2, whose step computes in bf16); scales the step's gradient figure.
        root_bytes: parameters outside the blocks in compute dtype (embeddings, output layer).
        block_bytes: the largest block's parameters in compute dtype (what one all-gather brings).
        block_grad_bytes: that block's trainable gradients in compute dtype.
    """

    weight_bytes: int
    trainable_params: int
    trainable_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    step_grad_bytes: int
    root_bytes: int
    block_bytes: int
    block_grad_bytes: int


@dataclass(frozen=True)
class Sharding:
    """Data parallelism over ``gpus`` GPUs with sharding ``mode`` (one of ``SHARD_MODES``).

    Example:
        >>> Sharding(8, "zero3").describe()
        '8 GPUs, DeepSpeed ZeRO-3'
    """

    gpus: int
    mode: str

    def __post_init__(self) -> None:
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise ConfigError(f"gpus must be a whole number >= 1, got {self.gpus!r}")
        mode = self.mode.strip().lower() if isinstance(self.mode, str) else self.mode
        if mode not in SHARD_MODES:
            close = difflib.get_close_matches(str(mode), SHARD_MODES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown shard mode {self.mode!r}{hint}; choose one of: {', '.join(SHARD_MODES)}"
            )
        object.__setattr__(self, "mode", mode)

    def describe(self) -> str:
        """In words, for headers: ``"8 GPUs, FSDP2"``."""
        name = {
            "ddp": "DDP",
            "fsdp2": "FSDP2",
            "zero1": "DeepSpeed ZeRO-1",
            "zero2": "DeepSpeed ZeRO-2",
            "zero3": "DeepSpeed ZeRO-3",
        }[self.mode]
        return f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}, {name}"

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "shard": self.mode}

    # -- what the estimator asks ----------------------------------------------------------------
    def check(self, setup: TrainingSetup) -> None:
        """Refuse setups a mode cannot run (DeepSpeed's bf16 mode with fp32 model weights)."""
        if self.mode in _DEEPSPEED and setup.precision == "mixed":
            raise ConfigError(
                f"{self.mode}: DeepSpeed's bf16 mode keeps bf16 weights with fp32 master weights "
                "and states in the optimizer partition; use precision 'bf16' (modelled that way) "
                "or 'fp32', not 'mixed'"
            )

    def step_setup(self, setup: TrainingSetup) -> TrainingSetup:
        """The setup whose step is run: FSDP2's mixed precision computes in bf16 with bf16
        parameters (no autocast weight copies), so its step is the ``bf16`` one."""
        if self.mode == "fsdp2" and setup.precision == "mixed":
            return setup.with_(precision="bf16")
        return setup

    def static(self, t: ShardTotals, optimizer: str) -> dict[str, int]:
        """Per-GPU bytes that live all step: ``weights``, ``gradients`` (all of them, as after
        backward or when accumulating) and ``optimizer_states`` (master weights included)."""
        n = self.gpus
        frozen = t.weight_bytes - t.trainable_bytes
        params, grads, states = t.trainable_bytes, t.grad_bytes, t.optimizer_bytes
        if self.mode in _DEEPSPEED and t.trainable_params and params == 2 * t.trainable_params:
            # DeepSpeed bf16: fp32 master weights and fp32 Adam/momentum states in the
            # optimizer partition (K = 12 for Adam); bitsandbytes 8-bit states stay as they are.
            master = 2 * params
            states = states if optimizer == "adamw-8bit" else 2 * states
            states += master
        shard_opt = self.mode != "ddp"
        shard_grad = self.mode in ("fsdp2", "zero2", "zero3")
        shard_param = self.mode in ("fsdp2", "zero3")
        return {
            "weights": _div(frozen + params, n) if shard_param else frozen + params,
            "gradients": _div(grads, n) if shard_grad else grads,
            "optimizer_states": _div(states, n) if shard_opt else states,
        }

    def buffers(self, t: ShardTotals, setup: TrainingSetup) -> int:
        """Communication buffers alive at the peak on each GPU (see the module docstring)."""
        if self.mode == "ddp":
            return t.grad_bytes if self.gpus > 1 else 0
        if self.mode == "zero1":
            return 0
        reduce = t.block_grad_bytes
        if self.mode == "fsdp2" and setup.precision == "mixed":
            reduce += 2 * t.block_grad_bytes  # the fp32 copy reduce_dtype=fp32 scatters
        if self.mode == "zero2":
            return reduce
        gathered = 2 * t.block_bytes  # one block unsharded, the next prefetched
        if self.mode == "fsdp2":
            gathered += t.root_bytes
        return gathered + reduce

    def apply(
        self, res: PolicyEstimate, t: ShardTotals, setup: TrainingSetup, gpu_memory: int | None
    ) -> PolicyEstimate:
        """One GPU's ``PolicyEstimate`` from the single-GPU one: the persistent tensors replaced
        by their per-GPU share, the step's own gradients scaled to it, buffers added, the CUDA
        allowance recomputed the same way (context + the same share of the tensors)."""
        b = dict(res.breakdown)
        static = self.static(t, setup.optimizer)
        alive_grads = b["gradients"]
        if t.step_grad_bytes:
            alive_grads = alive_grads * t.grad_bytes // t.step_grad_bytes
        if self.mode in ("fsdp2", "zero2", "zero3"):
            alive_grads = _div(alive_grads, self.gpus)
        if setup.grad_accum > 1:  # every gradient is alive through the accumulation
            alive_grads = static["gradients"]
        old_tensors = sum(v for k, v in b.items() if k != "cuda_overhead")
        b["weights"] = static["weights"]
        b["gradients"] = min(alive_grads, static["gradients"])
        b["optimizer_states"] = static["optimizer_states"]
        b["shard_buffers"] = self.buffers(t, setup)
        tensors = sum(v for k, v in b.items() if k != "cuda_overhead")
        b["cuda_overhead"] = _scaled_overhead(res.breakdown["cuda_overhead"], old_tensors, tensors)
        peak = tensors + b["cuda_overhead"]
        headroom = None if gpu_memory is None else gpu_memory - peak
        return replace(
            res,
            breakdown=b,
            peak_bytes=peak,
            fits=None if headroom is None else headroom >= 0,
            headroom_bytes=headroom,
        )

    def notes(self, setup: TrainingSetup) -> list[str]:
        """How the per-GPU figures were made, for the report's notes."""
        what = {
            "ddp": "replicated on every GPU, plus DDP's gradient buckets (a flat copy of every "
            "gradient; gradient_as_bucket_view=True saves them)"
            + (" (1 GPU: no DDP, no buckets)" if self.gpus == 1 else ""),
            "fsdp2": "parameters, gradients and optimizer states sharded N ways (fully_shard per "
            "block and on the root); buffers: the root's parameters unsharded all step, one "
            "block unsharded + one prefetched, one block's gradients before reduce-scatter"
            + (
                "; MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 shards, "
                "the step run in bf16"
                if setup.precision == "mixed"
                else ""
            ),
            "zero1": "DeepSpeed ZeRO-1: optimizer states (fp32 master weights included) "
            "partitioned, parameters and gradients replicated",
            "zero2": "DeepSpeed ZeRO-2: optimizer states and gradients partitioned; buffers: one "
            "block's gradients being reduced",
            "zero3": "DeepSpeed ZeRO-3: parameters, gradients and optimizer states partitioned; "
            "buffers: one block gathered + one prefetched, one block's gradients being reduced",
        }[self.mode]
        out = [
            f"per GPU, {self.describe()}, each GPU running the micro-batch: {what}; activations "
            "are not sharded",
            "not counted: NCCL's own buffers (outside torch's allocator, typically a few hundred "
            "MiB), communication time (assumed overlapped with compute; step time and tokens/s "
            "are one GPU's)",
        ]
        if self.mode in _DEEPSPEED and setup.precision == "bf16":
            out.append(
                "DeepSpeed bf16: bf16 parameters and gradients, fp32 master weights and fp32 "
                "optimizer states in the partition (Adam: 12 bytes per parameter, as in the ZeRO "
                "paper)"
            )
        return out

    def planner_share(self, t: ShardTotals, setup: TrainingSetup) -> tuple[int, int]:
        """What the budget planner needs to plan one GPU's step: ``(static, grad_shards)``.

        ``static``: per-GPU weights and optimizer states plus the buffers at the peak (the bytes
        held all step besides gradients); ``grad_shards``: the ways each gradient is sharded (N
        under FSDP2 and ZeRO-2/3, 1 under DDP and ZeRO-1).
        """
        static = self.static(t, setup.optimizer)
        held = static["weights"] + static["optimizer_states"] + self.buffers(t, setup)
        return held, self.gpus if self.mode in ("fsdp2", "zero2", "zero3") else 1

    def fixed_bytes(self, t: ShardTotals, optimizer: str) -> int:
        """Per-GPU weights, gradients and optimizer states: what no checkpointing can reduce."""
        return sum(self.static(t, optimizer).values())


def sharding(gpus: int | None, shard: str | None) -> Sharding | None:
    """``estimate``'s ``gpus``/``shard`` arguments as a ``Sharding`` (None: one GPU, unsharded).

    ``shard`` without ``gpus`` means one GPU in that mode; ``gpus`` without ``shard`` is DDP.

    Raises:
        ConfigError: ``gpus`` < 1 or not a whole number, an unknown mode.
    """
    if gpus is None and shard is None:
        return None
    return Sharding(1 if gpus is None else gpus, "ddp" if shard is None else shard)


def _div(nbytes: int, n: int) -> int:
    """A shard's bytes: FSDP2 and ZeRO pad each flat tensor to a multiple of N, so round up."""
    return -(-nbytes // n)


def _scaled_overhead(overhead: int, old_tensors: int, tensors: int) -> int:
    from .step_cost import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES

    if overhead == CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * old_tensors):
        return CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * tensors)
    return overhead  # an allowance the caller fixed stays as given


def shard_totals(static: Any, step_tot: Any, whole: Any, per_block: list[Any]) -> ShardTotals:
    """What ``Sharding`` needs, from ``TensorTotals``.

    ``static``: the full-depth model as stored (the setup's precision); ``step_tot``: the
    step's (compute dtype); ``whole`` and ``per_block``: the step's model and each of its
    blocks, every block list (a VLM's vision blocks are wrapped one by one too), which give the
    root's and the largest block's parameters.
    """
    blocks = sum(b.weight_bytes for b in per_block)
    return ShardTotals(
        weight_bytes=static.weight_bytes,
        trainable_params=static.trainable,
        trainable_bytes=static.grad_bytes,
        grad_bytes=static.grad_bytes,
        optimizer_bytes=static.optimizer_bytes,
        step_grad_bytes=step_tot.grad_bytes,
        root_bytes=whole.weight_bytes - blocks,
        block_bytes=max((b.weight_bytes for b in per_block), default=0),
        block_grad_bytes=max((b.grad_bytes for b in per_block), default=0),
    )
