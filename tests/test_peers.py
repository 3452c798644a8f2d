"""Smoke test of the benchmarks.peers package's logic on a tiny Llama (1 round, no torch.compile): no timing asserted.

Checks the invariants that make the side-by-side table trustworthy: every peer and policy is
measured or listed as skipped with a reason; gradients equal no checkpointing's (torch.equal);
exact FLOP and byte relations between configurations that must agree (gradckpt ``full``, plain
torch checkpoint and HF's non-reentrant checkpointing recompute the same ops; HF's reentrant
variant has no early stop so it recomputes more; torch SAC keeping every matmul recomputes none);
the frontier verdicts on hand-made points; the Markdown and README rendering.
Run: .venv/bin/python -m pytest tests/test_peers.py -q
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from benchmarks import peers, render_readme

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def res() -> dict[str, Any]:
    torch.manual_seed(0)
    return peers.run_peers(
        layers=2, batch=1, seq=16, repeats=1, warmup=0, compile_budgets=(), device="cpu"
    )


def rows(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in res["rows"]}


def test_every_configuration_is_measured_or_skipped_with_a_reason(res: dict[str, Any]) -> None:
    r = rows(res)
    for label in ("none", "full", "every:2", "sqrt", "selective"):
        assert r[label]["family"] == "gradckpt"
    skipped = {s["label"]: s["reason"] for s in res["skipped"]}
    for label in (
        "hf",
        "hf-reentrant",
        "hf-every2",
        "torch-ckpt",
        "torch-sac-titan",
        "torch-sac-mm",
    ):
        if label == "hf-every2" and label not in r:  # transformers 4.x: no every_n_layers
            assert "has no every_n_layers option" in skipped[label]
            continue
        assert r[label]["family"] == "peer"
    for label in ("offload-acts", "hf-offload", "offload"):
        if label == "hf-offload" and "has no offload option" in skipped[label]:
            continue  # transformers 4.x: activation_checkpointing_enable(offload=) is 5's
        assert "CPU-only" in skipped[label]
    # the planner was asked for a plan at every peer's peak: measured, aliased or skipped
    planned = {a["peer"] for a in res["aliases"]} | {
        x["matched_peer"] for x in res["rows"] if x["matched_peer"]
    }
    planned |= {lbl.removeprefix("auto@") for lbl in skipped if lbl.startswith("auto@")}
    assert planned == {x["label"] for x in res["rows"] if x["family"] == "peer"}


def test_gradients_equal_no_checkpointing_for_every_configuration(res: dict[str, Any]) -> None:
    for r in res["rows"]:
        assert r["grads_equal"] is True, (r["label"], r["grad_max_abs_diff"])


def test_flops_and_bytes_agree_where_the_same_ops_are_recomputed(res: dict[str, Any]) -> None:
    r = rows(res)
    assert r["none"]["extra_flops"] == 0 and r["none"]["extra_bytes"] == 0
    full = r["full"]["extra_flops"]
    assert full > 0
    # gradckpt full, torch checkpoint per block and HF non-reentrant: same recompute, same memory
    for label in ("torch-ckpt", "hf"):
        assert r[label]["extra_flops"] == full
        assert r[label]["extra_bytes"] == r["full"]["extra_bytes"]
        assert r[label]["activation_bytes"] == r["full"]["activation_bytes"]
    # reentrant recomputes the whole block (no early stop)
    assert r["hf-reentrant"]["extra_flops"] > full
    assert r["every:2"]["extra_flops"] == full // 2
    if "hf-every2" in r:  # transformers 5's every_n_layers
        assert r["hf-every2"]["extra_flops"] == full // 2
    # keeping every matmul and attention output: no matmul FLOPs recomputed
    assert r["torch-sac-mm"]["extra_flops"] == 0 == r["selective"]["extra_flops"]
    assert 0 < r["torch-sac-titan"]["extra_flops"] < full
    # gradckpt's own recompute byte count matches the op-level byte difference
    assert r["full"]["recompute_bytes"] == r["full"]["extra_bytes"]
    assert r["none"]["alloc_peak_delta_bytes"] == r["none"]["peak_delta_bytes"]
    assert r["full"]["activation_bytes"] < r["selective"]["activation_bytes"]
    assert r["selective"]["activation_bytes"] < r["none"]["activation_bytes"]


def test_graph_flops_counts_matmuls_of_a_traced_graph() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda a, b: (a @ b).relu(), tracing_mode="fake")(
        torch.randn(4, 8), torch.randn(8, 3)
    )
    assert peers.graph_flops(gm) == 2 * 4 * 8 * 3


def test_compiled_step_flops_maps_each_block_to_the_graphs_of_its_decision() -> None:
    from gradckpt import Decision as D
    from gradckpt import Plan

    plan = Plan(("b0", "b1", "b2", "b3"), (D.SELECTIVE, D.RECOMPUTE, D.SAVE, D.RECOMPUTE))
    cfg = peers.Config(label="x", family="gradckpt", what="", model=torch.nn.Linear(1, 1))
    cfg.plan = plan
    # forward graphs in order of first appearance (selective, recompute, save), backward
    # graphs in reverse block order (recompute, save, selective)
    cfg.graph_flops = [(False, 1), (False, 2), (False, 4), (True, 100), (True, 10), (True, 1000)]
    assert peers.compiled_step_flops(cfg, 4) == (1 + 1000) + 2 * (2 + 100) + (4 + 10)
    cfg.graph_flops = cfg.graph_flops[:-1]  # a graph missing: unknown, not a wrong number
    assert peers.compiled_step_flops(cfg, 4) is None
    cfg.plan, cfg.graph_flops = None, [(False, 3), (True, 5)]  # a peer: one graph for all blocks
    assert peers.compiled_step_flops(cfg, 4) == 32


def point(
    label: str, family: str, peak: int, cost: float, iqr: float = 0.0, compiled: bool = False
) -> dict[str, Any]:
    return {
        "label": label,
        "family": family,
        "peak_bytes": peak,
        "speed_cost": cost,
        "speed_cost_iqr": iqr,
        "compiled": compiled,
        "extra_flops": None,
    }


def test_frontier_verdicts() -> None:
    pts = [
        point("none", "gradckpt", 100, 0.0),
        point("full", "gradckpt", 50, 0.30, iqr=0.02),
        point("a", "peer", 60, 0.35),  # full fits and is cheaper
        point("b", "peer", 50, 0.29, iqr=0.02),  # full fits, 1 pp slower, noise 2 pp
        point("c", "peer", 55, 0.10),  # full fits but is much slower
        point("d", "peer", 40, 0.50),  # nothing of ours is that small
    ]
    v = {x["peer"]: x for x in peers.frontier_verdicts(pts)}
    assert v["a"]["verdict"] == "dominated" and v["a"]["best"] == "full"
    assert v["b"]["verdict"] == "within noise"
    assert v["c"]["verdict"] == "not dominated"
    assert v["c"]["margin"] == pytest.approx(0.20)
    assert v["d"]["verdict"] == "nothing fits" and v["d"]["best"] is None
    assert [p["label"] for p in peers.pareto(pts)] == ["none", "c", "b", "d"]
    notes = peers.closing_notes({"rows": pts, "frontier": list(v.values())})
    assert len(notes) == 3  # b (noise), c, d; a is dominated
    assert notes[1].startswith("`c` (0.0 MiB, +10.0%)") and "`full` at +30.0%" in notes[1]


def test_frontier_margin_is_paired_per_round_when_rounds_are_known() -> None:
    ours = point("full", "gradckpt", 50, 0.30)
    peer = point("hf", "peer", 50, 0.29)
    # rounds drift together (a slow round slows both): paired, full is 1 point slower every round
    ours["ratios"] = [1.20, 1.50, 1.30, 1.10, 1.40]
    peer["ratios"] = [1.19, 1.49, 1.29, 1.09, 1.39]
    (v,) = peers.frontier_verdicts([ours, peer])
    assert v["paired"] and v["margin"] == pytest.approx(0.01)
    assert v["noise"] == pytest.approx(0.0, abs=1e-12)
    assert v["verdict"] == "not dominated"


def test_frontier_compares_compiled_peers_with_compiled_gradckpt_rows_only() -> None:
    pts = [
        point("none", "gradckpt", 100, 0.0),
        point("full+compile", "gradckpt", 60, 0.25, compiled=True),
        point("compile@0.5", "peer", 60, 0.05, compiled=True),  # not dominated by eager "none"
        point("hf", "peer", 100, 0.30),  # eager: full+compile is not a candidate
    ]
    v = {x["peer"]: x for x in peers.frontier_verdicts(pts)}
    assert v["compile@0.5"]["best"] == "full+compile"
    assert v["compile@0.5"]["verdict"] == "not dominated"
    assert v["hf"]["best"] == "none" and v["hf"]["verdict"] == "dominated"


def test_markdown_and_readme_section(res: dict[str, Any], tmp_path: Path) -> None:
    md = peers.render_markdown(res)
    for r in res["rows"]:
        assert f"`{r['label']}`" in md
    assert f"torch {torch.__version__}" in md
    results = tmp_path / "m-2026-01-01.json"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nkeep\n{render_readme.START}\nold\n{render_readme.END}\ntail\n")
    text = render_readme.replace_between_markers(
        readme.read_text(), render_readme.section(res, results, tmp_path)
    )
    assert text.startswith("# x\nkeep\n") and text.endswith(f"{render_readme.END}\ntail\n")
    assert "old" not in text and "m-2026-01-01.json" in text
    with pytest.raises(ValueError, match="once each"):
        render_readme.replace_between_markers("no markers", "body")


def test_rows_in_the_json_have_exactly_the_row_fields(res: dict[str, Any]) -> None:
    from dataclasses import fields

    names = [f.name for f in fields(peers.Row)]
    for r in res["rows"]:
        assert list(r) == names


def test_gradients_are_compared_with_verifys_rule() -> None:
    from gradckpt.verify import compare_grads

    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.zeros(3)}
    assert compare_grads(a, {k: v.clone() for k, v in a.items()}) == (True, 0.0)
    assert compare_grads(a, {"w": torch.tensor([1.0, 2.5]), "b": torch.zeros(3)}) == (False, 0.5)
    assert compare_grads(a, {"w": a["w"], "b": None}) == (False, float("inf"))
    assert compare_grads(a, {"w": a["w"]}) == (False, float("inf"))  # a name missing: no grad
    ok, diff = compare_grads(a, {"w": torch.tensor([1.0, 2.5]), "b": a["b"]}, atol=0.5)
    assert ok and diff == 0.5
