"""``make gpu-check``: one prepared run that measures gradckpt's CUDA claims, in under 8 minutes.

Steps, each under its own time guard, results written after every measurement (a run killed at
its limit keeps what it measured):

1. The machine: device, driver, torch / transformers / peft versions.
2. The ``gpu``-marked tests (``tests/test_gpu.py``, ``tests/test_offload.py``) in a pytest
   subprocess: offload overlap and host blocking, pinned-buffer reuse, ``offload_saved``, the
   allocator-based ``measure``, gradients of every policy against ``none`` (fp32 exact, bf16
   within tolerance).
3. Per workload (``benchmarks.gpu_workloads``: Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.1-8B LoRA,
   random weights from their configs) and sequence length, for every policy of
   ``gradckpt.policy_names()``, HF's own ``gradient_checkpointing_enable()`` and ``auto`` at a
   budget: peak allocated and reserved bytes of one steady-state step next to
   ``gradckpt.estimate``'s prediction for the same setup (computed meanwhile in a worker
   process); then interleaved rounds timed with CUDA events, the speed cost being the median of
   per-round ratios to ``none``, next to the estimate's roofline prediction.
4. Offload: the share of its host copies hidden behind compute (CUDA events).
5. ``benchmarks/results/gpu-<device>-<date>.json`` and ``.md``; ``python -m
   benchmarks.render_readme`` puts the newest into README.md.

``--cpu-smoke`` runs the same code on two-block models on CPU in well under a minute (what
``tests/test_gpu_check.py`` runs in ``make test``), writing into a temporary directory.

Run (from the checkout, nothing installed): ``PYTHONPATH=src:. python -m benchmarks.gpu_check``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks import gpu_workloads as wl
from benchmarks.gpu_measure import (
    Clock,
    Predictions,
    Results,
    finish_predictions,
    predict_named,
    run_workload,
    say,
)

__all__ = ["Clock", "Results", "main", "machine", "run_tests"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
SCHEMA = "gpu-check/1"
#: The issue's limit is 8 minutes; 450 s leaves room for interpreter start-up and CUDA init.
DEFAULT_LIMIT_S = 450.0
TEST_FILES = ("tests/test_gpu.py", "tests/test_offload.py")
#: Share of the time limit the pytest step may use (the tests take ~1 minute on an H100).
TESTS_SHARE = 0.3
#: Kept back at the end for writing results.
RESERVE_S = 10.0


# -- 1. the machine -------------------------------------------------------------------------


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "installed"


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (
        out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    )


def machine(device: torch.device) -> dict[str, Any]:
    """Device name, memory, driver, CUDA and library versions."""
    info: dict[str, Any] = {
        "device": "cpu",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "trl": _version("trl"),
        "bitsandbytes": _version("bitsandbytes"),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=torch.cuda.get_device_name(device),
            memory_bytes=int(props.total_memory),
            capability=f"{props.major}.{props.minor}",
            driver=_driver(),
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


# -- 2. the gpu-marked tests ----------------------------------------------------------------


def run_tests(res: Results, clock: Clock, limit_s: float, smoke: bool) -> None:
    """The gpu-marked tests in a pytest subprocess; per-test outcomes from its JUnit XML."""
    if importlib.util.find_spec("pytest") is None:
        res.skip("gpu tests", "pytest is not installed here", clock)
        return
    files = [f for f in TEST_FILES if (ROOT / f).exists()]
    say(clock, f"gpu tests: {' '.join(files)} (limit {limit_s:.0f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        if importlib.util.find_spec("xdist") is not None:
            cmd += ["-p", "no:xdist"]
        cmd += ["--junitxml", str(xml), "-o", "addopts=", *files]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")]
        )
        env.setdefault(
            "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
        )  # deterministic cuBLAS (fp32 exactness)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, timeout=max(limit_s, 5.0), capture_output=True, text=True
            )
            code: int | str = proc.returncode
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            code, tail = "timeout", str(e.stdout or "")[-3000:]
        cases = _junit(xml) if xml.exists() else []
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    res.data["tests"] = {
        "command": " ".join(["pytest", *cmd[3 : -len(files)], *files]).replace(
            str(xml), "junit.xml"
        ),
        "returncode": code,
        "seconds": time.perf_counter() - t0,
        "counts": counts,
        "cases": cases,
        "output_tail": tail if code not in (0, 5) else "",
    }
    res.save()
    say(clock, f"gpu tests: {counts or 'no results'} (exit {code})")
    for c in cases:
        if c["outcome"] in ("failed", "error"):
            say(clock, f"  {c['outcome']}: {c['name']}: {c['message'][:200]}")


def _junit(path: Path) -> list[dict[str, Any]]:
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or el.text or "").strip().splitlines()[0:1]
                message = message[0] if message else ""
                break
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}".removeprefix("tests.")
        cases.append(
            {
                "name": name,
                "outcome": outcome,
                "message": message,
                "seconds": float(tc.get("time") or 0),
            }
        )
    return cases


# -- the run ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny models on CPU: the same code paths in < 1 min",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help=f"seconds for the whole run (default {DEFAULT_LIMIT_S:.0f}; smoke 300)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results; smoke: a temporary one)",
    )
    p.add_argument("--skip-tests", action="store_true", help="leave out the pytest step")
    p.add_argument(
        "--only", default=None, help="comma-separated workload names to run (default all)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds per sequence length (default 5; smoke 2)",
    )
    p.add_argument(
        "--estimate-workers",
        type=int,
        default=None,
        help="processes computing predictions meanwhile (0: in this one; default 2, smoke 1)",
    )
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here; on a GPU machine run `make gpu-check`, "
            "or `make gpu-check-smoke` for the CPU smoke run",
            file=sys.stderr,
        )
        return 2
    for name, value in (("--rounds", a.rounds), ("--estimate-workers", a.estimate_workers)):
        if value is not None and value < (1 if name == "--rounds" else 0):
            print(
                f"gpu-check: {name} must be >= {1 if name == '--rounds' else 0}, got {value}",
                file=sys.stderr,
            )
            return 2
    dev = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    clock = Clock(a.time_limit or (300.0 if smoke else DEFAULT_LIMIT_S))
    workloads = list(wl.SMOKE_WORKLOADS if smoke else wl.GPU_WORKLOADS)
    if a.only:
        wanted = [s.strip() for s in a.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {w.name for w in workloads})
        if unknown:
            print(
                f"gpu-check: unknown workload(s) {', '.join(unknown)}; choose from "
                f"{', '.join(w.name for w in workloads)}",
                file=sys.stderr,
            )
            return 2
        workloads = [w for w in workloads if w.name in wanted]
    info = machine(dev)
    date = datetime.now(timezone.utc).date().isoformat()
    out = a.out or (Path(tempfile.mkdtemp(prefix="gpu-check-smoke-")) if smoke else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{'cpu-smoke' if smoke else slug(info['device'])}-{date}"
    res = Results(out / f"{stem}.json", out / f"{stem}.md")
    policies = wl.policies_to_run()
    gpu = wl.gpu_spec(dev)
    res.data.update(
        schema=SCHEMA,
        smoke=smoke,
        date=date,
        machine=info,
        complete=False,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        settings={
            "time_limit_s": clock.limit_s,
            "policies": policies,
            "speed_gpu": gpu.name,
            "precision": "bf16 weights, bf16 autocast, fused AdamW (bf16 states)",
            "workloads": [
                {"name": w.name, "method": w.method, "seqs": list(w.seqs), "batch": w.batch}
                for w in workloads
            ],
        },
        tests=None,
        rows=[],
        offload={},
        predictions={},
        skipped=[],
        command="make gpu-check-smoke" if smoke else "make gpu-check",
    )
    res.save()
    say(
        clock,
        f"{info['device']}, torch {info['torch']}, transformers {info['transformers']}; "
        f"limit {clock.limit_s:.0f} s; writing {res.json_path}",
    )
    runnable = []
    for w in workloads:
        missing = wl.missing_packages(w)
        if missing:
            res.skip(w.name, f"needs {', '.join(missing)}, not installed here", clock)
        else:
            runnable.append(w)
    if threading.current_thread() is threading.main_thread():
        # killed at a time limit (timeout sends SIGTERM first): leave through the finally below,
        # which stops the estimate workers and saves the elapsed time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workers = a.estimate_workers if a.estimate_workers is not None else (1 if smoke else 2)
    preds = Predictions(workers, "smoke" if smoke else "gpu", gpu)
    if preds.note:
        res.skip("estimate worker", preds.note, clock)
    try:
        for w in runnable:
            for seq in w.seqs:
                preds.submit((w.name, seq), predict_named, w.name, seq, policies)
        if a.skip_tests:
            res.skip("gpu tests", "--skip-tests", clock)
        else:
            run_tests(res, clock, TESTS_SHARE * clock.limit_s, smoke)
        start = clock.elapsed()
        room = clock.limit_s - RESERVE_S - start
        total_share = sum(w.share for w in runnable) or 1.0
        until = start
        for w in runnable:
            until += room * w.share / total_share
            run_workload(
                w, res, clock, until, dev, preds, policies, a.rounds or (2 if smoke else 5)
            )
            until = max(until, clock.elapsed())  # time a workload did not use passes on
        if res.pending:
            say(
                clock,
                f"waiting up to {max(0.0, clock.left() - RESERVE_S / 2):.0f} s for the last predictions",
            )
            finish_predictions(res, preds, clock, clock.left() - RESERVE_S / 2)
        res.data["complete"] = True
    finally:
        preds.close()
        res.data["elapsed_s"] = clock.elapsed()
        res.save()
    say(clock, f"done in {clock.elapsed():.0f} s: {res.json_path} and {res.md_path.name}")
    if not smoke:
        say(clock, "next: python -m benchmarks.render_readme --section gpu, then commit both")
    failed = [
        c
        for c in (res.data.get("tests") or {}).get("cases", [])
        if c["outcome"] in ("failed", "error")
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
