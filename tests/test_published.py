"""benchmarks/published: the table of published GPU measurements and the script that estimates it.

Checks that every row names its source at a commit, a known kind and settings the estimator
accepts; that rows left out of the statistics say why; that a row runs end to end (a small
made-up row on GPT-2, each kind's prediction) and that the median and worst error are taken
over the modelled rows only. The real rows are 3-8B models: ``python -m benchmarks.published``
runs them (minutes), not this test.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src:. python -m pytest -q -p no:xdist tests/test_published.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from gradckpt.estimate import TrainingSetup

run = pytest.importorskip("benchmarks.published.run")


def test_every_row_has_a_source_a_kind_and_settings_the_estimator_accepts() -> None:
    rows = run.load_rows()
    assert len(rows) >= 12 and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert re.fullmatch(r"[0-9a-f]{40}", r["source"]["commit"]), r["id"]
        assert r["source"]["commit"] in r["source_url"]
        assert r["measured"]["kind"] in run.KINDS
        est = dict(r["estimate"])
        est.pop("model"), est.pop("policy")
        TrainingSetup(**est)  # a typo in a setting raises here
        if not r["modelled"]:
            assert len(r["not_modelled_reason"]) > 40, r["id"]
    kinds = {r["measured"]["kind"] for r in rows if r["modelled"]}
    assert {"allocated", "reserved", "capacity"} <= kinds


TINY = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}  # fmt: skip


def _row(model: str, kind: str, **extra: Any) -> dict[str, Any]:
    row = {
        "id": f"tiny-{kind}",
        "measured": {"kind": kind, "value": 0, "bytes": 10**8},
        "estimate": {"model": model, "batch": 1, "seq": 512, "policy": "full"},
        "modelled": True,
    }
    row.update(extra)
    return row


def test_a_row_runs_end_to_end_for_each_kind(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    allocated = run.run_row(_row(str(cfg), "allocated"))
    reserved = run.run_row(_row(str(cfg), "reserved"))
    p = reserved["prediction"]
    assert allocated["predicted"] == p["allocated"] <= p["reserved"] == reserved["predicted"]
    assert reserved["error"] == pytest.approx(p["reserved"] / 10**8 - 1)
    # a card that holds exactly the step at 512 tokens: the longest multiple of 128 that fits
    cap = p["device_total"]
    capacity = run.run_row(
        _row(str(cfg), "capacity", capacity={"gpu_bytes": cap, "seq_step": 128})
        | {"measured": {"kind": "capacity", "value": 500}}
    )
    got = capacity["prediction"]
    assert capacity["predicted"] == got["seq"] == 512
    assert got["device_total"] <= cap < got["next"]
    assert capacity["error"] == pytest.approx(512 / 500 - 1)
    # the same card read as a reserved-memory extrapolation: reserved bytes, no CUDA context,
    # so a card of the step's reserved bytes at 512 tokens stops at 512 tokens too
    res_cap = p["reserved"]
    by_reserved = run.run_row(
        _row(str(cfg), "capacity",
             capacity={"gpu_bytes": res_cap, "seq_step": 128, "criterion": "reserved"})
        | {"measured": {"kind": "capacity", "value": 500}}
    )  # fmt: skip
    got = by_reserved["prediction"]
    assert got["criterion"] == "reserved" and got["seq"] == 512
    assert got["reserved"] <= res_cap < got["next"]
    with pytest.raises(ValueError, match="criterion"):
        bad = _row(
            str(cfg), "capacity", capacity={"gpu_bytes": 1, "seq_step": 1, "criterion": "oom"}
        )
        path = tmp_path / "bad.json"
        path.write_text(json.dumps([bad | {"measured": {"kind": "capacity", "value": 1}}]))
        run.load_rows(path)


def test_summary_counts_modelled_rows_only_and_the_markdown_lists_the_others() -> None:
    res = [
        {"id": "a", "kind": "reserved", "modelled": True, "error": 0.02, "measured": 1, "predicted": 1},
        {"id": "b", "kind": "reserved", "modelled": True, "error": -0.06, "measured": 1, "predicted": 1},
        {"id": "c", "kind": "reserved", "modelled": True, "error": 0.01, "measured": 1, "predicted": 1},
        {"id": "d", "kind": "active", "modelled": False, "error": 1.5, "measured": 1, "predicted": 2,
         "not_modelled_reason": "torch.compile"},
    ]  # fmt: skip
    s = run.summary(res)
    assert s["rows"] == 3 and s["median_abs_error"] == 0.02
    assert s["worst"] == "b" and s["worst_abs_error"] == pytest.approx(0.06)
    rows = [
        {"id": r["id"], "source_url": "u", "setup": "s", "estimate": {}, "assumptions": []}
        for r in res
    ]
    meta = {"summary": s, "date": "d", "torch": "t", "transformers": "x", "elapsed_s": 1.0,
            "machine": "m"}  # fmt: skip
    md = run.markdown(rows, res, meta)
    assert "median absolute error 2.0%, worst 6.0%" in md
    assert "+150.0% (not modelled)" in md and "**Not modelled**: torch.compile." in md
