"""Guardrails: clear errors naming the block, clean state after faults, no leaks, bad input refused.

1. A recompute that saves tensors of another count, shape or dtype raises CheckpointMismatchError
   naming the block (or segment), for every checkpointing decision; blocks with generator or
   async forwards are refused.
2. Faults: an exception inside a checkpointed block, in forward or in the recompute during
   backward, or in the model's own code between two blocks of a segment, leaves no saved-tensor
   hooks, dispatch modes or recompute flag behind, holds no memory, the next step is bit-exact,
   and ``disable`` gives back exactly the original model.
3. Soak: live bytes after every step are constant and the number of live storages does not grow
   (30 steps per policy here, 300 in the ``slow`` test), measured by tracking every storage the
   steps allocate (gradckpt.measure.StepTracker), not by sampling.
4. Bad input: every API function and CLI command given wrong types, zero/negative/huge values,
   missing files, malformed JSON, unknown names: a GradCkptError subclass (API), exit 2 with one
   line on stderr and no traceback (CLI), and nothing half-applied to the model.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_guardrails.py -q -s        # fast
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_guardrails.py -q -s -m slow  # 300-step soak
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradckpt
from gradckpt import CheckpointMismatchError, Decision, GradCkptError, Plan
from gradckpt.bench.models import MLPStack, build_bench_model, make_batch
from gradckpt.cli import main
from gradckpt.errors import BlockError, BudgetError, ConfigError, PlanError, PolicyError
from gradckpt.measure import live_tensors
from gradckpt.runtime.decisions import WRAPPERS
from gradckpt.state import is_recomputing

DIM = 16
CHECKPOINTING = sorted({*WRAPPERS} - {Decision.SAVE}, key=lambda d: d.value)


def policies() -> list[str]:
    """Every registered policy as typed, with every:K as every:2."""
    out = []
    for usage in gradckpt.policy_names():
        name, _, arg = usage.partition(":")
        out.append(f"{name}:2" if arg else name)
    return out


def clean_state() -> None:
    """Nothing gradckpt or torch's checkpoint pushed is still in effect."""
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert torch._C._len_torch_dispatch_stack() == 0
    assert torch._C._len_torch_function_stack() == 0
    assert not is_recomputing()


# -- models --------------------------------------------------------------------------------


class Block(nn.Module):
    """Attention, BatchNorm, dropout and an MLP; ``fail`` makes it raise on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.bn = nn.BatchNorm1d(DIM)
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)
        self.drop = nn.Dropout(0.1)
        self.fail: str | None = None  # "forward" or "recompute"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (
            t.view(b, s, 2, DIM // 2).transpose(1, 2) for t in self.qkv(self.norm(x)).chunk(3, -1)
        )
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.1 if self.training else 0.0
        )
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, s, DIM)))
        if self.fail == "forward" or (self.fail == "recompute" and is_recomputing()):
            raise Boom(f"{self.fail} failed")
        h = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return x + self.drop(self.down(F.gelu(self.up(h))))


class Boom(RuntimeError):
    pass


class Net(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, DIM)
        self.layers = nn.ModuleList([Block() for _ in range(n)])
        self.head = nn.Linear(DIM, 50)
        self.fail_between: int | None = None  # raise in the model's own code after this block

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask=mask)
            if self.fail_between == i:
                raise Boom("model code failed between blocks")
        return F.cross_entropy(self.head(h).flatten(0, 1), ids.flatten())


def net(n: int = 4) -> Net:
    torch.manual_seed(0)
    return Net(n).train()


IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(8, 8, dtype=torch.bool).tril()


def grads_after_step(
    model: nn.Module, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(IDS, MASK)
    loss.backward()
    return loss.detach(), {
        n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
    }


def assert_same_step(a: nn.Module, b: nn.Module, seed: int = 0) -> None:
    la, ga = grads_after_step(a, seed)
    lb, gb = grads_after_step(b, seed)
    assert torch.equal(la, lb)
    for n in ga:
        assert (ga[n] is None) == (gb[n] is None) and (
            ga[n] is None or torch.equal(ga[n], gb[n])
        ), n
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def assert_pristine(model: nn.Module, reference: nn.Module) -> None:
    """``model`` is structurally the model it was before enable: no overrides, no hooks."""
    assert gradckpt.applied_plan(model) is None
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert list(model.state_dict()) == list(reference.state_dict())


# -- 1. mismatch errors name the block -----------------------------------------------------


class Nondeterministic(nn.Module):
    """A block whose second call differs from its first, as Python-side state makes it do."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.kind = kind
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        first = self.calls % 2 == 1  # forward is call 1, its recompute call 2
        h = self.lin(x)
        if self.kind == "count":  # one op (one saved tensor) fewer on the second call
            return h.sin().cos() if first else h.cos()
        if self.kind == "shape":  # a size taken from Python state
            return h[:, : DIM - (0 if first else 1)].cos().sum(-1, keepdim=True) + h
        if self.kind == "dtype":  # a precision switch kept in Python state
            return h.to(torch.float32 if first else torch.float64).cos().float()
        raise AssertionError(self.kind)


