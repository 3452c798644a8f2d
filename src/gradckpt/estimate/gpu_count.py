"""How many GPUs do I need? The smallest data-parallel GPU count whose per-GPU peak fits, per policy.

A loop over ``estimate(..., gpus=n, shard=...)`` for n in ``GPU_COUNTS`` (1, 2, 4, 8, then whole
8-GPU nodes): the step is estimated once (its profile is cached) and each count only re-splits
the weights, gradients and optimizer states (``estimate.sharding``), so a question costs about
one estimate.

Example:
    >>> r = gradckpt.estimate.gpus_needed("llama-3.1-70b", gpu="h100-80gb", shard="fsdp2",
    ...                                   policies=["none", "full"], seq=4096)
    >>> [(c.policy, c.gpus) for c in r.counts]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError
from .estimator import estimate
from .gpus import GPU
from .report import setup_words
from .sharding import GPU_COUNTS, Sharding

__all__ = ["GpuCount", "GpuCountReport", "gpus_needed"]


@dataclass(frozen=True, kw_only=True)
class GpuCount:
    """One policy's answer.

    Attributes:
        policy: the policy name.
        gpus: the smallest GPU count tried whose per-GPU peak fits, or None when none did.
        peak_bytes: the per-GPU peak at ``gpus`` (or at the last count tried).
        headroom_bytes: GPU memory minus that peak.
        speed_cost: the policy's speed cost (the same on every count: one GPU's step).
        tried: ``(gpus, per-GPU peak bytes)`` for every count estimated, in order.
        why: when ``gpus`` is None, why the search stopped.
    """

    policy: str
    gpus: int | None
    peak_bytes: int
    headroom_bytes: int
    speed_cost: float
    tried: list[tuple[int, int]] = field(default_factory=list)
    why: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class GpuCountReport:
    """``gpus_needed``'s answer: one ``GpuCount`` per policy, and how the numbers were made."""

    model: str
    setup: dict[str, Any]
    gpu: dict[str, Any]
    shard: str
    counts: list[GpuCount]
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def setup_line(self) -> str:
        return setup_words(self.setup)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "setup": dict(self.setup),
            "gpu": dict(self.gpu),
            "shard": self.shard,
            "counts": [c.to_dict() for c in self.counts],
            "notes": list(self.notes),
            "elapsed_s": self.elapsed_s,
        }


def gpus_needed(
    model: Any,
    *,
    gpu: str | GPU,
    shard: str = "fsdp2",
    policies: Sequence[str] | str | None = None,
    counts: Sequence[int] = GPU_COUNTS,
    progress: Callable[[str], None] | None = None,
    **settings: Any,
) -> GpuCountReport:
    """The smallest number of ``gpu`` GPUs on which each policy's per-GPU peak fits.

    Args:
        model: a preset, a ``config.json`` path or a ``transformers`` config (as ``estimate``).
        gpu: the GPU (preset or size): one per data-parallel rank.
        shard: ``"ddp"``, ``"fsdp2"`` (default), ``"zero1"``, ``"zero2"`` or ``"zero3"``.
        policies: policies to answer for (default ``none`` and ``full``; ``auto``: the fewest
            GPUs on which the planner finds a plan that fits, at that plan's speed cost).
        counts: GPU counts to try, increasing (default ``GPU_COUNTS``: 1, 2, 4, 8, 16... 1024).
        progress: called with a short description after each count is estimated.
        **settings: the rest of ``estimate``'s keyword arguments (``method``, ``batch``,
            ``seq``, ``precision``...); ``batch`` is per GPU.

    Returns:
        A ``GpuCountReport``.

    Raises:
        ConfigError: no GPU, an unknown shard mode, counts that are not increasing whole numbers
            >= 1, and everything ``estimate`` refuses.
    """
    t0 = time.perf_counter()
    if gpu is None:
        raise ConfigError("how many GPUs are needed depends on which: name one (gpu=...)")
    for bad in ("gpus", "shard", "alternatives"):
        if bad in settings:
            raise ConfigError(f"gpus_needed chooses {bad} itself; leave it out")
    mode = Sharding(1, shard).mode  # checked before anything runs
    tries = list(counts)
    if (
        not tries
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in tries)
        or tries != sorted(set(tries))
    ):
        raise ConfigError(f"counts must be increasing whole numbers >= 1, got {counts!r}")
    if policies is None:
        policies = ["none", "full"]  # estimate would add 'auto' for a GPU: a planner run per count
    open_: dict[str, list[tuple[int, int]]] = {}
    found: dict[str, GpuCount] = {}
    last: dict[str, Any] = {}
    report = None
    for n in tries:
        report = estimate(
            model, gpu=gpu, gpus=n, shard=mode, policies=policies, alternatives=False, **settings
        )
        if progress is not None:
            progress(f"{n} GPU{'s' if n > 1 else ''}")
        for r in report.results:
            if r.policy in found:
                continue
            seen = open_.setdefault(r.policy, [])
            seen.append((n, r.peak_bytes))
            last[r.policy] = r
            if r.fits:
                found[r.policy] = GpuCount(
                    policy=r.policy,
                    gpus=n,
                    peak_bytes=r.peak_bytes,
                    headroom_bytes=int(r.headroom_bytes or 0),
                    speed_cost=r.speed_cost,
                    tried=list(seen),
                )
        pending = [p for p in open_ if p not in found]
        if not pending:
            break
        # Past 1 GPU, a count that no longer lowers any pending policy's peak never will
        # (DDP replicates everything; the unsharded activations stay).
        if len(open_[pending[0]]) >= 3 and all(open_[p][-1][1] >= open_[p][-2][1] for p in pending):
            break
    if report is None:  # pragma: no cover - counts is never empty here
        raise ConfigError("no GPU count to try")
    out: list[GpuCount] = []
    for p, seen in open_.items():
        if p in found:
            out.append(found[p])
            continue
        r = last[p]
        stalled = len(seen) >= 3 and seen[-1][1] >= seen[-2][1]
        why = (
            f"more GPUs stop lowering the per-GPU peak under {mode} at "
            f"{seen[-1][0]} GPUs (what is not sharded alone does not fit)"
            if stalled
            else f"does not fit on up to {seen[-1][0]} GPUs"
        )
        out.append(
            GpuCount(
                policy=p,
                gpus=None,
                peak_bytes=r.peak_bytes,
                headroom_bytes=int(r.headroom_bytes or 0),
                speed_cost=r.speed_cost,
                tried=list(seen),
                why=why,
            )
        )
    setup = {k: v for k, v in report.setup.items() if k != "gpus"}
    return GpuCountReport(
        model=report.model,
        setup=setup,
        gpu=dict(report.gpu or {}),
        shard=mode,
        counts=out,
        notes=[n for n in report.notes if not n.startswith("per GPU, ")]
        + [f"GPU counts tried: {', '.join(str(n) for n, _ in max(open_.values(), key=len))}"],
        elapsed_s=time.perf_counter() - t0,
    )
