"""``benchmarks.gpu_check --cpu-smoke``: the GPU kit's code paths on CPU, so it cannot rot while no GPU is around.

Checks that the smoke run (two-block Qwen2 and Llama-LoRA configs, every registered policy, HF's
own checkpointing and ``auto`` at a budget) writes JSON and Markdown with a measured peak and a
prediction for every configuration, that checkpointing lowers the measured peak and the
prediction alike, that interleaved timing produced per-round ratios, and that
``benchmarks.render_readme`` turns results into the README's GPU section (and never uses a smoke
run for it); and that the kit's pytest step reads per-test outcomes from JUnit XML.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src:. .venv/bin/python -m pytest tests/test_gpu_check.py -q
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from benchmarks import gpu_check, render_readme
from benchmarks.gpu_workloads import SMOKE_WORKLOADS, policies_to_run

pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    # in-process predictions (no worker to start) and a time limit no loaded CI machine reaches
    argv = ["--cpu-smoke", "--out", str(out), "--skip-tests", "--estimate-workers", "0"]
    argv += ["--time-limit", "900"]
    assert gpu_check.main(argv) == 0
    (path,) = out.glob("gpu-cpu-smoke-*.json")
    assert path.with_suffix(".md").exists()
    return json.loads(path.read_text()), path


def test_every_configuration_is_measured_next_to_its_prediction(smoke: Any) -> None:
    res, _ = smoke
    assert res["schema"] == "gpu-check/1" and res["smoke"] and res["complete"]
    labels = [*policies_to_run(), "hf", "auto"]
    pairs = [(w.name, s) for w in SMOKE_WORKLOADS for s in w.seqs]
    for name, seq in pairs:
        rows = {r["policy"]: r for r in res["rows"] if (r["workload"], r["seq"]) == (name, seq)}
        assert list(rows) == labels, (name, seq)
        for label, r in rows.items():
            assert r["status"] == "ok", (name, seq, label, r["status"])
            assert isinstance(r["allocated_bytes"], int) and r["allocated_bytes"] > 0
            if label == "auto" and r["predicted"] is None:
                # the estimator's planner may refuse a budget the device's accepted: then it
                # must say why (a finding the report shows, not a gap in the kit)
                assert res["predictions"][f"{name}@{seq}"]["auto_error"]
            else:
                assert r["predicted"]["allocated_bytes"] > 0, (name, seq, label)
                assert isinstance(r["allocated_error"], float)
            assert r["ratios"] and r["time_s"] > 0, (name, seq, label)
        none, full = rows["none"], rows["full"]
        # checkpointing lowers the peak, measured and predicted
        assert full["allocated_bytes"] < none["allocated_bytes"]
        assert full["predicted"]["allocated_bytes"] < none["predicted"]["allocated_bytes"]
        assert rows["hf"]["allocated_bytes"] < none["allocated_bytes"]
        assert rows["hf"]["predicted"] == full["predicted"]  # compared with full's prediction
        assert rows["none"]["speed_cost"] == 0.0
        # CPU: measured and predicted are the same count of live storages (CUDA adds kernels)
        assert abs(none["allocated_error"]) < 0.01 and abs(full["allocated_error"]) < 0.01
        auto = rows["auto"]
        assert auto["plan"].startswith("auto")
        assert full["allocated_bytes"] < auto["budget_bytes"] < none["allocated_bytes"]
        assert auto["allocated_bytes"] <= auto["budget_bytes"]


def test_markdown_and_readme_gpu_section(smoke: Any, tmp_path: Path) -> None:
    res, path = smoke
    md = path.with_suffix(".md").read_text()
    assert "CPU smoke run" in md
    for label in [*policies_to_run(), "hf", "auto"]:
        assert f"`{label}`" in md
    # a smoke run is never what the README shows
    assert render_readme.latest_gpu_results(path.parent) is None
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{render_readme.GPU_START}\nold\n{render_readme.GPU_END}\nend\n")
    empty = render_readme.gpu_section(None, None, tmp_path)
    assert "not been measured on a GPU yet" in empty and "make gpu-check" in empty
    real = dict(res, smoke=False, machine=dict(res["machine"], device="NVIDIA H200"))
    gpu_file = tmp_path / "gpu-nvidia-h200-2026-12-02.json"
    gpu_file.write_text(json.dumps(real))
    assert render_readme.latest_gpu_results(tmp_path) == gpu_file
    argv = ["--section", "gpu", "--readme", str(readme), "--gpu-file", str(gpu_file)]
    assert render_readme.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("top\n") and text.endswith(f"{render_readme.GPU_END}\nend\n")
    assert "gpu-nvidia-h200-2026-12-02.json" in text and "measured on NVIDIA H200" in text


def test_pytest_step_reports_each_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tests = tmp_path / "test_fake_gpu.py"
    tests.write_text(
        "import pytest\n\n"
        "@pytest.mark.gpu\ndef test_passes():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_fails():\n    assert 1 == 2, 'one is not two'\n\n"
        "def test_not_gpu():\n    pass\n"
    )
    monkeypatch.setattr(gpu_check, "TEST_FILES", (str(tests),))
    res = gpu_check.Results(tmp_path / "r.json", tmp_path / "r.md", {"skipped": [], "rows": []})
    gpu_check.run_tests(res, gpu_check.Clock(60), 60, smoke=True)
    t = res.data["tests"]
    assert t["counts"] == {"passed": 1, "failed": 1} and t["returncode"] == 1
    failed = [c for c in t["cases"] if c["outcome"] == "failed"]
    assert failed[0]["name"].endswith("test_fails") and "one is not two" in failed[0]["message"]
    assert json.loads((tmp_path / "r.json").read_text())["tests"]["counts"] == t["counts"]