def mismatch_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, DIM), Nondeterministic(kind), nn.Linear(DIM, DIM))


@pytest.mark.parametrize("kind", ["count", "shape", "dtype"])
@pytest.mark.parametrize("decision", CHECKPOINTING, ids=lambda d: d.value)
def test_mismatch_raises_named_error(kind: str, decision: Decision) -> None:
    model = mismatch_model(kind)
    plan = Plan(("0", "1", "2"), (Decision.SAVE, decision, Decision.SAVE))
    gradckpt.enable(model, plan=plan)
    out = model(torch.randn(3, DIM)).sum()
    with pytest.raises(CheckpointMismatchError, match="block '1'") as info:
        out.backward()
    clean_state()
    if decision is Decision.RECOMPUTE:
        assert isinstance(info.value.__cause__, torch.utils.checkpoint.CheckpointError)
        assert "did not reproduce the forward pass" in str(info.value)
        assert {"count": "different number", "shape": "shape", "dtype": "dtype"}[kind] in str(
            info.value
        )


@pytest.mark.parametrize("kind", ["count", "shape", "dtype"])
def test_mismatch_in_segment_names_the_segment(kind: str) -> None:
    model = mismatch_model(kind)
    gradckpt.enable(model, "sqrt", blocks=["0", "1", "2"])  # 3 blocks: segment 0-1, then 2
    out = model(torch.randn(3, DIM)).sum()
    with pytest.raises(CheckpointMismatchError, match="segment of blocks '0' to '1'"):
        out.backward()
    clean_state()


def test_mismatch_in_plain_checkpoint_call_names_the_function() -> None:
    block = Nondeterministic("count")
    x = torch.randn(3, DIM, requires_grad=True)
    out = gradckpt.checkpoint(block, x).sum()
    with pytest.raises(CheckpointMismatchError, match="^Nondeterministic: the recompute"):
        out.backward()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return block(x)

    with pytest.raises(CheckpointMismatchError, match="fn: the recompute"):
        gradckpt.checkpoint(fn, x).sum().backward()
    clean_state()


def test_torch_debug_mode_works_through_gradckpt() -> None:
    x = torch.randn(4, requires_grad=True)
    gradckpt.checkpoint(torch.sin, x, debug=True).sum().backward()
    assert torch.equal(x.grad, torch.cos(x.detach()))
    with pytest.raises(GradCkptError, match="debug=True cannot be combined with context_fn"):
        gradckpt.checkpoint(
            torch.sin, x, debug=True, context_fn=lambda: (contextlib.nullcontext(),) * 2
        )


# -- refusals --------------------------------------------------------------------------------


class GenBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        yield self.lin(x)


class LazyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> Any:
        return (self.lin(x) * k for k in range(2))


class AsyncBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)

    async def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("cls", [GenBlock, AsyncBlock], ids=["generator", "async"])
@pytest.mark.parametrize("policy", ["full", "sqrt", "selective", "offload"])
def test_generator_and_async_forwards_refused_at_enable(cls: type[nn.Module], policy: str) -> None:
    if policy not in policies():
        pytest.skip(f"{policy} not registered")
    model = nn.ModuleList([cls(), cls(), cls()])
    reference = copy.deepcopy(model)
    with pytest.raises(BlockError, match="block '0' .* generator or async forward"):
        gradckpt.enable(model, policy)
    assert_pristine(model, reference)
    gradckpt.enable(model, "none")  # SAVE touches nothing: allowed


@pytest.mark.parametrize("decision", CHECKPOINTING, ids=lambda d: d.value)
def test_block_returning_a_generator_refused_at_first_forward(decision: Decision) -> None:
    model = nn.ModuleList([LazyBlock(), LazyBlock()])
    gradckpt.enable(model, plan=Plan(("0", "1"), (decision, Decision.SAVE)))
    with pytest.raises(BlockError, match="block '0' returned a generator"):
        model[0](torch.randn(2, DIM))
    clean_state()
    gradckpt.disable(model)
    assert len(list(model[0](torch.randn(2, DIM)))) == 2  # the model itself still works


def test_block_returning_a_generator_refused_in_segment() -> None:
    model = nn.Sequential(nn.Linear(DIM, DIM), LazyBlock())
    gradckpt.enable(model, "sqrt", blocks=["0", "1"])
    with pytest.raises(BlockError, match="block '1' returned a generator"):
        model(torch.randn(2, DIM))
    clean_state()


# -- 2. faults ------------------------------------------------------------------------------


def _fail_at(model: Net, where: str, index: int) -> None:
    for i, layer in enumerate(model.layers):
        layer.fail = where if (i == index and where != "between") else None
    model.fail_between = index if where == "between" else None


