"""The measuring half of ``benchmarks.gpu_check``: per workload and sequence length, every configuration.

Memory of one steady-state step per configuration (allocator statistics on CUDA, the
live-storage tracker on CPU), interleaved CUDA-event timing, offload's hidden copy time, and the
estimator's predictions (``Predictions``: in a worker process meanwhile) put next to them.
Results go into a ``Results`` document, saved after every measurement.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import json
import multiprocessing
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks import gpu_workloads as wl
from benchmarks.gpu_render import render_markdown
from gradckpt.units import format_bytes

__all__ = [
    "Clock",
    "Configs",
    "Predictions",
    "Results",
    "finish_predictions",
    "predict_named",
    "run_workload",
    "say",
]


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
    #: (workload, seq, rows) measured but still without their predictions
    pending: list[tuple[str, int, dict[str, dict[str, Any]]]] = field(default_factory=list)

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


class Predictions:
    """``gradckpt.estimate`` runs, computed in a worker process while the GPU measures.

    The estimator works on the CPU (fake tensors), so predictions cost the GPU no time.
    ``workers=0`` computes each one when it is first asked for, in this process. Keys are
    ``(workload, seq)`` for the policies and ``(workload, seq, "auto")`` for ``auto``.
    """

    def __init__(self, workers: int, group: str, gpu: Any) -> None:
        self.group, self.gpu = group, gpu
        self.pool: cf.ProcessPoolExecutor | None = None
        self.note = None
        if workers > 0:
            try:
                self.pool = cf.ProcessPoolExecutor(
                    workers,
                    mp_context=multiprocessing.get_context("spawn"),  # never fork a CUDA process
                    initializer=_worker_init,
                    initargs=(workers,),
                )
            except (OSError, ValueError) as e:  # no /dev/shm, no semaphores: predict in-process
                self.note = f"no worker process ({e}): predictions computed in this process"
        self.futures: dict[tuple[Any, ...], Any] = {}
        self.calls: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.done: dict[tuple[Any, ...], dict[str, Any]] = {}

    def submit(self, key: tuple[Any, ...], fn: Callable[..., dict[str, Any]], *args: Any) -> None:
        call = (fn, self.group, *args, self.gpu)
        self.calls[key] = call
        if self.pool is not None:
            self.futures[key] = self.pool.submit(*call)

    def peek(self, key: tuple[Any, ...]) -> dict[str, Any] | None:
        """The result if it is already there (never waits)."""
        f = self.futures.get(key)
        if key not in self.done and f is not None and f.done():
            return self.get(key, 0.0)
        return self.done.get(key)

    def get(self, key: tuple[Any, ...], timeout: float) -> dict[str, Any]:
        """The result, or ``{"error": why}`` (also when it is not ready within ``timeout`` s)."""
        if key in self.done:
            return self.done[key]
        try:
            if self.pool is None:
                fn, *args = self.calls[key]
                out = fn(*args)
            else:
                out = self.futures[key].result(timeout=max(timeout, 0.0))
        except cf.TimeoutError:
            return {"error": f"estimate not ready within {timeout:.0f} s"}
        except Exception as e:
            out = {"error": f"estimate failed: {type(e).__name__}: {e}"}
        self.done[key] = out
        return out

    def close(self) -> None:
        """Stop the workers now: an estimate still running would otherwise hold the interpreter's
        exit until it ends (concurrent.futures joins its workers at exit), past the time limit."""
        if self.pool is not None:
            workers = list((getattr(self.pool, "_processes", None) or {}).values())
            self.pool.shutdown(wait=False, cancel_futures=True)
            for proc in workers:  # the pool's own worker processes, by handle
                if proc.is_alive():
                    proc.terminate()


def _worker_init(workers: int) -> None:
    """A worker's CPU threads: a quarter of the cores between them, so that the process driving
    the GPU keeps cores to launch kernels from (timings would be perturbed otherwise)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 4) // (4 * workers)))


def _workload(group: str, name: str) -> wl.Workload:
    table = wl.SMOKE_WORKLOADS if group == "smoke" else wl.GPU_WORKLOADS
    return next(w for w in table if w.name == name)


def predict_named(group: str, name: str, seq: int, policies: list[str], gpu: Any) -> dict[str, Any]:
    """``gpu_workloads.predict`` for a workload given by name (what a worker process can receive)."""
    return wl.predict(_workload(group, name), seq, policies, gpu)


def predict_auto_named(group: str, name: str, seq: int, budget: int, gpu: Any) -> dict[str, Any]:
    """``gpu_workloads.predict_auto`` for a workload given by name."""
    return wl.predict_auto(_workload(group, name), seq, budget, gpu)


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


