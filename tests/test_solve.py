"""The budget solver on plain data (no torch models): exact vs brute force, edges, determinism.

Run: .venv/bin/python -m pytest tests/test_solve.py -q
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradckpt
from gradckpt.planner import BlockOption, StepProfile, min_peak, predict_cost, predict_peak, solve
from gradckpt.planner.solve import _ORDER, Solution, _key

S, R, SEL, OFF = (
    gradckpt.Decision.SAVE,
    gradckpt.Decision.RECOMPUTE,
    gradckpt.Decision.SELECTIVE,
    gradckpt.Decision.OFFLOAD,
)
MiB = 1 << 20


def brute_force(profile: StepProfile, budget: int) -> Solution | None:
    """Enumerate every plan (exponential in the block count): the solver's reference."""
    best: tuple[tuple[int, int, tuple[int, ...]], Solution] | None = None
    for decs in itertools.product(*[sorted(o, key=_ORDER.__getitem__) for o in profile.options]):
        peak = predict_peak(profile, decs)
        if peak > budget:
            continue
        cost = predict_cost(profile, decs)
        k = _key(cost, tuple(decs))
        if best is None or k < best[0]:
            best = (k, Solution(tuple(decs), peak, cost))
    return None if best is None else best[1]


def uniform(n: int, *, base: int = 100 * MiB, head: int = 40 * MiB) -> StepProfile:
    """n identical transformer-like blocks: SAVE keeps 40 MiB, SELECTIVE 12, RECOMPUTE 2."""
    opts = {
        S: BlockOption(kept=40 * MiB, fwd_extra=42 * MiB, bwd_extra=14 * MiB, cost=0),
        SEL: BlockOption(kept=12 * MiB, fwd_extra=30 * MiB, bwd_extra=40 * MiB, cost=1_000_000),
        R: BlockOption(kept=2 * MiB, fwd_extra=20 * MiB, bwd_extra=55 * MiB, cost=30_000_000),
    }
    return StepProfile(
        blocks=tuple(f"layers.{i}" for i in range(n)),
        options=tuple(dict(opts) for _ in range(n)),
        fwd_base=(base,) * n,
        bwd_base=tuple(base + 8 * MiB * (n - i) for i in range(n)),
        pre_peak=base,
        head_base=base + head,
        tail_peak=base + 8 * MiB * n,
        batch=4,
        fixed_bytes=base,
    )


def test_peak_model_by_hand() -> None:
    p = uniform(2)
    # head: base + head + kept(all) dominates for SAVE blocks
    assert predict_peak(p, [S, S]) == 100 * MiB + 40 * MiB + 80 * MiB
    # RECOMPUTE: block 0's backward: bwd_base[0] + kept(<=0) + bwd_extra
    assert predict_peak(p, [R, R]) == max(140 * MiB + 4 * MiB, 116 * MiB + 2 * MiB + 55 * MiB)
    assert predict_cost(p, [R, SEL]) == 31_000_000


def test_budget_at_none_peak_keeps_everything_and_below_recomputes() -> None:
    p = uniform(8)
    none_peak = predict_peak(p, [S] * 8)
    assert solve(p, none_peak).decisions == (S,) * 8
    below = solve(p, none_peak - 1)
    assert below.peak <= none_peak - 1
    assert S in below.decisions and below.cost > 0


def test_budget_exactly_at_a_breakpoint() -> None:
    p = uniform(6)
    for decisions in ([S, S, SEL, SEL, R, R], [SEL] * 6, [R] * 6):
        peak = predict_peak(p, decisions)
        sol = solve(p, peak)
        assert sol.peak <= peak
        assert sol.cost <= predict_cost(p, decisions)
        with pytest.raises(gradckpt.BudgetError):
            solve(p, min_peak(p).peak - 1)