@pytest.mark.parametrize("where", ["forward", "recompute", "between"])
@pytest.mark.parametrize("policy", policies())
def test_fault_leaves_nothing_behind(policy: str, where: str) -> None:
    model, reference = net(), net()
    plan = gradckpt.enable(model, policy)
    for index in (0, 1, 3):
        if where == "recompute" and plan.decisions[index] is Decision.SAVE:
            continue  # nothing is recomputed for this block
        if where == "between" and index == 3:
            continue
        for m in (model, reference):
            _fail_at(m, where, index)
        torch.manual_seed(index)
        if where == "recompute":
            loss = model(IDS, MASK)
            with pytest.raises(Boom) as info:
                loss.backward()
            del loss
            torch.manual_seed(index)
            reference(IDS, MASK)  # the same forward on the reference: BatchNorm moved once
        else:
            with pytest.raises(Boom) as info:
                model(IDS, MASK)
            torch.manual_seed(index)
            with pytest.raises(Boom):
                reference(IDS, MASK)
        clean_state()  # with the exception (and its traceback) still alive
        del info
        for m in (model, reference):
            _fail_at(m, "none", -1)
        assert_same_step(model, reference, seed=10 + index)  # the next step is exact
    gradckpt.disable(model)
    assert_pristine(model, reference)
    assert_same_step(model, reference, seed=99)


def test_fault_during_enable_leaves_nothing_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    model = net()
    reference = copy.deepcopy(model)
    original = WRAPPERS[Decision.RECOMPUTE]
    calls = []

    def flaky(name: str, block: nn.Module, forward: Callable[..., Any], options: Any) -> Any:
        calls.append(name)
        if len(calls) == 3:
            raise Boom("wrapper failed on the third block")
        return original(name, block, forward, options)

    monkeypatch.setitem(WRAPPERS, Decision.RECOMPUTE, flaky)
    with pytest.raises(Boom):
        gradckpt.enable(model, "full")
    assert_pristine(model, reference)
    assert_same_step(model, reference)


def test_faulty_steps_hold_no_memory() -> None:
    """A failing step (each kind) then a normal one, per policy: live bytes after each normal step equal."""
    for policy in policies():
        model = net(3)
        plan = gradckpt.enable(model, policy)
        recomputed = [i for i, d in enumerate(plan.decisions) if d is not Decision.SAVE]
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        gc.collect()
        after = []
        with LiveStorages() as tracker:
            for where in ("none", "forward", "recompute", "between"):
                _fail_at(model, where, recomputed[0] if recomputed and where == "recompute" else 1)
                with contextlib.suppress(Boom):
                    model(IDS, MASK).backward()
                _fail_at(model, "none", -1)
                opt.zero_grad(set_to_none=True)
                model(IDS, MASK).backward()
                opt.step()
                gc.collect()  # exceptions and tracebacks form cycles; they are garbage now
                after.append((dict(tracker.bytes), tracker.storages))
        assert all(a == after[0] for a in after), (policy, after)
        clean_state()


# -- 3. soak --------------------------------------------------------------------------------


