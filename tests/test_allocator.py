"""The CUDA caching-allocator model (``gradckpt.estimate.allocator``) and the step replay through it.

Checks the allocator's rules one by one on hand-made request sequences (rounding, pools,
segment sizes, best fit, splitting, merging, reuse), then that replaying a fake training step
through it is consistent: every free finds its storage, the peak of allocated blocks equals
the estimate's tensor peak up to block rounding, reserved is at least that, and replaying a
few blocks to full depth gives the reserved bytes of a run of every block.

Run: PYTHONPATH=src python -m pytest -q -p no:xdist tests/test_allocator.py
"""

from __future__ import annotations

import pytest
import torch

import gradckpt
from gradckpt.bench.models import build_bench_model
from gradckpt.estimate import CUDA_CONTEXT_BYTES, fake_model
from gradckpt.estimate.allocator import (
    CachingAllocator,
    optimizer_state_sizes,
    replay_step,
    round_size,
    segment_size,
)

MiB = 2**20


def test_rounding_and_segment_sizes() -> None:
    assert [round_size(n) for n in (0, 1, 512, 513, 1000)] == [512, 512, 512, 1024, 1024]
    assert segment_size(512) == segment_size(MiB) == 2 * MiB  # small pool: 2 MiB segments
    assert segment_size(MiB + 512) == segment_size(10 * MiB - 512) == 20 * MiB
    assert segment_size(10 * MiB) == 10 * MiB  # from 10 MiB: rounded up to 2 MiB
    assert segment_size(11 * MiB) == 12 * MiB


def test_small_requests_share_a_2mib_segment() -> None:
    a = CachingAllocator()
    handles = [a.malloc(1000) for _ in range(4)]
    assert a.reserved == 2 * MiB and a.allocated == 4 * 1024
    for h in handles:
        a.free(h)
    assert a.allocated == 0 and a.reserved == 2 * MiB  # cached, not given back
    a.malloc(MiB)  # the merged free block serves a 1 MiB request: no new segment
    assert a.reserved == 2 * MiB


def test_mid_size_requests_split_a_20mib_segment_and_large_ones_get_their_own() -> None:
    a = CachingAllocator()
    x = a.malloc(4 * MiB)
    assert a.reserved == 20 * MiB
    y = a.malloc(8 * MiB)  # from the 16 MiB remainder
    assert a.reserved == 20 * MiB
    a.malloc(9 * MiB)  # the 8 MiB left is too small: a new 20 MiB segment
    assert a.reserved == 40 * MiB
    big = a.malloc(30 * MiB + 1)
    assert a.reserved == 40 * MiB + 32 * MiB
    a.free(x)
    a.free(y)
    a.free(big)
    # best fit: 12 MiB fits the merged 20 MiB block of the first segment, not the 32 MiB one
    a.malloc(12 * MiB)
    assert a.reserved == 72 * MiB
    assert a.peak_allocated == 4 * MiB + 8 * MiB + 9 * MiB + 30 * MiB + 512


def test_large_pool_does_not_split_off_a_remainder_of_1mib_or_less() -> None:
    a = CachingAllocator()
    h = a.malloc(12 * MiB)
    a.free(h)
    a.malloc(11 * MiB + 512)  # 12 MiB block, remainder 512 KiB: handed out whole
    assert a.allocated == 12 * MiB
    b = CachingAllocator()
    h = b.malloc(12 * MiB)
    b.free(h)
    b.malloc(10 * MiB)  # remainder 2 MiB > 1 MiB: split
    assert b.allocated == 10 * MiB


def test_fragmentation_reserves_more_than_the_peak_of_live_bytes() -> None:
    """Interleaved lifetimes leave holes no larger request fits: reserved grows past allocated."""
    a = CachingAllocator()
    hs = [a.malloc(12 * MiB) for _ in range(4)]
    for h in hs[::2]:
        a.free(h)  # two 12 MiB holes in separate segments
    a.malloc(24 * MiB)  # fits neither: a new segment although 24 MiB are free
    assert a.allocated == 48 * MiB and a.reserved == 72 * MiB


def test_held_memory_leaves_out_wholly_free_cached_segments() -> None:
    """On a full card the allocator gives back wholly free segments before an OOM: the step
    needs the segments that hold live blocks, not everything ever reserved."""
    a = CachingAllocator()
    big = a.malloc(100 * MiB)
    a.free(big)  # a 100 MiB segment, cached and wholly free
    small = a.malloc(30 * MiB)  # best fit: carved out of it (split)
    assert a.reserved == 100 * MiB and a.peak_held == 100 * MiB
    a.free(small)
    a.malloc(120 * MiB)  # fits nothing cached: a new segment; the 100 MiB one is wholly free
    assert a.reserved == 220 * MiB and a.peak_held == 120 * MiB
    assert a.peak_allocated == 120 * MiB


def test_replay_step_frees_by_origin_and_creates_optimizer_states_once() -> None:
    # interval "f": creates 1 (kept) and 2 (temporary); "b": frees 1 (created in "f")
    events = [
        [(1, 4 * MiB, "f"), (3, 0, "f"), (2, 4 * MiB, "f"), (2, -4 * MiB, "f"), (3, 0, "f")],
        [(1, -4 * MiB, "f")],
    ]  # storage 3 is empty: nothing to allocate or free
    r = replay_step([30 * MiB], events, ["f", "b"], optimizer_states=[12 * MiB, 12 * MiB])
    assert r.unmatched_frees == 0
    assert r.peak_allocated_bytes == 30 * MiB + 24 * MiB + 8 * MiB
    # the first 12 MiB state takes the cached (merged) 20 MiB block of the step's temporaries,
    # split; the second needs its own 12 MiB segment; step 2's 4 MiB requests fit the 8 MiB rest
    assert r.reserved_bytes == 30 * MiB + 20 * MiB + 12 * MiB
    st = optimizer_state_sizes([torch.empty(5000, dtype=torch.bfloat16)], "adamw-8bit")
    assert st == [5000, 5000, 4 * 20, 4 * 20]


@pytest.mark.parametrize("policy", ["none", "full"])
def test_fake_step_replay_is_consistent(policy: str) -> None:
    cfg = build_bench_model("llama").model.config
    r = gradckpt.estimate(
        cfg, batch=2, seq=256, policies=[policy], alternatives=False, overhead=0
    ).results[0]
    sess = list(fake_model._SESSIONS.items.values())[-1]  # the one the estimate ran last
    held = list(sess.steps.items.values())[-1][2]
    assert held.unmatched_frees == 0
    # blocks are rounded to 512 B: the allocator's peak is the tensors' peak plus at most that
    assert r.peak_bytes <= held.peak_allocated_bytes <= r.peak_bytes * 1.01
    assert r.reserved_bytes >= held.peak_allocated_bytes
    default = gradckpt.estimate(cfg, batch=2, seq=256, policies=[policy], alternatives=False)
    got = default.results[0]
    # the CUDA allowance is the context plus what the allocator must hold beyond the tensors
    assert r.peak_bytes <= held.peak_held_bytes <= held.reserved_bytes == r.reserved_bytes
    assert got.peak_bytes == held.peak_held_bytes + CUDA_CONTEXT_BYTES
    # a few blocks replayed to full depth hold what running every block holds, byte for byte
    deep = gradckpt.estimate(
        cfg, batch=2, seq=256, policies=[policy], alternatives=False, overhead=0, full_depth=True
    ).results[0]
    assert deep.reserved_bytes == r.reserved_bytes and deep.peak_bytes == r.peak_bytes
