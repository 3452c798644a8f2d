"""DDP and FSDP2 (2 processes, gloo, CPU): losses and gradients bit-identical to one process.

Two worker processes (this file run as a script, with torchrun's environment variables) train a
small transformer-like model for two SGD steps under every registered policy and a budget plan,
wrapped by ``gradckpt.integrations.distributed.parallelize`` (checkpointing, then DDP or FSDP2
``fully_shard``). The reference runs in this process without checkpointing: each rank's half
batch separately, gradients averaged as (g0 + g1) / 2 (exact in fp32 for two ranks, the same
arithmetic as DDP's and FSDP2's all-reduce), so losses and gradients must match with torch.equal.
Also checked: the whole recipe with torch.compile per block, DDP with find_unused_parameters (the "mark a variable ready only once" failure of
reentrant checkpointing), enable() after DDP, and the refusal of a segment plan on blocks FSDP2
already sharded one by one. Run: .venv/bin/python -m pytest tests/test_distributed.py -q
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradckpt
from gradckpt.integrations.distributed import fsdp_units, parallelize

WORLD = 2
STEPS = 2
LR = 0.1
VOCAB, DIM, SEQ, BATCH = 64, 32, 8, 4  # BATCH is split over the two ranks


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(torch.nn.functional.gelu(self.up(self.norm(x))))) * scale


class TinyLM(nn.Module):
    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(DIM, VOCAB)
        self.scale = nn.Parameter(torch.ones(DIM))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, scale=self.scale)  # a keyword tensor, shared by every block
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), ids.flatten())


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def batch(rank: int, step: int) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
    half = BATCH // WORLD
    return ids[rank * half : (rank + 1) * half]


def seed(rank: int, step: int) -> None:
    torch.manual_seed(1000 + 10 * step + rank)  # dropout differs per rank and step


def configs() -> list[str]:
    policies = [p.replace(":K", ":2") for p in gradckpt.policy_names(exact=True)]
    out = [f"{dp}/{p}" for dp in ("ddp", "fsdp2") for p in policies]
    if _has_planner():
        # FSDP2 only: profiling for a budget takes seconds (it scans every live object), and
        # sharding is the case where a plan's segments and the shard units must agree.
        out.append("fsdp2/budget")
    return [
        *out,
        "fsdp2+compile/sqrt",  # the whole recipe: checkpoint, compile per block, fully_shard
        "ddp-unused/full",
        "ddp-then-enable/full",
        "fsdp2-per-block-then-enable/sqrt",
    ]


def _has_planner() -> bool:
    try:
        import gradckpt.planner  # noqa: F401
    except ImportError:  # a build without the planner: no budget plans to test
        return False
    # With the planner present, the names used below must exist: no silent loss of coverage.
    from gradckpt.planner import min_peak, solve  # noqa: F401
    from gradckpt.planner.api import profile_model  # noqa: F401

    return True


# -- worker (runs in each of the two processes) ---------------------------------------------


def _budget_between_full_and_none(model: nn.Module, ids: torch.Tensor) -> int:
    """A budget the planner can only meet by mixing decisions: halfway between its extremes."""
    from gradckpt.blocks import find_blocks
    from gradckpt.planner import min_peak, solve
    from gradckpt.planner.api import profile_model

    prof = profile_model(model, ids, blocks=find_blocks(model))
    lo, hi = min_peak(prof).peak, solve(prof, 1 << 60).peak
    return lo + (hi - lo) // 2


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)
    return (full() if callable(full) else t).detach().clone()


def _run(config: str, rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    wrap, policy = config.split("/")
    model = make_model()
    plan = None
    if wrap in ("ddp", "fsdp2"):
        dp = "fsdp2" if wrap == "fsdp2" else "ddp"
        if policy == "budget":
            budget = _budget_between_full_and_none(model, batch(rank, 0))
            dist.all_reduce(t := torch.tensor(budget), op=dist.ReduceOp.MIN)
            trained, plan = parallelize(model, budget=int(t), example=batch(0, 0), data_parallel=dp)
        else:
            trained, plan = parallelize(model, policy, data_parallel=dp)
    elif wrap == "fsdp2+compile":
        # aot_eager: the compiler's graph capture and recompute without inductor's codegen,
        # which takes long on CPU (tests/test_compile.py runs inductor).
        trained, plan = parallelize(
            model, policy, compile={"backend": "aot_eager"}, data_parallel="fsdp2"
        )
    elif wrap == "ddp-unused":
        trained, plan = parallelize(
            model, policy, data_parallel="ddp", ddp_kwargs={"find_unused_parameters": True}
        )
    elif wrap == "ddp-then-enable":
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model)
        plan = gradckpt.enable(trained, policy=policy)
    elif wrap == "fsdp2-per-block-then-enable":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        trained = model
        try:
            gradckpt.enable(model, policy=policy)
        except gradckpt.GradCkptError as e:
            return {"error": str(e)}
        return {"error": None}
    else:
        raise ValueError(config)
    opt = torch.optim.SGD(trained.parameters(), lr=LR)
    losses, grads = [], []
    for step in range(STEPS):
        seed(rank, step)
        loss = trained(batch(rank, step))
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append(
            {n.removeprefix("module."): _full(p.grad) for n, p in trained.named_parameters()}
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
    live = gradckpt.applied_plan(model) or gradckpt.applied_plan(trained)
    return {
        "losses": losses,
        "grads": grads,
        "plan": None if plan is None else plan.to_dict(),
        "live_plan": None if live is None else live.to_dict(),
        "error": None,
    }


def worker(out_dir: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.use_deterministic_algorithms(True, warn_only=True)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    results: dict[str, Any] = {}
    try:
        for name in names:
            try:
                results[name] = _run(name, rank)
            except Exception:
                results[name] = {"error": "crashed:\n" + traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


# -- the tests (in the pytest process) -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(out: Path) -> None:
    """Run the two workers; their results (or the failure log) end up in ``out``."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    cmd = [sys.executable, __file__, str(out), json.dumps(configs())]
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    failures = []
    for rank, p in enumerate(procs):
        try:
            log = p.communicate(timeout=600)[0]
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            log = "timed out after 600 s"
        if p.returncode != 0:
            failures.append(f"rank {rank} exited with {p.returncode}:\n{log[-4000:]}")
    (out / "failures.txt").write_text("\n".join(failures))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    # Under pytest-xdist every worker that runs a test of this module builds this fixture; the
    # first runs the two processes and the others wait for its results (a lock in the directory
    # that all workers of this session share) instead of running them again.
    from filelock import FileLock  # a dependency of torch

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "gradckpt-distributed"
    with FileLock(str(shared / "gradckpt-distributed.lock")):
        if not (out / "failures.txt").exists():
            out.mkdir(exist_ok=True)
            _launch(out)
    failures = (out / "failures.txt").read_text()
    assert not failures, failures
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def reference() -> tuple[list[list[torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """One process, no checkpointing: per-rank losses and the averaged gradients, per step."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], []
    for step in range(STEPS):
        per_rank = []
        for rank in range(WORLD):
            model.zero_grad(set_to_none=True)
            seed(rank, step)
            loss = model(batch(rank, step))
            loss.backward()
            per_rank.append(
                (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
            )
        avg = {n: (per_rank[0][1][n] + per_rank[1][1][n]) / WORLD for n in per_rank[0][1]}
        for n, p in model.named_parameters():
            p.grad = avg[n]
        opt.step()
        losses.append([loss for loss, _ in per_rank])
        grads.append(avg)
    return losses, grads


@pytest.fixture(scope="module")
def ref() -> tuple[list[list[torch.Tensor]], list[dict[str, torch.Tensor]]]:
    # The workers run with OMP_NUM_THREADS=1; CPU matmuls split their reductions by thread count,
    # so a bit-exact reference must use one thread too (make test runs pytest with 2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference()
    finally:
        torch.set_num_threads(threads)


TRAINED = [c for c in configs() if c.split("/")[0] != "fsdp2-per-block-then-enable"]


@pytest.mark.slow
@pytest.mark.parametrize("config", TRAINED)
def test_losses_and_grads_equal_single_process(config: str, results: list, ref: tuple) -> None:
    ref_losses, ref_grads = ref
    for rank, res in enumerate(results):
        got = res[config]
        assert got["error"] is None, got["error"]
        for step in range(STEPS):
            assert torch.equal(got["losses"][step], ref_losses[step][rank]), (config, rank, step)
            assert got["grads"][step].keys() == ref_grads[step].keys()
            for name, g in ref_grads[step].items():
                assert torch.equal(got["grads"][step][name], g), (config, rank, step, name)
        assert results[0][config]["plan"] == got["plan"]  # every rank ran the same plan


@pytest.mark.slow
def test_plans_are_what_was_asked(results: list) -> None:
    got = results[0]
    assert got["fsdp2/full"]["plan"]["policy"] == "full"
    assert {b["decision"] for b in got["ddp/full"]["plan"]["blocks"]} == {"recompute"}
    assert got["fsdp2/sqrt"]["plan"]["segments"] == [[0, 2], [2, 4]]
    assert got["ddp-then-enable/full"]["plan"]["blocks"][0]["name"] == "module.layers.0"
    if "fsdp2/budget" in got:
        plan = got["fsdp2/budget"]["plan"]
        assert plan["policy"] == "auto", plan
        decisions = {b["decision"] for b in plan["blocks"]}
        assert "save" in decisions and decisions != {"save"}, plan  # a mixed plan


@pytest.mark.slow
def test_segment_over_blocks_sharded_one_by_one_is_refused(results: list) -> None:
    for res in results:
        err = res["fsdp2-per-block-then-enable/sqrt"]["error"]
        assert err is not None and "fully_shard was applied to them one by one" in err, err


def test_fsdp_units_group_each_segment() -> None:
    model = make_model()
    plan = gradckpt.enable(model, policy="sqrt")
    layers = list(model.layers)
    assert fsdp_units(model, plan) == [layers[0:2], layers[2:4]]
    plan = gradckpt.enable(model, policy="every:2")
    assert fsdp_units(model, plan) == [[b] for b in layers]


def test_parallelize_refuses_a_model_already_compiled_or_wrapped() -> None:
    model = make_model()
    model.layers[1].compile()
    with pytest.raises(gradckpt.GradCkptError, match=r"layers\.1 is already compiled"):
        parallelize(model, "full", data_parallel=None)
    assert gradckpt.applied_plan(model) is None  # refused before anything was applied
    with pytest.raises(gradckpt.GradCkptError, match="data_parallel must be"):
        parallelize(make_model(), "full", data_parallel="zero3")


if __name__ == "__main__":
    worker(sys.argv[1], json.loads(sys.argv[2]))
