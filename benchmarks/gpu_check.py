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
import concurrent.futures as cf
import gc
import importlib.util
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks import gpu_workloads as wl
from benchmarks.gpu_render import render_markdown

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


# -- time and output ------------------------------------------------------------------------


class Clock:
    """Seconds since the run started, against its limit."""

    def __init__(self, limit_s: float) -> None:
        self.t0 = time.perf_counter()
        self.limit_s = limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.limit_s - self.elapsed()


def say(clock: Clock, msg: str) -> None:
    print(f"[gpu-check {clock.elapsed():6.1f}s] {msg}", flush=True)


@dataclass
class Results:
    """The results document and where it is written (JSON and Markdown, after every change)."""

    json_path: Path
    md_path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        self.data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for path, text in (
            (self.json_path, json.dumps(self.data, indent=1, default=str) + "\n"),
            (self.md_path, render_markdown(self.data)),
        ):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous file

    def skip(self, what: str, why: str, clock: Clock) -> None:
        say(clock, f"skipped {what}: {why}")
        self.data["skipped"].append({"what": what, "why": why})
        self.save()


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
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


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
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (fp32 exactness)
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
        "command": " ".join(["pytest", *cmd[3:-len(files)], *files]).replace(str(xml), "junit.xml"),
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
            {"name": name, "outcome": outcome, "message": message, "seconds": float(tc.get("time") or 0)}
        )
    return cases


# -- 3. memory and time per policy ------------------------------------------------------------


class Predictions:
    """``gradckpt.estimate`` runs for every (workload, seq), in a worker process meanwhile.

    The estimator works on the CPU (fake tensors), so a worker computes predictions while the
    GPU measures; ``workers=0`` computes each when it is asked for, in this process.
    """

    def __init__(self, workers: int) -> None:
        self.pool = (
            cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 0
            else None
        )
        self.futures: dict[tuple[str, int], Any] = {}
        self.args: dict[tuple[str, int], tuple[Any, ...]] = {}

    def submit(self, group: str, name: str, seq: int, policies: list[str], gpu: Any) -> None:
        args = (group, name, seq, policies, gpu)
        self.args[(name, seq)] = args
        if self.pool is not None:
            self.futures[(name, seq)] = self.pool.submit(predict_named, *args)

    def get(self, name: str, seq: int, timeout: float) -> dict[str, Any]:
        """The predictions, or ``{"error": why}`` (also when not ready within ``timeout``)."""
        try:
            if self.pool is None:
                return predict_named(*self.args[(name, seq)])
            return self.futures[(name, seq)].result(timeout=max(timeout, 0.0))
        except cf.TimeoutError:
            return {"error": f"estimate not ready within {timeout:.0f} s"}
        except Exception as e:
            return {"error": f"estimate failed: {type(e).__name__}: {e}"}

    def close(self) -> None:
        if self.pool is not None:
            for f in self.futures.values():
                f.cancel()
            self.pool.shutdown(wait=False, cancel_futures=True)


