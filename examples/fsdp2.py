"""FSDP2 with gradckpt on 2 CPU processes (gloo): checkpointing, then compile, then fully_shard.

Runs on CPU in well under a minute: .venv/bin/python examples/fsdp2.py
It starts its two processes itself; under torchrun (RANK set) it runs as one of them:
    torchrun --nproc-per-node 2 examples/fsdp2.py

The order matters (gradckpt/integrations/distributed.py says why): gradckpt overrides each
block's forward, so FSDP2's all-gather hooks stay outside the recomputed region; a segment of
blocks checkpointed as one unit (policy "sqrt") is sharded as one FSDP unit.
`parallelize` applies the three steps in that order. To check the result, both ranks train on
the same batch, so rank 0 can compare every loss with one process training without gradckpt.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradckpt
from gradckpt.integrations.distributed import fsdp_units, parallelize

STEPS, BATCH, SEQ = 5, 4, 64


def build_model() -> torch.nn.Module:
    """A small Llama from a config (random weights, nothing downloaded)."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # the same initial weights on every rank
    return transformers.LlamaForCausalLM(cfg).train()


def train(model: torch.nn.Module, ids: torch.Tensor) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run(rank: int, world: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ids = torch.randint(0, 1024, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    # 1-3. checkpoint (sqrt: ~sqrt(4) = 2 segments of 2 blocks), compile (off here: inductor
    # takes a while on CPU; pass compile=True on GPUs), then fully_shard each unit and the root.
    model, plan = parallelize(build_model(), "sqrt", compile=False, data_parallel="fsdp2")
    if rank == 0:
        units = [[type(m).__name__ for m in u] for u in fsdp_units(model, plan)]
        print(f"plan: {plan.summary()}; FSDP units: {units}")
        local = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        print(f"rank 0 holds {local:,} of {total:,} parameters")

    losses = train(model, ids)

    if rank == 0:
        reference = train(build_model(), ids)  # one process, no checkpointing, no sharding
        for i, (a, b) in enumerate(zip(losses, reference)):
            print(f"step {i}: loss {a:.6f}   single process without gradckpt: {b:.6f}")
        same = losses == reference  # exactly: (g + g) / 2 == g, and checkpointing changes no bit
        print(f"losses equal to the single-process run, bit for bit: {same}")
        if not same:
            raise SystemExit(1)
    dist.barrier()
    gradckpt.disable(model)
    dist.destroy_process_group()


def main() -> None:
    if "RANK" in os.environ:  # started by torchrun
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        return
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(run, args=(2,), nprocs=2, join=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
