"""Plan is plain data: validation, JSON round trip, printing; policies build the right plans.

Run: .venv/bin/python -m pytest tests/test_plan.py -q
"""

from __future__ import annotations

import itertools

import pytest

import gradckpt
from gradckpt import Decision, Plan
from gradckpt.policies import sqrt_segments

R, S = Decision.RECOMPUTE, Decision.SAVE
NAMES = [f"layers.{i}" for i in range(8)]


def test_named_policies() -> None:
    assert gradckpt.make_plan("none", NAMES).decisions == (S,) * 8
    assert gradckpt.make_plan("full", NAMES).decisions == (R,) * 8
    assert gradckpt.make_plan("every:1", NAMES).decisions == (R,) * 8
    assert gradckpt.make_plan("every:3", NAMES).decisions == (R, S, S, R, S, S, R, S)
    sq = gradckpt.make_plan("sqrt", NAMES)
    assert sq.decisions == (R,) * 8
    assert sq.segments == ((0, 3), (3, 6), (6, 8))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 9, 16, 32, 100])
def test_sqrt_segments_cover_all_blocks_in_about_sqrt_n_runs(n: int) -> None:
    segs = sqrt_segments(n)
    assert segs[0][0] == 0 and segs[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(segs))
    sizes = [b - a for a, b in segs]
    assert max(sizes) - min(sizes) <= 1
    assert abs(len(segs) - n**0.5) <= 0.5 + 1e-9


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("ful", "did you mean 'full'"),
        ("every:0", ">= 1"),
        ("every:x", "integer"),
        ("every", "needs an argument"),
        ("full:2", "takes no argument"),
        ("bogus", "valid policies: none, full"),
    ],
)
def test_bad_policy_names(policy: str, message: str) -> None:
    with pytest.raises(gradckpt.PolicyError, match=message):
        gradckpt.make_plan(policy, NAMES)


def test_unknown_option_is_refused() -> None:
    with pytest.raises(gradckpt.PolicyError, match="does not take option"):
        gradckpt.make_plan("full", NAMES, save_ops=["mm"])


def test_json_round_trip_and_table() -> None:
    plan = Plan(
        tuple(NAMES[:4]), (R, R, S, R), segments=((0, 2),), policy="custom", notes={"peak": 12}
    )
    again = Plan.from_json(plan.to_json())
    assert again == plan
    text = str(plan)
    assert "layers.0  recompute  0-1" in text
    assert plan.summary() == "custom: 1 save, 3 recompute, in 1 segments"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blocks": ("a", "b"), "decisions": (R,)}, "2 blocks but 1 decisions"),
        ({"blocks": ("a", "a"), "decisions": (R, R)}, "twice"),
        ({"blocks": ("a", "b"), "decisions": ("fast", R)}, "one of: save"),
        ({"blocks": ("a", "b"), "decisions": (R, S), "segments": ((0, 2),)}, "not RECOMPUTE"),
        ({"blocks": ("a", "b"), "decisions": (R, R), "segments": ((0, 1),)}, ">= 2 blocks"),
        ({"blocks": ("a", "b"), "decisions": (R, R), "segments": ((0, 3),)}, ">= 2 blocks"),
    ],
)
def test_invalid_plans(kwargs: dict, message: str) -> None:
    with pytest.raises(gradckpt.PlanError, match=message):
        Plan(**kwargs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"blocks": 3}', "'blocks' list"),
        ('{"blocks": [{"name": "a"}]}', "malformed"),
        ('{"version": 9, "blocks": []}', "version 9"),
    ],
)
def test_malformed_plan_json(text: str, message: str) -> None:
    with pytest.raises(gradckpt.PlanError, match=message):
        Plan.from_json(text)