def measure_memory(
    step: Callable[[], None], dev: torch.device, model: Any, opt: torch.optim.Optimizer
) -> dict[str, Any]:
    """Peak allocated/reserved bytes of one steady-state step.

    CUDA: the allocator's statistics; its cache is emptied first and one step warms it up, so
    reserved bytes are this configuration's own, not what an earlier one left cached. CPU (the
    smoke run): the live-storage tracker's peak over the step plus the model's weights, buffers
    and optimizer states; other CPU tensors of the process (the in-process estimator's caches,
    an earlier workload's leftovers) are not the model's and would be counted by an absolute peak.
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
        allocated = st.peak_bytes - st.baseline_bytes + wl.owned_bytes(model, opt)
        return {"allocated_bytes": allocated, "reserved_bytes": None, "step_s": step_s}
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


def _foreign_cpu_bytes(cfgs: Any, opt: torch.optim.Optimizer) -> int:
    """Bytes of live CPU tensors in the process that are not the model's or its optimizer's."""
    from gradckpt.measure import live_tensors, storages

    gc.collect()
    from torch._subclasses.fake_tensor import FakeTensor

    seen: dict[Any, int] = {}
    for t in live_tensors():
        if t.device.type == "cpu":
            for st in storages(t):
                # the estimator's fake tensors have no data pointer; the planner counts them too
                key = ("fake", id(st)) if isinstance(t, FakeTensor) else st.data_ptr()
                seen[key] = int(st.nbytes())
    return max(0, sum(seen.values()) - wl.owned_bytes(cfgs.model, opt))


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
                res.skip(
                    f"{w.name} seq {seq}",
                    f"time guard ({until - clock.elapsed():.0f} s left of its share)",
                    clock,
                )
                continue
            try:
                run_seq(w, seq, model, res, clock, until, dev, preds, policies, max_rounds)
            except Exception as e:  # one sequence length failing must not end the run
                model.zero_grad(set_to_none=True)
                _free(dev)
                res.skip(f"{w.name} seq {seq}", f"failed: {type(e).__name__}: {e}", clock)
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
    """Memory of every configuration at ``seq``, then interleaved timing, then predictions attached.

    ``auto``'s budget is halfway between the measured allocated peaks of ``none`` and ``full``
    (``none`` does not fit it, ``full`` does, so the planner must choose); the estimator's
    ``auto`` is asked for the same budget.
    """

    step, data, opt = wl.make_step(model, w.batch, seq, dev)
    cfgs = Configs(model)
    rows: dict[str, dict[str, Any]] = {}
    where = f"{w.name} seq {seq}"
    cfgs.apply("none")
    try:
        step()  # AdamW's states exist from here on: every measurement is a steady-state step
    except Exception as e:
        model.zero_grad(set_to_none=True)
        _free(dev)
        res.skip(where, f"first step failed: {type(e).__name__}: {e}", clock)
        return
    for label in [*policies, "hf", "auto"]:
        r = {"workload": w.name, "method": w.method, "batch": w.batch, "seq": seq, "policy": label}
        rows[label] = r
        res.data["rows"].append(r)
        r["status"] = measure_one(
            label, r, rows, w, seq, (step, data, opt), cfgs, clock, until, dev, preds
        )
        early = preds.peek((w.name, seq))
        if early is not None:  # predictions in as soon as they arrive (a killed run keeps them)
            attach_predictions(rows, early)
        mem = r.get("allocated_bytes")
        say(
            clock,
            f"{where} {label}: {r['status']}"
            + (f", peak allocated {format_bytes(mem)}" if mem else ""),
        )
        res.save()
    timed = [lbl for lbl, r in rows.items() if r["status"] == "ok"]
    if "none" in timed and len(timed) > 1:
        time_rounds(timed, rows, cfgs, step, res, clock, until, dev, max_rounds, where)
    if dev.type == "cuda" and {"offload", "full"} <= set(timed):
        offload_overlap(rows, cfgs, step, model, res, clock, until, dev, f"{w.name}@{seq}")
    cfgs.reset()
    # Predictions still being computed are collected at the end of the run (finish_predictions),
    # so the GPU never waits for the estimator; on CPU they are computed here.
    res.pending.append((w.name, seq, rows))
    if preds.pool is None:
        finish_predictions(res, preds, clock, until - clock.elapsed())


def finish_predictions(res: Results, preds: Predictions, clock: Clock, wait_s: float) -> None:
    """Attach the predictions of every measured sequence length, waiting at most ``wait_s`` in all."""
    deadline = clock.elapsed() + max(0.0, wait_s)
    keep = ("notes", "speed_gpu", "elapsed_s", "error", "auto_error")
    while res.pending:
        name, seq, rows = res.pending.pop(0)
        pred = dict(preds.get((name, seq), timeout=deadline - clock.elapsed()))
        if "budget_bytes" in rows.get("auto", {}):
            pred.update(preds.get((name, seq, "auto"), timeout=deadline - clock.elapsed()))
        attach_predictions(rows, pred)
        res.data["predictions"][f"{name}@{seq}"] = {k: v for k, v in pred.items() if k in keep}
        res.save()


def measure_one(
    label: str,
    r: dict[str, Any],
    rows: dict[str, dict[str, Any]],
    w: wl.Workload,
    seq: int,
    job: tuple[Callable[[], None], dict[str, torch.Tensor], torch.optim.Optimizer],
    cfgs: Configs,
    clock: Clock,
    until: float,
    dev: torch.device,
    preds: Predictions,
) -> str:
    """Install ``label`` and measure one steady-state step into ``r``; returns the status.

    ``job`` is ``(step, batch, optimizer)`` as ``gpu_workloads.make_step`` returns them.
    """
    import gradckpt

    step, data, opt = job

    if until - clock.elapsed() < 3:
        return "skipped: time guard"
    early = preds.peek((w.name, seq)) or {}
    p = early.get("policies", {}).get("full" if label == "hf" else label)
    if p and not wl.fits(p["allocated_bytes"], dev):
        return f"skipped: predicted peak {p['allocated_bytes'] / 2**30:.1f} GiB exceeds free memory"
    if label == "auto":
        measured = [rows[k].get("allocated_bytes") for k in ("none", "full") if k in rows]
        if len(measured) != 2 or not all(measured):
            return "skipped: no budget (none or full not measured)"
        budget = (int(measured[0]) + int(measured[1])) // 2
        r["budget_bytes"] = budget
        preds.submit((w.name, seq, "auto"), predict_auto_named, w.name, seq, budget)
        try:
            cfgs.reset()
            # On CPU the planner counts every live CPU tensor of the process as memory in use
            # (as gradckpt.measure does); the measured peaks count only the model's, so the
            # planner's budget adds what else is alive (other tests' or workloads' leftovers).
            plan_budget = budget if dev.type == "cuda" else budget + _foreign_cpu_bytes(cfgs, opt)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                cfgs.plans["auto"] = gradckpt.plan(cfgs.model, plan_budget, data)
        except Exception as e:
            _free(dev)
            return f"error: planner: {type(e).__name__}: {e}"
    try:
        r["plan"] = cfgs.apply(label)
        r.update(measure_memory(step, dev, cfgs.model, opt))
        return "ok"
    except Exception as e:
        cfgs.model.zero_grad(set_to_none=True)
        _free(dev)
        if _is_oom(e):
            return "oom"
        r["traceback"] = traceback.format_exc(limit=-3)
        return f"error: {type(e).__name__}: {e}"


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
                res.skip(
                    f"timing {what}",
                    f"time guard: a round takes ~{per_round:.1f} s, {left:.0f} s left",
                    clock,
                )
            break
        k = r % len(labels)
        order = labels[k:] + labels[:k]
        try:
            t = time_interleaved(
                dict.fromkeys(order, step),
                repeats=1,
                warmup=1 if r == 0 else 0,
                prepare=cfgs.apply,
                device=dev,
            )
        except Exception as e:  # an OOM in a later round: keep the rounds already timed
            _free(dev)
            res.skip(f"timing {what} round {r + 1}", f"{type(e).__name__}: {e}", clock)
            break
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
        say(
            clock,
            f"timing {what}: round {r + 1} "
            + ", ".join(f"{lbl} {rows[lbl]['speed_cost']:+.0%}" for lbl in labels if lbl != "none"),
        )


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

    if "time_s" not in rows["offload"] or "time_s" not in rows["full"]:
        res.skip(f"offload overlap {key}", "offload or full was not timed", clock)
        return
    if until - clock.elapsed() < 3 * rows["offload"]["step_s"] + 3:
        res.skip(f"offload overlap {key}", "time guard", clock)
        return
    try:
        cfgs.apply("offload")
        st = gradckpt.measure(step, model=model, device=dev)
        nbytes = st.host_activation_bytes
        copy_s = copy_seconds(nbytes, dev) if nbytes else 0.0
    except Exception as e:
        _free(dev)
        res.skip(f"offload overlap {key}", f"{type(e).__name__}: {e}", clock)
        return
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
    say(
        clock,
        f"offload {key}: {nbytes / 2**20:.0f} MiB to host, copies {copy_s * 1e3:.1f} ms serial, "
        + (f"{hidden:.0%} hidden behind compute" if hidden is not None else "nothing copied"),
    )
