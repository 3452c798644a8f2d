"""measure(): exact bytes and FLOPs on hand-countable models; full == torch's per-block checkpoint.

Run: .venv/bin/python -m pytest tests/test_measure.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradckpt
from gradckpt.bench.models import build_bench_model, make_batch

B, D, H, OUT = 8, 16, 64, 4


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H, bias=False), nn.ReLU(), nn.Linear(H, OUT, bias=False))


def test_exact_activation_bytes_and_flops_of_two_linears() -> None:
    model = _mlp()
    x = torch.randn(B, D)
    st = gradckpt.measure(lambda: model(x).sum().backward(), model=model)
    # Held for backward at the end of forward: ReLU's output (B*H fp32, also the second Linear's
    # input), the scalar loss and its gradient seed (ones_like, made by backward() before the
    # autograd engine starts); x and the weights existed before the step.
    assert st.activation_bytes == B * H * 4 + 4 + 4
    # Forward: two matmuls. Backward: weight grads of both, input grad of the second only
    # (x does not require grad).
    assert st.forward_flops == 2 * B * D * H + 2 * B * H * OUT
    assert st.backward_flops == 2 * B * D * H + 2 * (2 * B * H * OUT)
    assert st.recompute_flops == 0
    # Peak: weights + the step's tensors; never below baseline plus activations.
    assert st.peak_bytes >= st.baseline_bytes + st.activation_bytes
    assert st.baseline_bytes >= (D * H + H * OUT) * 4 + B * D * 4


def test_recompute_flops_are_attributed_to_recompute() -> None:
    model = _mlp()
    x = torch.randn(B, D, requires_grad=True)
    st = gradckpt.measure(
        lambda: gradckpt.checkpoint(model, x).sum().backward(), model=model, blocks=[]
    )
    assert st.forward_flops == 2 * B * D * H + 2 * B * H * OUT
    # Early stop: the recompute ends after the last tensor backward needs (ReLU's output),
    # so the second matmul is not re-run.
    assert st.recompute_flops == 2 * B * D * H
    # only the loss and its gradient seed: x, the one saved input, existed before the step
    assert st.activation_bytes == 4 + 4


def test_cpu_flash_attention_flops_are_counted() -> None:
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    st = gradckpt.measure(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert st.forward_flops == 2 * (2 * 1 * 2 * 8 * 8 * 4)  # QK^T and PV
    assert st.backward_flops > st.forward_flops


def _per_block_torch_checkpoint(model: nn.Module) -> list:
    """Plain torch.utils.checkpoint on each block's forward: the reference for 'full'."""
    undo = []
    for _, blk in gradckpt.find_blocks(model):
        fwd = blk.forward

        def ck(*a, _f=fwd, **kw):  # type: ignore[no-untyped-def]
            return torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False, **kw)

        blk.forward = ck
        undo.append(blk)
    return undo


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_full_matches_plain_torch_checkpoint_bytes_and_flops(preset: str) -> None:
    bm = build_bench_model(preset, layers=4, dropout=0.0)
    model = bm.model.train()
    batch = make_batch(bm, 2, 32)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    step()
    none = gradckpt.measure(step, model=model)
    gradckpt.enable(model, policy="full")
    step()
    full = gradckpt.measure(step, model=model)
    gradckpt.disable(model)
    undo = _per_block_torch_checkpoint(model)
    step()
    ref = gradckpt.measure(step, model=model)
    for blk in undo:
        del blk.forward
    assert full.activation_bytes == ref.activation_bytes
    # torch's recompute is not flagged as such, so it shows up inside backward
    assert full.recompute_flops > 0
    assert full.backward_flops + full.recompute_flops == ref.backward_flops
    assert full.backward_flops == none.backward_flops
    assert full.forward_flops == ref.forward_flops == none.forward_flops
    assert full.activation_bytes < none.activation_bytes
    # at most one extra forward pass of the blocks
    assert full.recompute_flops <= none.forward_flops
    assert len(full.block_bytes) == 4


def test_measure_rejects_non_callable() -> None:
    with pytest.raises(gradckpt.GradCkptError, match="function"):
        gradckpt.measure(3)  # type: ignore[arg-type]


def test_op_bytes_count_inputs_and_outputs_of_every_non_view_op() -> None:
    x, w = torch.randn(B, D), torch.randn(D, H)
    st = gradckpt.measure(lambda: (x @ w).t().sum(), model=None)
    # mm reads x and w and writes B*H; t() is a view (not counted); sum reads B*H, writes 1.
    assert st.op_bytes == 4 * (B * D + D * H + B * H) + 4 * (B * H + 1)
    assert st.recompute_bytes == 0


def test_estimate_timeline_counts_the_peak_measure_counts() -> None:
    # One tracker engine: the estimator's TimelineTracker and measure() see the same peak bytes
    # above the baseline for the same step (here on real CPU tensors).
    from gradckpt.estimate.timeline import TimelineTracker
    from gradckpt.measure import live_tensors

    model = _mlp()
    x = torch.randn(B, D)

    def step() -> None:
        model(x).sum().backward()

    model.zero_grad(set_to_none=True)
    st = gradckpt.measure(step, model=model)
    model.zero_grad(set_to_none=True)
    tracker = TimelineTracker()
    tracker.seed(live_tensors())
    tracker.mark("start")
    with tracker:
        step()
    tracker.mark("step")
    assert sum(tracker.intervals[-1].at_max) == st.peak_bytes - st.baseline_bytes
    assert tracker.peak["cpu"] - tracker.baseline["cpu"] == st.peak_bytes - st.baseline_bytes


def test_allocator_mode_still_counts_host_storages() -> None:
    # On CUDA, measure reads device bytes from the allocator and tracks no storage itself; host
    # memory (offloaded activations) has no allocator statistics, so CPU storages must still be
    # tracked, or host_activation_bytes reads 0 on every GPU run. Checked on CPU: the tracker in
    # allocator mode for a CUDA device, fed CPU ops only (no CUDA call is made).
    from gradckpt.measure.step import StepTracker

    tracker = StepTracker(device_type="cuda", use_allocator=True)
    tracker.seed([])
    with tracker:
        kept = torch.ones(256)  # 1024 bytes of host memory
    assert tracker.current.get("cpu") == kept.nbytes == 1024
    assert tracker.peak.get("cpu") == 1024
