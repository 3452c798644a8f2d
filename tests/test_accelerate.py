"""`accelerate launch --num_processes 2` of a Trainer script with GradCkptCallback (examples/accelerate_fsdp2.py).

One launch of 2 processes trains the script's tiny Llama twice, without gradckpt and with
policy ``full``: the logged losses must be equal bit for bit, and equal to one process (this
test's own, no launcher) within rounding (the ranks' mean loss is summed in another order).
The launch asks for accelerate's FSDP2 plugin; on a CPU-only machine accelerate 1.15 enables
FSDP only for GPU-family devices, so the Trainer wraps the model in DDP over gloo there (the
test checks which wrapper it got: DDP on CPU, FSDP on CUDA).
Run: PYTHONPATH=src .venv/bin/python -m pytest -p no:xdist -q tests/test_accelerate.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "accelerate_fsdp2.py"
FSDP2 = [
    "--use_fsdp",
    "--fsdp_version", "2",
    "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
]  # fmt: skip


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("accelerate")
    if found is None:
        pytest.skip("the accelerate command is not on PATH")
    return [found]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_accelerate_launch_two_processes_equals_one(tmp_path: Path) -> None:
    two, one = tmp_path / "two.json", tmp_path / "one.json"
    launch = [
        *_accelerate(), "launch", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", *FSDP2,
        str(SCRIPT), "--policy", "none,full", "--out", str(two), "--workdir", str(tmp_path / "w2"),
    ]  # fmt: skip
    proc = subprocess.run(
        launch, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one process: the same script, run here (no launcher, no process group)
    spec = importlib.util.spec_from_file_location("accelerate_fsdp2", SCRIPT)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["accelerate_fsdp2.py", "--policy", "none", "--out", str(one)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [*argv, "--workdir", str(tmp_path / "w1")])
        mp.delenv("WORLD_SIZE", raising=False)
        mp.delenv("RANK", raising=False)
        example.main()

    got, ref = json.loads(two.read_text()), json.loads(one.read_text())
    assert got["world"] == 2 and ref["world"] == 1
    none, full = got["runs"]["none"], got["runs"]["full"]
    assert full["plans"] == ["full: 3 recompute"] and none["plans"] == []
    assert full["losses"] == none["losses"]  # checkpointing changes nothing, bit for bit
    assert torch.allclose(
        torch.tensor(full["losses"]), torch.tensor(ref["runs"]["none"]["losses"]), rtol=1e-6, atol=0
    )
    wrapper = full["wrapped_by"]
    if torch.cuda.is_available():
        assert "FSDP" in wrapper, wrapper
    else:
        assert wrapper == "DistributedDataParallel", wrapper
