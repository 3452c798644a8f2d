"""Choose one decision per block: least predicted time whose predicted peak fits the budget (pure).

A multiple-choice knapsack solved exactly by dynamic programming over the blocks in execution
order. The state is the bytes kept by the blocks so far (``K`` in StepProfile), which is all the
peak model needs: every constraint of block ``i`` reads only ``K(<i)``, ``K(<=i)`` and its own
option. Only Pareto-optimal partial plans (fewer bytes or less time) are carried forward, which
keeps the search exact and small (identical blocks give few distinct byte sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import BudgetError
from ..plans import Decision, Plan
from .model import StepProfile, predict_cost, predict_peak

__all__ = ["Solution", "min_peak", "solve"]

# Preference order for ties on time and on the number of checkpointed blocks (deterministic).
_ORDER = {Decision.SAVE: 0, Decision.SELECTIVE: 1, Decision.OFFLOAD: 2, Decision.RECOMPUTE: 3}


@dataclass(frozen=True, slots=True)
class Solution:
    """The chosen decisions with their predicted peak (bytes) and extra time (ns)."""

    decisions: tuple[Decision, ...]
    peak: int
    cost: int


def _key(cost: int, decisions: tuple[Decision, ...]) -> tuple[int, int, tuple[int, ...]]:
    n_ckpt = sum(d is not Decision.SAVE for d in decisions)
    return (cost, n_ckpt, tuple(_ORDER[d] for d in decisions))


def min_peak(profile: StepProfile, *, resolution: int = 1 << 13) -> Solution:
    """The plan with the (near-)smallest predicted peak; among those, the least time.

    Bisection over budgets with the exact solver, to within 1/4096 of the peak: the solver's
    feasibility is monotone in the budget.
    """
    lean = tuple(_leanest(profile, i) for i in range(len(profile.blocks)))
    best = Solution(lean, predict_peak(profile, lean), predict_cost(profile, lean))
    lo, hi = max(profile.pre_peak, profile.tail_peak), best.peak
    while hi - lo > max(1, hi >> 12):
        mid = (lo + hi) // 2
        sol = _solve(profile, mid, resolution)
        if sol is None:
            lo = mid + 1
        else:
            best, hi = sol, sol.peak
    return best


def _leanest(profile: StepProfile, i: int) -> Decision:
    opts = profile.options[i]
    return min(opts, key=lambda d: (opts[d].kept + opts[d].bwd_extra, _ORDER[d]))


def solve(profile: StepProfile, budget: int, *, resolution: int = 1 << 13) -> Solution:
    """Cheapest decisions (least predicted time) whose predicted peak is <= ``budget`` bytes.

    Args:
        profile: the step's costs per block and decision.
        budget: device bytes available for the step.
        resolution: number of byte buckets of the DP (more: closer to exact, slower).

    Returns:
        A ``Solution``. Ties go to fewer checkpointed blocks, then to SAVE < SELECTIVE <
        OFFLOAD < RECOMPUTE block by block, so the output is deterministic.

    Raises:
        BudgetError: no plan fits; the message gives the smallest achievable peak and, when the
            profile knows the batch size, the largest batch that would fit.
    """
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise BudgetError(f"budget must be a positive int of bytes, got {budget!r}")
    if not isinstance(resolution, int) or resolution < 1:
        raise BudgetError(f"resolution must be an integer >= 1, got {resolution!r}")
    sol = _solve(profile, budget, resolution)
    if sol is not None:
        return sol
    raise BudgetError(_infeasible_message(profile, budget))


def _solve(profile: StepProfile, budget: int, resolution: int) -> Solution | None:
    if max(profile.pre_peak, profile.tail_peak) > budget:
        return None
    # Pareto frontier of partial plans: (exact kept bytes, key, cost, decisions); a state is
    # dropped only when another keeps no more bytes and is no worse on the key, so the search is
    # exact. Identical blocks give few distinct byte sums; should a model produce more than
    # `_MAX_STATES`, states are merged into byte buckets rounded up (conservative: fits stay fits).
    states: list[tuple[int, tuple[int, int, tuple[int, ...]], int, tuple[Decision, ...]]] = [
        (0, (0, 0, ()), 0, ())
    ]
    for i, opts in enumerate(profile.options):
        nxt = []
        choices = sorted(opts.items(), key=lambda kv: _ORDER[kv[0]])
        for kept, _, cost, decs in states:
            for d, o in choices:
                if profile.fwd_base[i] + kept + o.fwd_extra > budget:
                    continue
                k2 = kept + o.kept
                if profile.bwd_base[i] + k2 + o.bwd_extra > budget:
                    continue
                decs2 = (*decs, d)
                c2 = cost + o.cost
                nxt.append((k2, _key(c2, decs2), c2, decs2))
        if not nxt:
            return None
        states = _pareto(nxt, budget, resolution)
    best = None
    for kept, k, cost, decs in states:
        if profile.head_base + kept <= budget and (best is None or k < best[0]):
            best = (k, cost, decs)
    if best is None:
        return None
    decs = best[2]
    return Solution(decs, predict_peak(profile, decs), predict_cost(profile, decs))


_MAX_STATES = 1 << 16


def _pareto(
    states: list[tuple[int, tuple[int, int, tuple[int, ...]], int, tuple[Decision, ...]]],
    budget: int,
    resolution: int,
) -> list[tuple[int, tuple[int, int, tuple[int, ...]], int, tuple[Decision, ...]]]:
    states.sort(key=lambda s: (s[0], s[1]))
    out = []
    best_key = None
    for s in states:
        if best_key is None or s[1] < best_key:
            out.append(s)
            best_key = s[1]
    if len(out) > _MAX_STATES:
        unit = max(1, -(-budget // resolution))
        merged: dict[
            int, tuple[int, tuple[int, int, tuple[int, ...]], int, tuple[Decision, ...]]
        ] = {}
        for kept, k, cost, decs in out:
            q = -(-kept // unit)
            cur = merged.get(q)
            if cur is None or k < cur[1]:
                merged[q] = (q * unit, k, cost, decs)  # rounded up: conservative
        out = sorted(merged.values(), key=lambda s: (s[0], s[1]))
    return out


def _infeasible_message(profile: StepProfile, budget: int) -> str:
    from ..units import format_bytes

    try:
        lean = min_peak(profile)
        smallest = f"the smallest achievable peak is {format_bytes(lean.peak)}"
        need = lean.peak
    except BudgetError:
        need = max(profile.pre_peak, profile.tail_peak)
        smallest = f"the step needs at least {format_bytes(need)} outside the blocks"
    hint = ""
    if profile.batch and need > profile.fixed_bytes:
        # activations scale with the batch, weights/gradients/states do not
        fits = profile.batch * (budget - profile.fixed_bytes) // (need - profile.fixed_bytes)
        if 1 <= fits < profile.batch:
            hint = f"; about batch {fits} would fit (profiled at batch {profile.batch})"
        elif fits < 1 <= profile.batch:
            hint = (
                f"; even batch 1 would not fit: weights, gradients and states alone take "
                f"{format_bytes(profile.fixed_bytes)}"
            )
    return (
        f"budget {format_bytes(budget)} is too small: {smallest} "
        f"({format_bytes(need - budget)} over){hint}"
    )


def auto_plan(profile: StepProfile, budget: int, options: dict[str, Any] | None = None) -> Plan:
    """Solve ``profile`` for ``budget`` bytes and wrap the result as a Plan named ``auto``."""
    sol = solve(profile, budget)
    return Plan(
        profile.blocks,
        sol.decisions,
        policy="auto",
        options=dict(options or {}),
        notes={
            "budget_bytes": budget,
            "predicted_peak_bytes": sol.peak,
            "predicted_extra_time_s": sol.cost / 1e9,
        },
    )