def test_infeasible_budget_says_smallest_peak_and_batch() -> None:
    p = uniform(4)
    lean = min_peak(p)
    with pytest.raises(gradckpt.BudgetError, match="smallest achievable peak") as err:
        solve(p, lean.peak - 5 * MiB)
    assert "batch" in str(err.value)
    with pytest.raises(gradckpt.BudgetError, match="even batch 1 would not fit"):
        solve(p, 50 * MiB)


def test_one_block_and_hundred_blocks() -> None:
    one = uniform(1)
    assert solve(one, predict_peak(one, [S])).decisions == (S,)
    assert solve(one, predict_peak(one, [R])).decisions in ((R,), (SEL,), (S,))
    big = uniform(100)
    lean = min_peak(big)
    budget = lean.peak + 300 * MiB
    sol = solve(big, budget)
    assert len(sol.decisions) == 100 and sol.peak <= budget
    # no better than optimal: at least as cheap as every every-K mix of two decisions that fits
    for keep in (S, SEL):
        for k in range(1, 101):
            mix = [R if i % k == 0 else keep for i in range(100)]
            if predict_peak(big, mix) <= budget:
                assert sol.cost <= predict_cost(big, mix)


def test_ties_go_to_fewer_checkpointed_blocks_and_are_deterministic() -> None:
    opts = {
        S: BlockOption(kept=10, fwd_extra=10, bwd_extra=0, cost=0),
        R: BlockOption(kept=10, fwd_extra=10, bwd_extra=0, cost=0),  # same bytes, same time
    }
    p = StepProfile(("a", "b"), (opts, opts), (0, 0), (0, 0), 0, 0, 0)
    assert solve(p, 1000).decisions == (S, S)
    assert all(solve(p, 1000) == solve(p, 1000) for _ in range(3))


def test_bad_budget_values() -> None:
    p = uniform(2)
    for bad in (0, -5, 1.5, "1GiB", True):
        with pytest.raises(gradckpt.BudgetError):
            solve(p, bad)  # type: ignore[arg-type]


def test_profile_round_trips_as_plain_data() -> None:
    p = uniform(3)
    assert StepProfile.from_dict(p.to_dict()) == p


def _random_profile(rng: random.Random, n: int, decisions: list) -> StepProfile:
    options = []
    for _ in range(n):
        opts = {}
        for d in decisions:
            kept = rng.randrange(0, 50) * MiB
            opts[d] = BlockOption(
                kept=kept,
                fwd_extra=kept + rng.randrange(0, 20) * MiB,
                bwd_extra=rng.randrange(0, 60) * MiB,
                cost=rng.randrange(0, 5) * 1_000_000,
            )
        options.append(opts)
    base = 100 * MiB
    return StepProfile(
        blocks=tuple(f"b{i}" for i in range(n)),
        options=tuple(options),
        fwd_base=tuple(base + rng.randrange(0, 10) * MiB for _ in range(n)),
        bwd_base=tuple(base + rng.randrange(0, 30) * MiB for _ in range(n)),
        pre_peak=base,
        head_base=base + rng.randrange(0, 80) * MiB,
        tail_peak=base + rng.randrange(0, 50) * MiB,
    )


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 5),
    k=st.integers(2, 4),
    frac=st.floats(0.0, 1.0),
)
def test_equals_brute_force_optimum(seed: int, n: int, k: int, frac: float) -> None:
    rng = random.Random(seed)
    p = _random_profile(rng, n, [S, R, SEL, OFF][:k])
    lo = min_peak(p).peak
    hi = max(predict_peak(p, [d] * n) for d in [S, R, SEL, OFF][:k])
    budget = int(lo + frac * (max(hi, lo) - lo))
    expected = brute_force(p, budget)
    if expected is None:
        with pytest.raises(gradckpt.BudgetError):
            solve(p, budget)
        return
    got = solve(p, budget)
    assert got.peak <= budget
    assert got.cost == expected.cost
    assert got.decisions == expected.decisions  # same tie-breaking, so the same plan
