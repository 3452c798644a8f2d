"""selective next to torch's SAC with the same kept ops, and full next to torch's plain checkpoint.

One process, one torch thread, the bench Llama preset (4 blocks, batch 1), every configuration once
per round in a rotated order; prints each configuration's median over rounds of (its step's process
CPU time / ``none``'s in the same round). ``selective-stacked`` is gradckpt's fallback (its checks in a
dispatch mode of their own above torch's SAC modes), kept for torch versions whose private SAC classes
differ; ``selective`` runs them inside torch's modes. Timing only: gradients are compared by the tests.

Run: PYTHONPATH=src:. python -m benchmarks.selective_vs_sac [SEQ] [ROUNDS]   (default 512, 15)
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Any

import torch

import gradckpt
from benchmarks.peers.configs import torchtitan_sac_context, wrap_blocks_with_torch_checkpoint
from gradckpt.bench.models import build_bench_model, make_batch
from gradckpt.runtime import selective


def main() -> None:
    seq = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    torch.set_num_threads(1)
    bm = build_bench_model("llama", layers=4, dropout=0.0)
    base = bm.model.train()
    data = make_batch(bm, 1, seq)
    merged = selective._merged
    models: dict[str, Any] = {"none": copy.deepcopy(base)}
    for name, setup in [
        ("selective", lambda m: gradckpt.enable(m, "selective")),
        (
            "torch-sac-mm",
            lambda m: wrap_blocks_with_torch_checkpoint(m, torchtitan_sac_context(False)),
        ),
        ("selective-stacked", lambda m: gradckpt.enable(m, "selective")),
        ("full", lambda m: gradckpt.enable(m, "full")),
        ("torch-full", lambda m: wrap_blocks_with_torch_checkpoint(m, None)),
    ]:
        m = copy.deepcopy(base)
        setup(m)
        models[name] = m

    def step(name: str) -> float:
        # the fallback is chosen per block call (selective_context_fn), so per step here
        selective._merged = (lambda *a: None) if name == "selective-stacked" else merged  # type: ignore[assignment]
        m = models[name]
        m.zero_grad(set_to_none=True)
        t = time.process_time()
        m(**data).loss.backward()
        return time.process_time() - t

    for name in models:  # warm-up (selective learns what its recompute never reaches)
        step(name)
        step(name)
    names = list(models)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        t = {n: step(n) for n in order}
        for n in names:
            ratios[n].append(t[n] / t["none"])
    selective._merged = merged  # type: ignore[assignment]
    print(f"llama bench preset, 4 blocks, batch 1 x seq {seq}, 1 thread, {rounds} rounds")
    for n in names:
        print(f"{n:18s} step / none: median {statistics.median(ratios[n]):.3f}")


if __name__ == "__main__":
    main()