class LiveStorages(TorchDispatchMode):
    """Every storage an op creates, per device type, until Python or autograd frees it.

    The same bookkeeping as gradckpt.measure.StepTracker (a weak reference per storage), without
    its FLOP counting and phases: half the overhead, for the 1800 steps of the slow soak.
    Tensors that only autograd holds (saved for backward) are counted too: a leaked graph shows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = {}
        self._live: dict[int, tuple[int, str]] = {}
        self._refs: dict[int, Any] = {}

    @property
    def storages(self) -> int:
        return len(self._live)

    def _free(self, key: int) -> None:
        self._refs.pop(key, None)
        n, dev = self._live.pop(key, (0, "cpu"))
        self.bytes[dev] = self.bytes.get(dev, 0) - n

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        n, dev = int(st.nbytes()), t.device.type
        self._live[key] = (n, dev)
        self.bytes[dev] = self.bytes.get(dev, 0) + n
        self._refs[key] = weakref.ref(st, lambda _r, k=key: self._free(k))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if type(t) is torch.Tensor or type(t) is nn.Parameter:
                self._track(t)
        return out


def soak(policy: str, steps: int, leak: bool = False) -> dict[str, Any]:
    """Train ``steps`` steps under LiveStorages; live bytes and storages after each step."""
    model = net(3)
    gradckpt.enable(model, policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kept = []
    gc.collect()
    live, storages = [], []
    tensors_before = len(live_tensors())
    with LiveStorages() as tracker:
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(i)
            loss = model(IDS, MASK)
            loss.backward()
            opt.step()
            if leak:
                kept.append(loss.detach())
            del loss
            # Device and host bytes: one "cpu" entry on a CPU-only run (offloaded inputs stay
            # in host memory, which is the device); "cuda" and "cpu" apart on a GPU.
            live.append(dict(tracker.bytes))
            storages.append(tracker.storages)
    gc.collect()
    tensors_after = len(live_tensors())
    gradckpt.disable(model)
    total = [sum(b.values()) for b in live]
    return {
        "live": total,
        "per_device": live[-1],
        "storages": storages,
        "drift": max(total) - min(total),
        "tensor_growth": tensors_after - tensors_before,
    }


SOAK_RESULTS: dict[str, dict[str, Any]] = {}


def _check_soak(policy: str, steps: int) -> None:
    r = soak(policy, steps)
    SOAK_RESULTS[f"{policy}x{steps}"] = r
    # Optimizer states appear in step 0; from then on nothing is allocated for good.
    assert r["drift"] == 0, (policy, r["live"][:5], r["live"][-5:])
    assert len(set(r["storages"])) == 1, (policy, r["storages"][:5], r["storages"][-5:])
    print(
        f"\nsoak {policy}: {steps} steps, live {r['per_device']} B after every step, drift "
        f"{r['drift']} B, {r['storages'][0]} live storages, python tensors "
        f"+{r['tensor_growth']} after the run (AdamW states, gradients)"
    )


@pytest.mark.parametrize("policy", policies())
def test_soak_fast(policy: str) -> None:
    _check_soak(policy, 30)


@pytest.mark.slow
@pytest.mark.parametrize("policy", policies())
def test_soak_300_steps(policy: str) -> None:
    _check_soak(policy, 300)


def test_soak_harness_sees_a_leak() -> None:
    """Negative control: keeping one fp32 scalar per step shows as exactly 4 bytes per step."""
    r = soak("full", 10, leak=True)
    assert [b - a for a, b in zip(r["live"], r["live"][1:])] == [4] * 9
    assert r["storages"][-1] - r["storages"][0] == 9


# -- 4. bad input: the API ------------------------------------------------------------------

MLP = MLPStack(layers=3, dim=8, vocab=16)
NAMES = ["blocks.0", "blocks.1", "blocks.2"]


def _plan(**kw: Any) -> Callable[[], Any]:
    return lambda: Plan(**{"blocks": NAMES, "decisions": ["save"] * 3, **kw})


API_BAD: list[tuple[str, Callable[[], Any], type[GradCkptError]]] = [
    # enable: wrong types, unknown names, zero/negative/huge values
    ("enable(None)", lambda: gradckpt.enable(None), GradCkptError),  # type: ignore[arg-type]
    ("enable(str)", lambda: gradckpt.enable("model"), GradCkptError),  # type: ignore[arg-type]
    ("policy=3", lambda: gradckpt.enable(MLP, 3), PolicyError),  # type: ignore[arg-type]
    ("policy=''", lambda: gradckpt.enable(MLP, ""), PolicyError),
    ("policy=bogus", lambda: gradckpt.enable(MLP, "bogus"), PolicyError),
    ("policy=fulll", lambda: gradckpt.enable(MLP, "fulll"), PolicyError),
    ("every", lambda: gradckpt.enable(MLP, "every"), PolicyError),
    ("every:", lambda: gradckpt.enable(MLP, "every:"), PolicyError),
    ("every:0", lambda: gradckpt.enable(MLP, "every:0"), PolicyError),
    ("every:-1", lambda: gradckpt.enable(MLP, "every:-1"), PolicyError),
    ("every:x", lambda: gradckpt.enable(MLP, "every:x"), PolicyError),
    ("every:1.5", lambda: gradckpt.enable(MLP, "every:1.5"), PolicyError),
    ("none:3", lambda: gradckpt.enable(MLP, "none:3"), PolicyError),
    ("sqrt:2", lambda: gradckpt.enable(MLP, "sqrt:2"), PolicyError),
    ("unknown option", lambda: gradckpt.enable(MLP, "full", foo=1), PolicyError),
    ("policy and budget", lambda: gradckpt.enable(MLP, "full", budget="1GiB"), PolicyError),
    ("policy and plan", lambda: gradckpt.enable(MLP, "full", plan=_plan()()), PolicyError),
    ("budget=-1", lambda: gradckpt.enable(MLP, budget=-1), BudgetError),
    ("budget=0", lambda: gradckpt.enable(MLP, budget=0), BudgetError),
    ("budget=abc", lambda: gradckpt.enable(MLP, budget="abc"), BudgetError),
    ("budget=-5GiB", lambda: gradckpt.enable(MLP, budget="-5GiB"), BudgetError),
    ("budget=5 parsecs", lambda: gradckpt.enable(MLP, budget="5 parsecs"), BudgetError),
    ("budget=nan", lambda: gradckpt.enable(MLP, budget=float("nan")), BudgetError),
    ("budget=inf", lambda: gradckpt.enable(MLP, budget=float("inf")), BudgetError),
    ("budget=True", lambda: gradckpt.enable(MLP, budget=True), BudgetError),
    ("budget=[]", lambda: gradckpt.enable(MLP, budget=[]), BudgetError),  # type: ignore[arg-type]
    ("plan=str", lambda: gradckpt.enable(MLP, plan="full"), PlanError),  # type: ignore[arg-type]
    ("plan=dict", lambda: gradckpt.enable(MLP, plan={"blocks": []}), PlanError),  # type: ignore[arg-type]
    (
        "plan for other blocks",
        lambda: gradckpt.enable(MLP, plan=Plan(("x",), ("save",))),
        GradCkptError,
    ),
    (
        "plan with options=",
        lambda: gradckpt.enable(MLP, plan=_plan()(), save_ops=["mm"]),
        PolicyError,
    ),
    ("blocks=3", lambda: gradckpt.enable(MLP, blocks=3), BlockError),  # type: ignore[arg-type]
    ("blocks=[3]", lambda: gradckpt.enable(MLP, blocks=[3]), BlockError),  # type: ignore[list-item]
    ("blocks=[]", lambda: gradckpt.enable(MLP, blocks=[]), BlockError),
    ("blocks=''", lambda: gradckpt.enable(MLP, blocks=""), BlockError),
    ("blocks=missing", lambda: gradckpt.enable(MLP, blocks=["nope"]), BlockError),
    ("blocks twice", lambda: gradckpt.enable(MLP, blocks=["blocks.0", "blocks.0"]), BlockError),
    ("blocks nested", lambda: gradckpt.enable(MLP, blocks=["blocks", "blocks.0"]), BlockError),
    ("blocks predicate none", lambda: gradckpt.enable(MLP, blocks=lambda n, m: False), BlockError),
    # Plan data
    ("Plan blocks=str", _plan(blocks="abc"), PlanError),
    ("Plan blocks=None", _plan(blocks=None), PlanError),
    ("Plan blocks=[1,2,3]", _plan(blocks=[1, 2, 3]), PlanError),
    ("Plan blocks twice", _plan(blocks=["a", "a", "b"]), PlanError),
    ("Plan decisions=None", _plan(decisions=None), PlanError),
    ("Plan decision maybe", _plan(decisions=["save", "maybe", "save"]), PlanError),
    ("Plan too few decisions", _plan(decisions=["save"]), PlanError),
    ("Plan segment (0,)", _plan(segments=[(0,)]), PlanError),
    ("Plan segments=str", _plan(segments="x"), PlanError),
    ("Plan segment of 1", _plan(decisions=["recompute"] * 3, segments=[(0, 1)]), PlanError),
    ("Plan segment past end", _plan(decisions=["recompute"] * 3, segments=[(1, 9)]), PlanError),
    ("Plan segment negative", _plan(decisions=["recompute"] * 3, segments=[(-1, 2)]), PlanError),
    ("Plan segment floats", _plan(decisions=["recompute"] * 3, segments=[(0.0, 2.0)]), PlanError),
    (
        "Plan segments overlap",
        _plan(decisions=["recompute"] * 3, segments=[(0, 2), (1, 3)]),
        PlanError,
    ),
    ("Plan segment over SAVE", _plan(segments=[(0, 2)]), PlanError),
    ("Plan options=list", _plan(options=[1]), PlanError),
    ("Plan notes=str", _plan(notes="x"), PlanError),
    ("Plan policy=3", _plan(policy=3), PlanError),
    ("Plan.decision missing", lambda: _plan()().decision("nope"), PlanError),
    ("from_json not JSON", lambda: Plan.from_json("{not json"), PlanError),
    ("from_json None", lambda: Plan.from_json(None), PlanError),  # type: ignore[arg-type]
    ("from_json bad bytes", lambda: Plan.from_json(b"\xff\xfe"), PlanError),  # type: ignore[arg-type]
    ("from_json list", lambda: Plan.from_json("[1, 2]"), PlanError),
    ("from_json empty object", lambda: Plan.from_json("{}"), PlanError),
    ("from_json version 99", lambda: Plan.from_json('{"version": 99, "blocks": []}'), PlanError),
    ("from_json blocks=str", lambda: Plan.from_json('{"blocks": "x"}'), PlanError),
    (
        "from_json entry without decision",
        lambda: Plan.from_json('{"blocks": [{"name": "a"}]}'),
        PlanError,
    ),
    ("from_json entry str", lambda: Plan.from_json('{"blocks": ["a"]}'), PlanError),
    ("from_json options list", lambda: Plan.from_json('{"blocks": [], "options": [1]}'), PlanError),
    (
        "from_json segments nested",
        lambda: Plan.from_json('{"blocks": [], "segments": [[[1]]]}'),
        PlanError,
    ),
    # policies, blocks, checkpoint, measure, units
    ("make_plan bogus", lambda: gradckpt.make_plan("bogus", NAMES), PolicyError),
    ("make_plan option", lambda: gradckpt.make_plan("sqrt", NAMES, foo=1), PolicyError),
    ("find_blocks(3)", lambda: gradckpt.find_blocks(3), BlockError),  # type: ignore[arg-type]
    ("find_blocks(Linear)", lambda: gradckpt.find_blocks(nn.Linear(2, 2)), BlockError),
    (
        "checkpoint reentrant",
        lambda: gradckpt.checkpoint(torch.sin, torch.ones(1), use_reentrant=True),
        GradCkptError,
    ),
    ("checkpoint(3)", lambda: gradckpt.checkpoint(3, torch.ones(1)), GradCkptError),  # type: ignore[arg-type]
    ("measure(3)", lambda: gradckpt.measure(3), GradCkptError),  # type: ignore[arg-type]
    ("measure device=tpu9", lambda: gradckpt.measure(lambda: None, device="tpu9"), GradCkptError),
    ("measure blocks=3", lambda: gradckpt.measure(lambda: None, blocks=3), GradCkptError),  # type: ignore[arg-type]
    ("measure model=str", lambda: gradckpt.measure(lambda: None, model="m"), GradCkptError),  # type: ignore[arg-type]
    ("parse_bytes ''", lambda: gradckpt.parse_bytes(""), BudgetError),
    ("parse_bytes -1", lambda: gradckpt.parse_bytes(-1), BudgetError),
    ("parse_bytes 0", lambda: gradckpt.parse_bytes(0), BudgetError),
    ("parse_bytes GiB", lambda: gradckpt.parse_bytes("GiB"), BudgetError),
    ("parse_bytes 1e3", lambda: gradckpt.parse_bytes("1e3"), BudgetError),
    ("parse_bytes 1.5.5GB", lambda: gradckpt.parse_bytes("1.5.5GB"), BudgetError),
    ("parse_bytes None", lambda: gradckpt.parse_bytes(None), BudgetError),  # type: ignore[arg-type]
    # bench models: unknown names, missing/malformed files, zero/negative/huge values
    ("model ''", lambda: build_bench_model(""), ConfigError),
    ("model 3", lambda: build_bench_model(3), ConfigError),  # type: ignore[arg-type]
    ("model unknown", lambda: build_bench_model("nosuch"), ConfigError),
    ("layers 0", lambda: build_bench_model("mlp", layers=0), ConfigError),
    ("layers -1", lambda: build_bench_model("mlp", layers=-1), ConfigError),
    ("layers '3'", lambda: build_bench_model("mlp", layers="3"), ConfigError),  # type: ignore[arg-type]
    ("layers 1.5", lambda: build_bench_model("mlp", layers=1.5), ConfigError),  # type: ignore[arg-type]
    ("layers True", lambda: build_bench_model("mlp", layers=True), ConfigError),
    ("layers 10**12", lambda: build_bench_model("mlp", layers=10**12), ConfigError),
    ("layers 1024 (32 GiB to train)", lambda: build_bench_model("mlp", layers=1024), ConfigError),
    ("dropout 1.0", lambda: build_bench_model("mlp", dropout=1.0), ConfigError),
    ("dropout -0.1", lambda: build_bench_model("mlp", dropout=-0.1), ConfigError),
    ("dropout '0.1'", lambda: build_bench_model("mlp", dropout="0.1"), ConfigError),  # type: ignore[arg-type]
    ("attn flash", lambda: build_bench_model("mlp", attn="flash"), ConfigError),
    ("seed 'x'", lambda: build_bench_model("mlp", seed="x"), ConfigError),  # type: ignore[arg-type]
    ("batch 0", lambda: make_batch(build_bench_model("mlp", layers=1), 0, 8), ConfigError),
    ("batch True", lambda: make_batch(build_bench_model("mlp", layers=1), True, 8), ConfigError),
    ("batch '2'", lambda: make_batch(build_bench_model("mlp", layers=1), "2", 8), ConfigError),  # type: ignore[arg-type]
    (
        "batch 10**12",
        lambda: make_batch(build_bench_model("mlp", layers=1), 10**12, 8),
        ConfigError,
    ),
    ("seq -1", lambda: make_batch(build_bench_model("mlp", layers=1), 1, -1), ConfigError),
    ("seq 1.5", lambda: make_batch(build_bench_model("mlp", layers=1), 1, 1.5), ConfigError),  # type: ignore[arg-type]
    # verify
    ("verify(None)", lambda: gradckpt.verify(None, {}), ConfigError),  # type: ignore[arg-type]
    ("verify example str", lambda: gradckpt.verify(MLP, "ids"), ConfigError),
    (
        "verify plan 3",
        lambda: gradckpt.verify(MLP, {"input_ids": torch.zeros(1, 2, dtype=torch.long)}, 3),
        ConfigError,
    ),  # type: ignore[arg-type]
    (
        "verify policy bogus",
        lambda: gradckpt.verify(MLP, {"input_ids": torch.zeros(1, 2, dtype=torch.long)}, "bogus"),
        PolicyError,
    ),
    (
        "verify atol -1",
        lambda: gradckpt.verify(MLP, (torch.zeros(1, 2, dtype=torch.long),), atol=-1),
        ConfigError,
    ),
    ("verify wrong example", lambda: gradckpt.verify(MLP, {"nope": torch.zeros(1)}), ConfigError),
]


def _estimate_cases() -> list[tuple[str, Callable[[], Any], type[GradCkptError]]]:
    if not hasattr(gradckpt, "estimate"):
        return []
    est = gradckpt.estimate
    return [
        ("estimate unknown", lambda: est("no-such-model"), ConfigError),
        ("estimate batch 0", lambda: est("llama-2-7b", batch=0), ConfigError),
        ("estimate seq -1", lambda: est("llama-2-7b", seq=-1), ConfigError),
        ("estimate method bogus", lambda: est("llama-2-7b", method="bogus"), GradCkptError),
        ("estimate missing file", lambda: est("/nonexistent/config.json"), ConfigError),
    ]


@pytest.mark.parametrize(
    ("what", "call", "error"),
    API_BAD + _estimate_cases(),
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_api_bad_input(what: str, call: Callable[[], Any], error: type[GradCkptError]) -> None:
    before = {k: v.clone() for k, v in MLP.state_dict().items()}
    with pytest.raises(error):
        call()
    gc.collect()
    assert gradckpt.applied_plan(MLP) is None
    assert all("forward" not in m.__dict__ for m in MLP.modules())
    assert all(torch.equal(v, before[k]) for k, v in MLP.state_dict().items())
    clean_state()


@pytest.mark.parametrize(
    "bad",
    [
        {"policy": "bogus"},
        {"policy": "every:0"},
        {"plan": Plan(("x",), ("recompute",))},
        {"blocks": ["nope"]},
        {"budget": "-1GiB"},
        {"policy": "full", "foo": 1},
    ],
    ids=str,
)
def test_refused_enable_keeps_the_installed_plan(bad: dict[str, Any]) -> None:
    model = MLPStack(layers=3, dim=8, vocab=16)
    plan = gradckpt.enable(model, "every:2")
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    with pytest.raises(GradCkptError):
        gradckpt.enable(model, **bad)
    assert gradckpt.applied_plan(model) is plan
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards


# -- 4. bad input: the CLI ------------------------------------------------------------------

S = ["--model", "mlp", "--layers", "2", "--batch", "1", "--seq", "8"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "bad.json").write_text("{not json")
    (d / "list.json").write_text("[1, 2]")
    (d / "arch.json").write_text('{"model_type": "no-such-architecture"}')
    (d / "notype.json").write_text('{"hidden_size": 8}')
    (d / "huge.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 10**9}))
    (d / "wide.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "hidden_size": 2**20,
                "intermediate_size": 2**20,
                "num_attention_heads": 8,
                "vocab_size": 64,
            }
        )
    )
    (d / "binary.json").write_bytes(b"\xff\xfe\x00")
    (d / "otherplan.json").write_text(Plan(("x",), ("recompute",)).to_json())
    (d / "badplan.json").write_text('{"blocks": [{"name": "blocks.0", "decision": "maybe"}]}')
    (d / "segplan.json").write_text(
        '{"blocks": [{"name": "blocks.0", "decision": "save"}], "segments": [[0, 5]]}'
    )
    (d / "dir").mkdir()
    return d


CLI_BAD = [
    # verify: models
    ["verify", "--model", "nosuch"],
    ["verify", "--model", "llamaa"],
    ["verify", "--model", ""],
    ["verify", "--model", "{f}/missing.json"],
    ["verify", "--model", "{f}/bad.json"],
    ["verify", "--model", "{f}/list.json"],
    ["verify", "--model", "{f}/arch.json"],
    ["verify", "--model", "{f}/notype.json"],
    ["verify", "--model", "{f}/huge.json"],
    ["verify", "--model", "{f}/wide.json"],
    ["verify", "--model", "{f}/binary.json"],
    ["verify", "--model", "{f}/dir"],
    # verify: sizes
    ["verify", *S, "--batch", "0"],
    ["verify", *S, "--batch", "-1"],
    ["verify", *S, "--batch", "abc"],
    ["verify", *S, "--batch", "1.5"],
    ["verify", *S, "--batch", "1000000000000"],
    ["verify", *S, "--seq", "0"],
    ["verify", *S, "--seq", "x"],
    ["verify", "--model", "llama", "--layers", "1", "--seq", "100000"],
    ["verify", *S, "--layers", "0"],
    ["verify", *S, "--layers", "-2"],
    ["verify", *S, "--layers", "1000000000"],
    ["verify", *S, "--layers", "many"],
    # verify: policies and plans
    ["verify", *S, "--policy", "bogus"],
    ["verify", *S, "--policy", ""],
    ["verify", *S, "--policy", "full,,sqrt"],
    ["verify", *S, "--policy", "every:0"],
    ["verify", *S, "--policy", "every:-1"],
    ["verify", *S, "--policy", "every:x"],
    ["verify", *S, "--policy", "sqrt:3"],
    ["verify", *S, "--plan", "{f}/missing.json"],
    ["verify", *S, "--plan", "{f}/bad.json"],
    ["verify", *S, "--plan", "{f}/list.json"],
    ["verify", *S, "--plan", "{f}/otherplan.json"],
    ["verify", *S, "--plan", "{f}/badplan.json"],
    ["verify", *S, "--plan", "{f}/segplan.json"],
    ["verify", *S, "--plan", "{f}/binary.json"],
    ["verify", *S, "--plan", "{f}/dir"],
    # verify: the rest
    ["verify", *S, "--atol", "-1"],
    ["verify", *S, "--atol", "abc"],
    ["verify", *S, "--rtol", "inf"],
    ["verify", *S, "--rtol", "nan"],
    ["verify", *S, "--seed", "x"],
    ["verify", *S, "--seed", "-1"],
    ["verify", *S, "--device", "tpu"],
    ["verify", *S, "--device", ""],
    ["verify", *S, "--json", "/nonexistent/dir/x.json"],
    ["verify", *S, "--json", "{f}/dir"],
    ["verify", *S, "--bogus-flag"],
    # bench
    ["bench", "--quiet", "--model", "nosuch"],
    ["bench", "--quiet", "--model", "{f}/bad.json"],
    ["bench", "--quiet", "--model", "{f}/missing.json"],
    ["bench", "--quiet", *S, "--batch", "0"],
    ["bench", "--quiet", *S, "--seq", "-1"],
    ["bench", "--quiet", *S, "--layers", "1000000000"],
    ["bench", "--quiet", *S, "--batch", "1000000000000"],
    ["bench", "--quiet", *S, "--policies", "bogus"],
    ["bench", "--quiet", *S, "--policies", ""],
    ["bench", "--quiet", *S, "--policies", "every:0"],
    ["bench", "--quiet", *S, "--repeats", "0"],
    ["bench", "--quiet", *S, "--warmup", "-1"],
    ["bench", "--quiet", *S, "--device", "tpu"],
    ["bench", "--quiet", *S, "--json", "/nonexistent/x.json"],
    ["bench", "--quiet", *S, "--plot", "/nonexistent/p.png"],
    ["bench", "--quiet", *S, "--budgets", "abc"],
    # plan
    ["plan"],
    ["plan", "nosuch-model"],
    ["plan", "{f}/missing.json"],
    ["plan", "{f}/bad.json"],
    ["plan", "llama-2-7b", "--batch", "0"],
    ["plan", "llama-2-7b", "--seq", "-1"],
    ["plan", "llama-2-7b", "--seq", "abc"],
    ["plan", "llama-2-7b", "--policy", "bogus"],
    ["plan", "llama-2-7b", "--gpu", "nosuchgpu"],
    ["plan", "llama-2-7b", "--grad-accum", "0"],
    ["plan", "llama-2-7b", "--lora-rank", "0"],
    ["plan", "llama-2-7b", "--lora-dropout", "2"],
    ["plan", "llama-2-7b", "--overhead", "abc"],
    ["plan", "llama-2-7b", "--method", "bogus"],
    # top level
    ["bogus-command"],
    ["--bogus"],
]


def _commands() -> set[str]:
    from gradckpt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize("argv", CLI_BAD, ids=lambda a: " ".join(a).replace("{f}/", ""))
def test_cli_bad_input_exits_2_with_one_line(
    argv: list[str], files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] in ("bench", "plan", "verify") and argv[0] not in _commands():
        pytest.skip(f"no {argv[0]} command")
    argv = [a.replace("{f}", str(files)) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, (rc, captured.err)
    assert len(lines) == 1 and "error" in lines[0], captured.err
    assert "Traceback" not in captured.err


def test_cli_without_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: gradckpt" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "--model", "nosuch"],
        ["verify", *S, "--plan", "{f}/bad.json"],
        ["bench", "--quiet", "--model", "{f}/missing.json"],
    ],
    ids=["unknown-model", "malformed-plan", "missing-config"],
)
def test_cli_bad_input_in_a_real_process(argv: list[str], files: Path) -> None:
    """The installed entry point, as users run it: exit 2, one line, no traceback."""
    argv = [a.replace("{f}", str(files)) for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "gradckpt.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bad_input_counts() -> None:
    n_api = len(API_BAD) + len(_estimate_cases())
    print(f"\nbad inputs: {n_api} API calls, {len(CLI_BAD) + 4} CLI invocations")
    assert n_api >= 100 and len(CLI_BAD) >= 70


def test_failing_forward_context_leaves_no_hooks() -> None:
    """A caller's context_fn whose forward context fails to enter: nothing stays pushed."""

    class Broken(contextlib.AbstractContextManager[None]):
        def __enter__(self) -> None:
            raise Boom("context failed to enter")

        def __exit__(self, *exc: Any) -> None:
            return None

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(Boom):
        gradckpt.checkpoint(torch.sin, x, context_fn=lambda: (Broken(), contextlib.nullcontext()))
    clean_state()
    gradckpt.checkpoint(torch.sin, x).sum().backward()
    assert torch.equal(x.grad, torch.cos(x.detach()))
