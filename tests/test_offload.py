"""Host offload: Decision.OFFLOAD / policy "offload" and enable(..., offload_saved=True).

Checks, on CPU with the device side emulated (``emulate_host_on_cpu``: CPU memory plays the
device, copies go to buffers ``measure`` counts as host memory): gradients bit-identical to no
checkpointing (fp32, dropout on) on HF Llama, GPT-2, BERT and a Mixtral-style MoE; device bytes
drop by exactly the bytes moved to host; copies come back one block ahead and are freed after
the step. Without emulation, a CPU-only run copies nothing and says so once. GPU-only tests
(stream overlap, pinned-buffer reuse) are marked ``gpu``.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_offload.py -q
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

import gradckpt
from conftest import run_step
from gradckpt.bench.models import build_bench_model, make_batch
from gradckpt.errors import PolicyError
from gradckpt.plans import Decision, Plan
from gradckpt.runtime import offload
from gradckpt.runtime.offload import HostCopy, emulate_host_on_cpu, offload_options

HF_MODELS = ("llama", "gpt2", "bert", "mixtral")
SMALL = 1024  # offload_min_bytes for the tiny test models


@pytest.fixture(scope="module")
def hf_models():
    built = {}

    def get(name):
        if name not in built:
            bm = build_bench_model(name, layers=2, dropout=0.1)
            bm.model.train()
            built[name] = (bm, make_batch(bm, 2, 16))
        return built[name]

    return get


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert (ga[k] is None) == (gb[k] is None), k
        if ga[k] is not None:
            assert torch.equal(ga[k], gb[k]), k


def copier():
    with emulate_host_on_cpu():
        c = offload.copier_for(torch.device("cpu"))
    assert c is not None
    return c


@pytest.mark.parametrize("name", HF_MODELS)
@pytest.mark.parametrize(
    ("policy", "options"),
    [
        ("offload", {"offload_min_bytes": SMALL}),
        ("none", {"offload_saved": True, "offload_min_bytes": SMALL}),
        ("every:2", {"offload_saved": True, "offload_min_bytes": SMALL}),
    ],
    ids=["offload", "offload_saved", "every2+offload_saved"],
)
def test_gradients_identical_to_no_checkpointing(hf_models, name, policy, options):
    bm, batch = hf_models(name)
    model = bm.model
    ref = run_step(model, batch)
    gradckpt.enable(model, policy, **options)
    c = copier()
    copies, fetches = c.copies, c.fetches
    try:
        with emulate_host_on_cpu():
            got = run_step(model, batch)
    finally:
        gradckpt.disable(model)
    assert c.copies > copies, "nothing was offloaded"
    assert c.fetches - fetches == c.copies - copies  # each copy fetched back exactly once
    assert_same(got, ref)


def llama_step(layers=2, batch=2, seq=16):
    bm = build_bench_model("llama", layers=layers, dropout=0.0)
    model, data = bm.model.train(), make_batch(bm, batch, seq)

    def step():
        model(**data).loss.backward()

    return model, step


def measured(model, step, policy, **options):
    gradckpt.enable(model, policy, **options)
    try:
        with emulate_host_on_cpu():
            step()  # first step outside the count
            model.zero_grad(set_to_none=True)
            stats = gradckpt.measure(step, model=model)
            model.zero_grad(set_to_none=True)
    finally:
        gradckpt.disable(model)
    return stats


def test_offload_moves_exactly_the_block_inputs():
    layers, batch, seq, hidden = 3, 2, 16, 512
    model, step = llama_step(layers, batch, seq)
    full = measured(model, step, "full")
    off = measured(model, step, "offload", offload_min_bytes=SMALL)
    boundary = batch * seq * hidden * 4  # each block's input, fp32
    assert off.host_activation_bytes == layers * boundary
    assert off.activation_bytes == full.activation_bytes - layers * boundary
    assert full.host_activation_bytes == 0
    # Inputs under the threshold stay on the device: then it is exactly full.
    kept = measured(model, step, "offload", offload_min_bytes=boundary + 1)
    assert kept.host_activation_bytes == 0
    assert kept.activation_bytes == full.activation_bytes


def test_offload_saved_moves_saved_tensors_byte_for_byte():
    model, step = llama_step()
    none = measured(model, step, "none")
    moved = measured(model, step, "none", offload_saved=True, offload_min_bytes=SMALL)
    assert moved.host_activation_bytes > 0.5 * none.activation_bytes
    # Every byte that left the device is in host memory once (views of one storage share a copy).
    assert none.activation_bytes - moved.activation_bytes == moved.host_activation_bytes
    # every:2 moves only the SAVE block's tensors: half of the per-block ones (the blocks are
    # alike), plus the rotary cos/sin all blocks share, which are moved once either way.
    half = measured(model, step, "every:2", offload_saved=True, offload_min_bytes=SMALL)
    shared = 2 * 16 * 64 * 4  # cos and sin: seq 16 x head_dim 64, fp32
    assert half.host_activation_bytes - shared == (moved.host_activation_bytes - shared) // 2


def test_host_copies_are_freed_each_step_no_growth():
    model, step = llama_step()
    gradckpt.enable(model, "none", offload_saved=True, offload_min_bytes=SMALL)
    try:
        with emulate_host_on_cpu():
            peaks = []
            for _ in range(3):
                stats = gradckpt.measure(step, model=model)
                model.zero_grad(set_to_none=True)
                peaks.append((stats.host_peak_bytes, stats.peak_bytes))
                gc.collect()
                assert not [o for o in gc.get_objects() if isinstance(o, HostCopy)]
    finally:
        gradckpt.disable(model)
    assert peaks[1] == peaks[2]


class Log:
    def __init__(self, c):
        self.events = []
        self._start, self._finish = c.start_fetch, c.finish_fetch

    def start(self, copy):
        self.events.append(("start", id(copy)))
        return self._start(copy)

    def finish(self, pending):
        out = self._finish(pending)
        self.events.append(("finish", out.data_ptr()))
        return out


def test_backward_fetches_one_block_ahead(monkeypatch):
    layers = 4
    model, step = llama_step(layers)
    c = copier()
    order = []
    real_park = c.park

    def park(t):
        view = real_park(t)
        order.append(view.copy)
        return view

    log = Log(c)
    monkeypatch.setattr(c, "park", park)
    monkeypatch.setattr(c, "start_fetch", log.start)
    monkeypatch.setattr(c, "finish_fetch", log.finish)
    blocks = gradckpt.find_blocks(model)
    for i, (_, block) in enumerate(blocks):
        for p in block.parameters():  # a block's backward: its weights' gradients
            p.register_post_accumulate_grad_hook(lambda _p, i=i: log.events.append(("grad", i)))
    gradckpt.enable(model, "offload", offload_min_bytes=SMALL)
    try:
        with emulate_host_on_cpu():
            step()
    finally:
        gradckpt.disable(model)
    assert len(order) == layers  # one input per block
    starts = [e[1] for e in log.events if e[0] == "start"]
    assert starts == [id(c) for c in reversed(order)]  # backward order, each once
    # Block i-1's input is fetched while block i's backward runs: its copy starts when block
    # i's recompute has ended (no two block inputs on the device during a recompute), before
    # block i's weights get their gradients, and is waited for after them.
    kinds = []
    for e in log.events:
        if e[0] != "grad" or kinds[-1] != "grad":
            kinds.append(e[0])
    assert kinds == ["start", "finish"] + ["start", "grad", "finish"] * (layers - 1) + ["grad"]


def test_cpu_only_run_is_recompute_and_says_so_once(monkeypatch):
    monkeypatch.setattr(gradckpt.errors, "_WARNED", set())
    model, step = llama_step()
    full = measured(model, step, "full")
    none = measured(model, step, "none")
    out = {}
    for policy, opts in (("offload", {}), ("none", {"offload_saved": True})):
        gradckpt.enable(model, policy, offload_min_bytes=SMALL, **opts)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
                model.zero_grad(set_to_none=True)
                out[policy] = gradckpt.measure(step, model=model)
                model.zero_grad(set_to_none=True)
        finally:
            gradckpt.disable(model)
        notes = [str(w.message) for w in caught if "CPU-only" in str(w.message)]
        assert len(notes) == 1, notes
    assert out["offload"].activation_bytes == full.activation_bytes
    assert out["none"].activation_bytes == none.activation_bytes
    assert out["offload"].host_activation_bytes == out["none"].host_activation_bytes == 0


def test_weights_and_small_tensors_stay_on_device():
    c = copier()
    w = nn.Parameter(torch.randn(64, 64))
    x = torch.randn(64, 64)
    assert not c.eligible(w, 0)
    assert c.eligible(x, x.numel() * 4)
    assert not c.eligible(x, x.numel() * 4 + 1)
    assert not c.eligible(torch.empty(0), 0)


def test_parked_views_keep_their_exact_layout():
    c = copier()
    base = torch.randn(6, 8)
    for t in (base, base.t(), base[:, 1:7], base[::2], base.view(2, 3, 8).permute(2, 0, 1)):
        view = c.park(t)
        back = view.fetched()
        assert torch.equal(back, t)
        assert back.stride() == t.stride() or back.is_contiguous()
    # Views covering most of one storage share one copy.
    assert c.park(base).copy is c.park(base.t()).copy


def test_options_are_validated_and_kept_in_the_plan():
    opts = {"offload_saved": True, "offload_min_bytes": "64KiB", "save_ops": ["mm"]}
    assert offload_options(opts) == {"offload_saved": True, "offload_min_bytes": 65536}
    assert opts == {"save_ops": ["mm"]}
    assert offload_options({"offload_min_bytes": 0}) == {"offload_min_bytes": 0}
    with pytest.raises(PolicyError, match="offload_saved must be True or False"):
        offload_options({"offload_saved": "yes"})
    with pytest.raises(PolicyError, match="offload_min_bytes"):
        offload_options({"offload_min_bytes": "lots"})
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    plan = gradckpt.enable(model, "every:2", offload_saved=True)
    try:
        assert plan.options == {"offload_saved": True}
        assert "forward" in model[1].__dict__  # the SAVE block is wrapped for offload_saved
    finally:
        gradckpt.disable(model)
    assert "forward" not in model[0].__dict__ and "forward" not in model[1].__dict__
    again = Plan.from_json(plan.to_json())
    assert again.options == {"offload_saved": True}
    gradckpt.enable(model, plan=again)
    gradckpt.disable(model)
    # offload_saved can be added to a saved plan, and "offload" takes its threshold directly.
    plan = gradckpt.enable(model, plan=Plan(("0", "1"), ("save", "save")), offload_saved=True)
    assert plan.options == {"offload_saved": True}
    gradckpt.disable(model)
    made = gradckpt.make_plan("offload", ["a", "b"], offload_min_bytes="1MiB")
    assert made.decisions == (Decision.OFFLOAD, Decision.OFFLOAD)
    assert made.options == {"offload_min_bytes": 1 << 20}
    assert "offload" in gradckpt.policy_names()


# -- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_offload_overlaps_copies_with_compute_and_reuses_pinned_memory():
    from torch.profiler import ProfilerActivity, profile

    bm = build_bench_model("llama", layers=4, dropout=0.1)
    model = bm.model.cuda().train()
    batch = make_batch(bm, 2, 256)
    ref = run_step(model, batch)
    gradckpt.enable(model, "offload")
    try:
        assert_same(run_step(model, batch), ref)
        stats = gradckpt.measure(lambda: model(**batch).loss.backward(), model=model)
        model.zero_grad(set_to_none=True)
        assert stats.host_activation_bytes == 4 * 2 * 256 * 512 * 4
        allocs = torch.cuda.host_memory_stats().get("num_host_alloc")
        run_step(model, batch)
        run_step(model, batch)
        assert torch.cuda.host_memory_stats().get("num_host_alloc") == allocs  # reused
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_step(model, batch)
            torch.cuda.synchronize()
    finally:
        gradckpt.disable(model)
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    copy_streams = {e.device_resource_id for e in events if "Memcpy" in e.name}
    compute_streams = {e.device_resource_id for e in events if "Memcpy" not in e.name}
    assert copy_streams and copy_streams.isdisjoint(compute_streams)


@pytest.mark.gpu
def test_gpu_offload_saved_matches_and_moves_bytes_to_host():
    bm = build_bench_model("gpt2", layers=2, dropout=0.1)
    model = bm.model.cuda().train()
    batch = make_batch(bm, 2, 128)
    ref = run_step(model, batch)
    gradckpt.enable(model, "none", offload_saved=True, offload_min_bytes=SMALL)
    try:
        assert_same(run_step(model, batch), ref)
        stats = gradckpt.measure(lambda: model(**batch).loss.backward(), model=model)
    finally:
        gradckpt.disable(model)
    assert stats.host_activation_bytes > 0