def predict_named(group: str, name: str, seq: int, policies: list[str], gpu: Any) -> dict[str, Any]:
    """``gpu_workloads.predict`` for a workload given by name (what a worker process can receive)."""
    table = wl.SMOKE_WORKLOADS if group == "smoke" else wl.GPU_WORKLOADS
    return wl.predict(next(w for w in table if w.name == name), seq, policies, gpu)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev: torch.device) -> None:
    """Hand cached device memory back (CUDA; on CPU there is no cache, and gc takes ~0.5 s)."""
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _hf_checkpointing(model: Any, on: bool) -> None:
    """transformers' own checkpointing on or off: ``gradient_checkpointing_enable()``, renamed
    ``activation_checkpointing_enable()`` in newer 5.x releases (the old name warns)."""
    import warnings

    verb = "enable" if on else "disable"
    new = getattr(model, f"activation_checkpointing_{verb}", None)
    fn = new if callable(new) else getattr(model, f"gradient_checkpointing_{verb}")
    kwargs = {}
    if on:
        word = "activation" if callable(new) else "gradient"
        kwargs[f"{word}_checkpointing_kwargs"] = {"use_reentrant": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fn(**kwargs)


class Configs:
    """Installs one configuration (a policy, ``auto``'s plan, or HF's own checkpointing) at a time."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.hf_on = False
        self.plans: dict[str, Any] = {}

    def apply(self, label: str) -> str:
        """Install ``label``; returns the installed plan's summary."""
        import gradckpt

        m: Any = self.model
        if label == "hf":
            gradckpt.disable(m)
            _hf_checkpointing(m, True)
            self.hf_on = True
            return "transformers' own checkpointing of every layer (non-reentrant)"
        if self.hf_on:
            _hf_checkpointing(m, False)
            self.hf_on = False
        if label in self.plans:
            return gradckpt.enable(m, plan=self.plans[label]).summary()
        return gradckpt.enable(m, policy=label).summary()

    def reset(self) -> None:
        import gradckpt

        if self.hf_on:
            _hf_checkpointing(self.model, False)
            self.hf_on = False
        gradckpt.disable(self.model)


def measure_memory(step: Callable[[], None], dev: torch.device, model: Any) -> dict[str, Any]:
    """Peak allocated/reserved bytes of one steady-state step (CPU: the live-storage tracker).

    The allocator's cache is emptied first and one step warms it up, so reserved bytes are this
    configuration's own, not what an earlier one left cached.
    """
    import gradckpt

    _free(dev)
    step()
    _sync(dev)
    if dev.type != "cuda":
        t0 = time.perf_counter()
        step()  # timed on its own: the tracker below slows a step down several times
        step_s = time.perf_counter() - t0
        st = gradckpt.measure(step, model=model, device=dev)
        return {"allocated_bytes": st.peak_bytes, "reserved_bytes": None, "step_s": step_s}
    torch.cuda.reset_peak_memory_stats(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    _sync(dev)
    return {
        "allocated_bytes": int(torch.cuda.max_memory_allocated(dev)),
        "reserved_bytes": int(torch.cuda.max_memory_reserved(dev)),
        "step_s": start.elapsed_time(end) / 1000.0,
    }


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_workload(
    w: wl.Workload,
    res: Results,
    clock: Clock,
    until: float,
    dev: torch.device,
    preds: Predictions,
    policies: list[str],
    max_rounds: int,
) -> None:
    """Every configuration of ``w`` at each sequence length, until ``until`` (seconds of ``clock``)."""
    say(clock, f"{w.name}: building ({w.method}, random weights, bf16) on {dev}")
    try:
        model = wl.build_model(w, dev)
    except Exception as e:
        res.skip(w.name, f"could not build the model: {type(e).__name__}: {e}", clock)
        _free(dev)
        return
    try:
        for seq in w.seqs:
            if until - clock.elapsed() < 5:
                res.skip(f"{w.name} seq {seq}", f"time guard ({until - clock.elapsed():.0f} s left of its share)", clock)
                continue
            run_seq(w, seq, model, res, clock, until, dev, preds, policies, max_rounds)
    finally:
        Configs(model).reset()
        del model
        _free(dev)


def run_seq(
    w: wl.Workload,
    seq: int,
    model: torch.nn.Module,
    res: Results,
    clock: Clock,
    until: float,
    dev: torch.device,
    preds: Predictions,
    policies: list[str],
    max_rounds: int,
) -> None:
    import gradckpt

    step, data = wl.make_step(model, w.batch, seq, dev)
    cfgs = Configs(model)
    rows: dict[str, dict[str, Any]] = {}

    def row(label: str) -> dict[str, Any]:
        r = {"workload": w.name, "method": w.method, "batch": w.batch, "seq": seq,
             "policy": label, "status": "pending"}
        rows[label] = r
        res.data["rows"].append(r)
        return r

    # Predictions of the other policies arrive while these are measured; auto needs its budget.
    labels = [*policies, "hf", "auto"]
    cfgs.apply("none")
    try:
        step()  # AdamW's states exist from here on: every measurement is a steady-state step
    except Exception as e:
        _free(dev)
        res.skip(f"{w.name} seq {seq}", f"first step failed: {type(e).__name__}: {e}", clock)
        return
    pred: dict[str, Any] | None = None
    for label in labels:
        r = row(label)
        if until - clock.elapsed() < 3:
            r["status"] = "skipped: time guard"
            say(clock, f"{w.name} seq {seq} {label}: {r['status']}")
            continue
        if label == "auto":
            pred = preds.get(w.name, seq, timeout=min(60.0, until - clock.elapsed() - 10))
            budget = pred.get("budget_bytes")
            measured = [rows[p].get("allocated_bytes") for p in ("none", "full")]
            if budget is None and all(measured):  # no prediction: halfway between measured peaks
                budget = (measured[0] + measured[1]) // 2
                r["budget_source"] = "measured none/full midpoint (no prediction)"
            if budget is None:
                r["status"] = "skipped: no budget (none or full not measured)"
                say(clock, f"{w.name} seq {seq} {label}: {r['status']}")
                continue
            r["budget_bytes"] = int(budget)
            try:
                cfgs.reset()
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    cfgs.plans["auto"] = gradckpt.plan(model, int(budget), data)
            except Exception as e:
                r["status"] = f"error: planner: {type(e).__name__}: {e}"
                say(clock, f"{w.name} seq {seq} {label}: {r['status']}")
                _free(dev)
                continue
        try:
            r["plan"] = cfgs.apply(label)
            r.update(measure_memory(step, dev, model))
            r["status"] = "ok"
        except Exception as e:
            r["status"] = "oom" if _is_oom(e) else f"error: {type(e).__name__}: {e}"
            if not _is_oom(e):
                r["traceback"] = traceback.format_exc(limit=-3)
            model.zero_grad(set_to_none=True)
            _free(dev)
        mem = r.get("allocated_bytes")
        say(clock, f"{w.name} seq {seq} {label}: {r['status']}"
            + (f", peak allocated {mem / 2**30:.2f} GiB" if mem else ""))
        res.save()
    pred = pred or preds.get(w.name, seq, timeout=min(60.0, until - clock.elapsed() - 5))
    attach_predictions(rows, pred)
    res.data.setdefault("predictions", {})[f"{w.name}@{seq}"] = {
        k: v for k, v in pred.items() if k in ("notes", "speed_gpu", "elapsed_s", "error", "auto_error")
    }
    res.save()
    timed = [lbl for lbl in labels if rows[lbl]["status"] == "ok"]
    if "none" in timed and len(timed) > 1:
        time_rounds(timed, rows, cfgs, step, res, clock, until, dev, max_rounds, f"{w.name} seq {seq}")
    if dev.type == "cuda" and {"offload", "full"} <= set(timed):
        offload_overlap(rows, cfgs, step, model, res, clock, until, dev, f"{w.name}@{seq}")
    cfgs.reset()


def attach_predictions(rows: dict[str, dict[str, Any]], pred: dict[str, Any]) -> None:
    """Put each configuration's prediction and error next to its measurement.

    ``hf`` checkpoints every decoder layer like ``full``, so it is compared with ``full``'s.
    """
    by_policy = dict(pred.get("policies", {}))
    if pred.get("auto"):
        by_policy["auto"] = pred["auto"]
    if "full" in by_policy:
        by_policy.setdefault("hf", by_policy["full"])
    for label, r in rows.items():
        p = by_policy.get(label)
        if p is None:
            r["predicted"] = None
            continue
        r["predicted"] = p
        r["allocated_error"] = wl.relative_error(r.get("allocated_bytes"), p["allocated_bytes"])
        r["reserved_error"] = wl.relative_error(r.get("reserved_bytes"), p["reserved_bytes"])


def time_rounds(
    labels: list[str],
    rows: dict[str, dict[str, Any]],
    cfgs: Configs,
    step: Callable[[], None],
    res: Results,
    clock: Clock,
    until: float,
    dev: torch.device,
    max_rounds: int,
    what: str,
) -> None:
    """Interleaved rounds (``gradckpt.bench.time_interleaved``, one round per call so results are
    saved after each), CUDA-event timed on CUDA; speed cost = median of per-round ratios - 1."""
    from gradckpt.bench import time_interleaved

    per_round = sum(rows[lbl]["step_s"] for lbl in labels) * 1.3 + 0.01 * len(labels)
    clock_name = "gpu" if dev.type == "cuda" else "wall"
    times: dict[str, list[float]] = {lbl: [] for lbl in labels}
    for r in range(max_rounds):
        left = until - clock.elapsed()
        if left < per_round * (2 if r == 0 else 1) + 2:
            if r == 0:
                res.skip(f"timing {what}", f"time guard: a round takes ~{per_round:.1f} s, {left:.0f} s left", clock)
            break
        k = r % len(labels)
        order = labels[k:] + labels[:k]
        t = time_interleaved(
            dict.fromkeys(order, step),
            repeats=1,
            warmup=1 if r == 0 else 0,
            prepare=cfgs.apply,
            device=dev,
        )
        got = t.gpu if clock_name == "gpu" else t.wall
        for lbl in labels:
            times[lbl].append(got[lbl][0])
        for lbl in labels:
            ratios = [a / b for a, b in zip(times[lbl], times["none"])]
            rows[lbl].update(
                times_s=list(times[lbl]),
                ratios=ratios,
                time_s=statistics.median(times[lbl]),
                speed_cost=statistics.median(ratios) - 1.0,
                clock=clock_name,
            )
        res.save()
        say(clock, f"timing {what}: round {r + 1} "
            + ", ".join(f"{lbl} {rows[lbl]['speed_cost']:+.0%}" for lbl in labels if lbl != "none"))


def copy_seconds(nbytes: int, dev: torch.device) -> float:
    """CUDA-event seconds to copy ``nbytes`` to pinned host memory and back (up to 1 GiB, scaled)."""
    n = min(nbytes, 1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.copy_(src, non_blocking=True)  # warm-up
    _sync(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    host.copy_(src, non_blocking=True)
    src.copy_(host, non_blocking=True)
    end.record()
    _sync(dev)
    return start.elapsed_time(end) / 1000.0 * nbytes / n


def offload_overlap(
    rows: dict[str, dict[str, Any]],
    cfgs: Configs,
    step: Callable[[], None],
    model: Any,
    res: Results,
    clock: Clock,
    until: float,
    dev: torch.device,
    key: str,
) -> None:
    """How much of offload's PCIe traffic hides behind compute.

    ``offload`` recomputes exactly what ``full`` does and adds the copies of block inputs, so
    ``t(offload) - t(full)`` (interleaved, CUDA events) is the copy time left exposed; the copies
    alone, serialized, take ``copy_s``. hidden = 1 - exposed / copy_s.
    """
    import gradckpt

    if until - clock.elapsed() < 3 * rows["offload"]["step_s"] + 3 or "time_s" not in rows["offload"]:
        res.skip(f"offload overlap {key}", "time guard or no timing", clock)
        return
    cfgs.apply("offload")
    st = gradckpt.measure(step, model=model, device=dev)
    nbytes = st.host_activation_bytes
    copy_s = copy_seconds(nbytes, dev) if nbytes else 0.0
    exposed = max(0.0, rows["offload"]["time_s"] - rows["full"]["time_s"])
    out = {
        "host_bytes": nbytes,
        "copy_s": copy_s,
        "offload_s": rows["offload"]["time_s"],
        "full_s": rows["full"]["time_s"],
        "exposed_s": exposed,
        "hidden": (1.0 - min(exposed, copy_s) / copy_s) if copy_s else None,
        "measure_peak_bytes": st.peak_bytes,
    }
    res.data.setdefault("offload", {})[key] = out
    res.save()
    hidden = out["hidden"]
    say(clock, f"offload {key}: {nbytes / 2**20:.0f} MiB to host, copies {copy_s * 1e3:.1f} ms serial, "
        + (f"{hidden:.0%} hidden behind compute" if hidden is not None else "nothing copied"))


# -- the run ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU: the same code paths in < 1 min")
    p.add_argument("--time-limit", type=float, default=None, help=f"seconds for the whole run (default {DEFAULT_LIMIT_S:.0f}; smoke 120)")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results; smoke: a temporary one)")
    p.add_argument("--skip-tests", action="store_true", help="leave out the pytest step")
    p.add_argument("--only", default=None, help="comma-separated workload names to run (default all)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per sequence length (default 5; smoke 2)")
    p.add_argument("--estimate-workers", type=int, default=1, help="processes computing predictions meanwhile (0: in this one)")
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; on a GPU machine run `make gpu-check`, "
              "or `make gpu-check-smoke` for the CPU smoke run", file=sys.stderr)
        return 2
    for name, value in (("--rounds", a.rounds), ("--estimate-workers", a.estimate_workers)):
        if value is not None and value < (1 if name == "--rounds" else 0):
            print(f"gpu-check: {name} must be >= {1 if name == '--rounds' else 0}, got {value}", file=sys.stderr)
            return 2
    dev = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    clock = Clock(a.time_limit or (120.0 if smoke else DEFAULT_LIMIT_S))
    workloads = list(wl.SMOKE_WORKLOADS if smoke else wl.GPU_WORKLOADS)
    if a.only:
        wanted = [s.strip() for s in a.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {w.name for w in workloads})
        if unknown:
            print(f"gpu-check: unknown workload(s) {', '.join(unknown)}; choose from "
                  f"{', '.join(w.name for w in workloads)}", file=sys.stderr)
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
        schema=SCHEMA, smoke=smoke, date=date, machine=info, complete=False,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        settings={"time_limit_s": clock.limit_s, "policies": policies, "speed_gpu": gpu.name,
                  "precision": "bf16 weights, bf16 autocast, fused AdamW (bf16 states)",
                  "workloads": [{"name": w.name, "method": w.method, "seqs": list(w.seqs), "batch": w.batch} for w in workloads]},
        tests=None, rows=[], offload={}, predictions={}, skipped=[],
        command="make gpu-check-smoke" if smoke else "make gpu-check",
    )
    res.save()
    say(clock, f"{info['device']}, torch {info['torch']}, transformers {info['transformers']}; "
        f"limit {clock.limit_s:.0f} s; writing {res.json_path}")
    runnable = []
    for w in workloads:
        missing = wl.missing_packages(w)
        if missing:
            res.skip(w.name, f"needs {', '.join(missing)}, not installed here", clock)
        else:
            runnable.append(w)
    preds = Predictions(a.estimate_workers)
    try:
        for w in runnable:
            for seq in w.seqs:
                preds.submit("smoke" if smoke else "gpu", w.name, seq, policies, gpu)
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
            run_workload(w, res, clock, until, dev, preds, policies, a.rounds or (2 if smoke else 5))
            until = max(until, clock.elapsed())  # time a workload did not use passes on
        res.data["complete"] = True
    finally:
        preds.close()
        res.data["elapsed_s"] = clock.elapsed()
        res.save()
    say(clock, f"done in {clock.elapsed():.0f} s: {res.json_path} and {res.md_path.name}")
    if not smoke:
        say(clock, "next: python -m benchmarks.render_readme (README section), then commit both")
    failed = [c for c in (res.data.get("tests") or {}).get("cases", []) if c["outcome"] in ("failed", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
