"""gradckpt bench: table, JSON with the promised fields, plot; bad input exits 2 with one line.

Run: .venv/bin/python -m pytest tests/test_cli_bench.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradckpt.bench import run_bench
from gradckpt.cli import main
from gradckpt.errors import ConfigError


def test_bench_writes_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    code = main(
        [
            "bench",
            "--model",
            "mlp",
            "--layers",
            "3",
            "--batch",
            "2",
            "--seq",
            "16",
            "--policies",
            "full,every:2,sqrt",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--quiet",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "speed cost" in text and "every:2" in text
    data = json.loads(out.read_text())
    assert data["settings"]["batch"] == 2 and data["settings"]["seq"] == 16
    assert data["model"] == "mlp"
    rows = {r["policy"]: r for r in data["results"]}
    assert list(rows) == ["none", "full", "every:2", "sqrt"]
    for r in rows.values():
        for key in ("peak_bytes", "activation_bytes", "time_s", "speed_cost", "extra_flops"):
            assert key in r
        assert isinstance(r["peak_bytes"], int) and len(r["times_s"]) == 2
    assert rows["none"]["extra_flops"] == 0 and rows["none"]["speed_cost"] == 0.0
    assert (
        rows["full"]["activation_bytes"]
        < rows["every:2"]["activation_bytes"]
        < rows["none"]["activation_bytes"]
    )
    assert rows["full"]["extra_flops"] > rows["every:2"]["extra_flops"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_library_on_llama_full_keeps_only_block_outputs() -> None:
    report = run_bench("llama", layers=4, batch=2, seq=64, policies=["full"], repeats=1, warmup=0)
    none, full = report.result("none"), report.result("full")
    hidden_state = 2 * 64 * 512 * 4  # batch * seq * hidden * fp32
    # With full recompute, a block adds exactly its output (the next block's kept input).
    assert list(full.stats["block_bytes"].values()) == [hidden_state] * 4
    assert all(b > 10 * hidden_state for b in none.stats["block_bytes"].values())
    assert 0 < full.extra_flops <= none.stats["forward_flops"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "fastest"], "unknown policy 'fastest'"),
        (["--policies", "full,,none"], "without empty items"),
        (["--batch", "0"], "integer >= 1"),
        (["--seq", "x"], "integer >= 1"),
        (["--model", "lama"], "did you mean 'llama'"),
        (["--model", "/nonexistent/config.json"], "does not exist"),
        (["--json", "/nonexistent/dir/out.json"], "does not exist"),
        (["--policies", "every:0"], ">= 1"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gradckpt.cli", "bench", "--layers", "1", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]


def test_malformed_config_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["bench", "--model", str(bad), "--quiet"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    bad.write_text('{"hidden_size": 8}')
    assert main(["bench", "--model", str(bad), "--quiet"]) == 2
    assert "no 'model_type'" in capsys.readouterr().err


def test_old_models_module_warns_and_reexports_the_bench_models() -> None:
    import importlib

    import gradckpt.bench.models as new

    sys.modules.pop("gradckpt.models", None)
    with pytest.warns(DeprecationWarning, match=r"gradckpt\.bench\.models"):
        old = importlib.import_module("gradckpt.models")
    for name in ("BENCH_PRESETS", "BenchModel", "MLPStack", "build_bench_model", "make_batch"):
        assert getattr(old, name) is getattr(new, name)


def test_time_interleaved_rotates_the_order_and_leaves_warmup_out() -> None:
    from gradckpt.bench import time_interleaved

    ran: list[str] = []
    calls: list[tuple[int, str]] = []
    prepared: list[str] = []
    times = time_interleaved(
        {k: (lambda k=k: ran.append(k)) for k in ("a", "b", "c")},
        repeats=2,
        warmup=2,
        prepare=prepared.append,
        progress=lambda r, label: calls.append((r, label)),
    )
    # round r starts at step r % 3; every step is prepared right before it runs
    assert ran == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert prepared == ran and [label for _, label in calls] == ran
    assert [r for r, _ in calls] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert {k: len(v) for k, v in times.wall.items()} == {"a": 2, "b": 2, "c": 2}
    assert {k: len(v) for k, v in times.cpu.items()} == {"a": 2, "b": 2, "c": 2}
    assert len(times.ratios("b", reference="a", clock="cpu")) == 2
    # CUDA-event times exist only for steps timed on a CUDA device
    assert times.gpu == {}
    with pytest.raises(ConfigError, match="only for steps timed on CUDA"):
        times.ratios("b", reference="a", clock="gpu")
    with pytest.raises(ConfigError, match="clock must be"):
        times.ratios("b", reference="a", clock="cuda")
    with pytest.raises(ConfigError, match="repeats"):
        time_interleaved({"a": lambda: None}, repeats=0)
    with pytest.raises(ConfigError, match="warmup"):
        time_interleaved({"a": lambda: None}, repeats=1, warmup=-1)


def test_bench_budgets_are_measured_next_to_policies_or_skipped() -> None:
    report = run_bench(
        "mlp",
        layers=2,
        batch=1,
        seq=16,
        policies=["full"],
        budgets=["1GiB", "1%"],
        repeats=1,
        warmup=0,
    )
    assert [r.policy for r in report.results] == ["none", "full", "auto@1GiB"]
    assert len(report.result("auto@1GiB").times_s) == 1
    assert [s["policy"] for s in report.skipped] == ["auto@1%"]


def test_bench_refuses_two_configurations_with_one_label() -> None:
    # before: the second 'auto@1GiB' overwrote the first's memory and doubled its timed steps
    with pytest.raises(ConfigError, match="auto@1GiB"):
        run_bench("mlp", layers=1, policies=["full"], budgets=["1GiB", "1GiB"])
