"""Single changes to a training setup that would make it fit a GPU (shown when no policy does)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .report import Alternative, PolicyEstimate
from .training import TrainingSetup

__all__ = ["alternatives"]


def alternatives(
    st: TrainingSetup,
    policy: str,
    run: Callable[[TrainingSetup], PolicyEstimate | None],
    *,
    fixed_fits: bool = True,
) -> list[Alternative]:
    """Single changes to the setup that make it fit (or come closest), each with its numbers.

    Smaller batches and sequences are tried only when the weights, gradients and optimizer
    states fit (``fixed_fits``): otherwise no batch or sequence length can help.

    Args:
        st: the setup that does not fit.
        policy: the policy to estimate each change with (the most memory-frugal one asked).
        run: estimates ``policy`` for a changed setup on the same model and GPU; None when
            it cannot (``"auto"`` without a plan for that setup): the change is left out.
        fixed_fits: whether weights, gradients and optimizer states alone fit the GPU.

    Returns:
        One ``Alternative`` per change tried, in the order tried.
    """
    cands: list[tuple[str, dict[str, Any]]] = []
    if st.method == "full" and st.optimizer == "adamw":
        cands.append(("8-bit AdamW (bitsandbytes) instead of AdamW", {"optimizer": "adamw-8bit"}))
    if st.method == "full" and st.precision not in ("bf16", "bf16-true"):
        cands.append(
            (
                "bf16 weights and optimizer states instead of fp32 master weights",
                {"precision": "bf16"},
            )
        )
    if st.method == "full":
        cands.append(
            (
                f"LoRA r={st.lora_rank} on all linear layers instead of a full fine-tune",
                {"method": "lora"},
            )
        )
    if st.method != "qlora":
        cands.append(
            (f"QLoRA (NF4 base) r={st.lora_rank} instead of {st.method}", {"method": "qlora"})
        )
    out: list[Alternative] = []

    def try_(change: str, settings: dict[str, Any]) -> Alternative | None:
        pe = run(st.with_(**settings))
        if pe is None:
            return None
        return Alternative(
            change=change,
            settings=settings,
            policy=policy,
            peak_bytes=pe.peak_bytes,
            fits=bool(pe.fits),
            speed_cost=pe.speed_cost,
        )

    for change, settings in cands:
        alt = try_(change, settings)
        if alt is not None:
            out.append(alt)
    if not fixed_fits:
        return out
    # The same setup with a smaller micro-batch (more accumulation keeps tokens per step), then
    # a shorter sequence: halve until it fits or reaches 1 / 128 tokens.
    b, last = st.batch, None
    while b > 1:
        b //= 2
        accum = st.grad_accum * (st.batch // b)
        alt = try_(
            f"micro-batch {b} with {accum}x gradient accumulation (same tokens per step)",
            {"batch": b, "grad_accum": accum},
        )
        last = alt or last
        if alt is not None and alt.fits:
            break
    if last is not None:
        out.append(last)
    if last is None or not last.fits:
        s, last_s = st.seq, None
        while s > 128:
            s //= 2
            alt = try_(f"sequence length {s} (batch 1)", {"seq": s, "batch": 1})
            last_s = alt or last_s
            if alt is not None and alt.fits:
                break
        if last_s is not None:
            out.append(last_s)
    return out
