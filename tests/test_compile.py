"""torch.compile per block on a checkpointed model (CPU): same gradients, one graph for all blocks.

Compiles each block in place (``block.compile()``) after ``gradckpt.enable`` and checks, against
the same model compiled without checkpointing: loss, gradients and BatchNorm running statistics
equal with torch.equal (inductor for ``full``; the cheaper ``aot_eager`` backend for every other
registered policy); the compiled graph holds torch's checkpoint operator; every block shares one
compiled graph (no recompile per block, which would fall back to eager after dynamo's limit of
8); and compiling first, then enabling, recompiles with the checkpoint in place.
Run: .venv/bin/python -m pytest tests/test_compile.py -q
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch._dynamo.testing import AotEagerAndRecordGraphs, CompileCounterWithBackend

import gradckpt

DIM, SEQ = 16, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)
        self.bn = nn.BatchNorm1d(SEQ)  # running statistics must move once per step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x + self.down(torch.nn.functional.gelu(self.up(self.norm(x)))))


class Net(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x).square().mean()


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make(layers: int = 3) -> Net:
    torch.manual_seed(0)
    return Net(layers).train()


X = torch.randn(2, SEQ, DIM, generator=torch.Generator().manual_seed(1))


def train_step(model: Net) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(X)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return loss.detach(), grads, buffers


def compile_blocks(model: Net, backend: object) -> None:
    for layer in model.layers:
        layer.compile(backend=backend)


def assert_same(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0])
    for i in (1, 2):
        assert a[i].keys() == b[i].keys()
        for k in a[i]:
            assert torch.equal(a[i][k], b[i][k]), k


def policies() -> list[str]:
    return [p.replace(":K", ":2") for p in gradckpt.policy_names(exact=True) if p != "none"]


@pytest.mark.slow
def test_inductor_per_block_gives_the_same_gradients_and_bn_stats() -> None:
    model = make()
    ref = copy.deepcopy(model)
    compile_blocks(ref, "inductor")
    expected = train_step(ref)
    gradckpt.enable(model, policy="full")
    compile_blocks(model, "inductor")
    got = train_step(model)
    assert_same(expected, got)
    assert int(got[2]["layers.0.bn.num_batches_tracked"]) == 1


@pytest.fixture(scope="module")
def compiled_reference() -> tuple:
    """The model compiled per block with aot_eager, without checkpointing: one step."""
    torch._dynamo.reset()
    ref = make()
    compile_blocks(ref, "aot_eager")
    return train_step(ref)


@pytest.mark.parametrize("policy", policies())
def test_every_policy_compiles_per_block_with_the_same_gradients(
    policy: str, compiled_reference: tuple
) -> None:
    model = make()
    expected = compiled_reference
    gradckpt.enable(model, policy=policy)
    recorder = AotEagerAndRecordGraphs()
    compile_blocks(model, recorder)
    assert_same(expected, train_step(model))
    assert any("checkpoint" in g.code for g in recorder.graphs)  # SAVE blocks have none


@pytest.mark.parametrize("policy", ["none", "full", "sqrt"])
def test_blocks_share_one_compiled_graph(policy: str) -> None:
    model = make(layers=12)  # more blocks than dynamo's recompile limit (8)
    gradckpt.enable(model, policy=policy)
    counter = CompileCounterWithBackend("aot_eager")
    compile_blocks(model, counter)
    train_step(model)
    # One graph for the first block, one more once inputs start to require grad (as without
    # gradckpt): never one per block.
    assert counter.frame_count == 2


def test_enable_after_compile_recompiles_with_the_checkpoint() -> None:
    model = make()
    ref = copy.deepcopy(model)
    expected = train_step(ref)
    recorder = AotEagerAndRecordGraphs()
    compile_blocks(model, recorder)
    train_step(model)
    assert not any("checkpoint" in g.code for g in recorder.graphs)
    before = len(recorder.graphs)
    gradckpt.enable(model, policy="full")
    got = train_step(model)
    assert any("checkpoint" in g.code for g in recorder.graphs[before:])
    assert torch.allclose(expected[0], got[0])  # eager reference: compiled numerics may differ
