"""The behaviours PyTorch's own checkpoint tests check, routed to ``gradckpt.checkpoint``.

Torch tests its non-reentrant checkpoint in test/test_utils.py (``TestCheckpoint``), the checkpoint
tests of test/test_autograd.py (``TestNestedCheckpoint``, selective checkpointing) and
test/distributed/_composable/test_checkpoint.py. ``gradckpt.checkpoint`` claims to be a drop-in
for it, so each behaviour those suites cover has a test here (written for gradckpt, not copied):
non-tensor inputs and outputs, saved tensors accessed twice, nested checkpoints, early stop on
and off, retain_graph, double backward, several ``autograd.grad`` calls, RNG (dropout masks),
device and autocast contexts, the determinism check, debug mode and selective-checkpoint
policies through ``context_fn``. Gradients are compared bit for bit with a run without
checkpointing. Each test takes milliseconds.

Run: PYTHONPATH=src .venv/bin/python -m pytest -q -p no:xdist tests/test_checkpoint_torch_suite.py
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as tuc
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradckpt

ck = gradckpt.checkpoint


def _leaves(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, requires_grad=True) for s in shapes]


def _grads(ts: list[torch.Tensor]) -> list[torch.Tensor | None]:
    out = [None if t.grad is None else t.grad.clone() for t in ts]
    for t in ts:
        t.grad = None
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _chain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w).sin() * x


class _Counter:
    """A function that counts its calls (forward once, recompute once more)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *a: Any, **kw: Any) -> Any:
        self.calls += 1
        return self.fn(*a, **kw)


class _OpLog(TorchDispatchMode):
    """Counts aten ops by overload packet (to see what a recompute re-ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[Any, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        key = func.overloadpacket
        self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


# -- 1. recompute happens, once ------------------------------------------------------------


def test_forward_runs_once_and_backward_recomputes_once() -> None:
    x, w = _leaves((3, 4), (4, 4))
    f = _Counter(_chain)
    out = ck(f, x, w)
    assert f.calls == 1
    out.sum().backward()  # several ops read saved tensors: still one recompute
    assert f.calls == 2


def test_no_grad_runs_the_function_without_recompute() -> None:
    x, w = _leaves((3, 4), (4, 4))
    f = _Counter(_chain)
    with torch.no_grad():
        out = ck(f, x, w)
    assert f.calls == 1 and not out.requires_grad


# -- 2. gradients as without checkpointing ------------------------------------------------------


def test_sequential_model_grads_equal() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU())
    x = torch.randn(2, 10, requires_grad=True)
    params = [*model.parameters(), x]
    model(x).sum().backward()
    ref = _grads(params)
    ck(model[2:], ck(model[:2], x)).sum().backward()
    assert _same(ref, _grads(params))


def test_input_without_grad_gives_parameter_grads() -> None:
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    lin(x).sum().backward()
    ref = _grads(list(lin.parameters()))
    ck(lin, x).sum().backward()
    assert _same(ref, _grads(list(lin.parameters())))


def test_multiple_outputs_one_unused_and_multi_input_modules() -> None:
    x, w1, w2 = _leaves((3, 4), (4, 4), (4, 4))

    def two(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.relu(x @ w1) @ w2
        return z.sin(), z.cos()

    def combine(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (pair[0] + pair[1]) @ w1

    combine(two(x)).sum().backward()
    ref = _grads([x, w1, w2])
    combine(ck(two, x)).sum().backward()
    assert _same(ref, _grads([x, w1, w2]))
    ck(combine, list(ck(two, x))).sum().backward()  # a list of tensors as the one input
    assert _same(ref, _grads([x, w1, w2]))
    two(x)[0].sum().backward()  # the second output never used
    ref = _grads([x, w1, w2])
    ck(two, x)[0].sum().backward()
    assert _same(ref, _grads([x, w1, w2]))


# -- 3. non-tensor inputs and outputs ----------------------------------------------------------


def _mixed(t1: torch.Tensor, t2: torch.Tensor, scale: int, t3: torch.Tensor) -> tuple:
    t4 = t1 + t2 * t3
    t5 = t1 * t2 + t3
    t4 = t4 * scale
    t5 = t5 * scale
    return scale, t4, None, True, t5, "bar", t1


def test_non_tensor_inputs_and_outputs() -> None:
    t1, t2 = _leaves((5,), (5,))
    t3 = torch.rand(5)
    res = ck(_mixed, t1, t2, 3, t3)
    ref = _mixed(t1, t2, 3, t3)
    assert res[0] == 3 and res[2] is None and res[3] is True and res[5] == "bar"
    assert all(torch.equal(res[i], ref[i]) for i in (1, 4, 6))
    res[1].sum().backward(retain_graph=True)
    res[4].sum().backward(retain_graph=True)
    res[6].sum().backward()
    got = _grads([t1, t2])
    torch.autograd.backward([ref[1].sum(), ref[4].sum(), ref[6].sum()])
    assert _same(got, _grads([t1, t2]))


def test_second_backward_without_retain_graph_is_refused_as_in_torch() -> None:
    t1, t2 = _leaves((5,), (5,))
    res = ck(_mixed, t1, t2, 2, torch.rand(5))
    res[1].sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        res[1].sum().backward()


def test_none_argument_and_no_tensors_at_all() -> None:
    (x,) = _leaves((1, 6))
    out = ck(lambda a, b: a if b is None else a + b, x, None)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    res = ck(_mixed, 0.5, 0.25, 2, 4.0)  # plain Python numbers: nothing to save
    assert res[1] == (0.5 + 0.25 * 4.0) * 2 and res[6] == 0.5


def test_partial_grad_input_not_requiring_grad() -> None:
    (x,) = _leaves((1, 4))
    other = torch.randn(1, 4)
    out = ck(lambda a, b: (a * 2, b), x, other)
    assert out[1] is other or torch.equal(out[1], other)
    out[0].sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_dict_and_list_outputs_and_keyword_tensors() -> None:
    x, w, b = _leaves((3, 4), (4, 4), (4,))

    def f(x: torch.Tensor, *, w: torch.Tensor, bias: torch.Tensor, tag: str) -> dict:
        y = torch.tanh(x @ w + bias)
        return {"y": [y, y.exp()], "tag": tag}

    out = f(x, w=w, bias=b, tag="t")
    (out["y"][0].sum() + out["y"][1].sum()).backward()
    ref = _grads([x, w, b])
    out = ck(f, x, w=w, bias=b, tag="t")
    assert out["tag"] == "t"
    (out["y"][0].sum() + out["y"][1].sum()).backward()
    assert _same(ref, _grads([x, w, b]))


def test_unknown_keywords_reach_the_function_even_stateful() -> None:
    # torch passes every keyword it does not own to the function; a function with its own
    # `stateful=` must get it (gradckpt's own option is called stateful_modules).
    (x,) = _leaves((3,))

    def f(t: torch.Tensor, *, stateful: bool, scale: float) -> torch.Tensor:
        return t.sin() * scale if stateful else t

    out = ck(f, x, stateful=True, scale=2.0)
    out.sum().backward()
    assert torch.equal(x.grad, x.detach().cos() * 2.0)


# -- 4. saved tensors accessed twice; custom Functions ----------------------------------------


class _SaveTwice(torch.autograd.Function):
    """Saves the same tensor twice; reads ``ctx.saved_tensors`` ``reads`` times in backward."""

    reads = 1

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        for _ in range(_SaveTwice.reads):
            a, b = ctx.saved_tensors
        return g * (a + b)


def test_custom_function_saving_one_tensor_twice() -> None:
    (x,) = _leaves((4,))
    f = _Counter(lambda t: _SaveTwice.apply(t.sin()))
    ck(f, x).sum().backward()
    assert f.calls == 2
    assert torch.equal(x.grad, x.detach().cos() * (x.detach().sin() + x.detach().sin()))


def test_reading_ctx_saved_tensors_twice_is_torchs_error(monkeypatch: Any) -> None:
    # torch allows one read of ctx.saved_tensors per backward inside a checkpoint and says so;
    # that error must come through as torch's, not as a "not deterministic" mismatch.
    monkeypatch.setattr(_SaveTwice, "reads", 2)
    (x,) = _leaves((4,))
    out = ck(lambda t: _SaveTwice.apply(t.sin()), x)
    with pytest.raises(tuc.CheckpointError, match="already unpacked once"):
        out.sum().backward()


def test_saved_tensor_unpacked_twice_by_hand() -> None:
    (x,) = _leaves((4,))
    y = ck(lambda t: t.sin().exp(), x)
    node = y.grad_fn
    a = node._saved_result  # exp saves its result: unpacking it triggers the recompute
    b = node._saved_result
    assert torch.equal(a, b) and torch.equal(a, x.detach().sin().exp())
    y.sum().backward()
    assert torch.equal(x.grad, x.detach().cos() * x.detach().sin().exp())


def test_same_tensor_saved_by_two_ops() -> None:
    (x,) = _leaves((5,))

    def f(t: torch.Tensor) -> torch.Tensor:
        u = t.sin()
        return u * u + u.pow(3)  # u is saved by mul (twice) and by pow

    f(x).sum().backward()
    ref = _grads([x])
    ck(f, x).sum().backward()
    assert _same(ref, _grads([x]))


# -- 5. retain_graph, several autograd.grad calls, double backward --------------------------


def test_retain_graph_backward_twice() -> None:
    x, w = _leaves((3, 4), (4, 4))
    f = _Counter(_chain)
    loss = _chain(x, w).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    ref = _grads([x, w])
    loss = ck(f, x, w).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    assert _same(ref, _grads([x, w]))
    assert f.calls == 3  # one recompute per backward


def test_several_autograd_grad_calls_on_one_graph() -> None:
    x, w = _leaves((3, 4), (4, 4))
    out = ck(_chain, x, w)
    gx = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    gw = torch.autograd.grad(out.sum(), w, retain_graph=True)[0]
    both = torch.autograd.grad(out.sum(), (x, w))
    ref = _chain(x, w)
    rx, rw = torch.autograd.grad(ref.sum(), (x, w))
    assert _same([gx, gw, *both], [rx, rw, rx, rw])


def test_grad_with_create_graph_matches() -> None:
    x, w = _leaves((3, 4), (4, 4))
    ones = torch.ones(3, 4)
    ref = torch.autograd.grad(_chain(x, w), (x,), ones, create_graph=True)
    got = torch.autograd.grad(ck(_chain, x, w), (x,), ones, create_graph=True)
    assert _same(ref, got) and got[0].requires_grad


def test_double_backward_gradient_penalty() -> None:
    x, w = _leaves((3, 4), (4, 4))

    def step(fn: Callable[..., torch.Tensor]) -> list[torch.Tensor | None]:
        out = fn(x, w)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        (out.sum() + gx.pow(2).sum()).backward()
        return _grads([x, w])

    assert _same(step(_chain), step(lambda a, b: ck(_chain, a, b)))


def test_grad_of_grad_of_checkpointed_input() -> None:
    (x,) = _leaves((4,))
    f = lambda t: t.pow(3).sin()  # noqa: E731
    (g,) = torch.autograd.grad(ck(f, x).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    (rg,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    (rgg,) = torch.autograd.grad(rg.sum(), x)
    assert torch.equal(g, rg) and torch.equal(gg, rgg)


# -- 6. nested checkpoints -----------------------------------------------------------------


def _inner(t: torch.Tensor) -> torch.Tensor:
    return t.sin().exp()


def _outer(t: torch.Tensor) -> torch.Tensor:
    return ck(_inner, t.cos()).sin() * t


def test_nested_checkpoint_grads_equal() -> None:
    (x,) = _leaves((4,))
    plain = lambda t: _inner(t.cos()).sin() * t  # noqa: E731
    plain(x).sum().backward()
    ref = _grads([x])
    ck(_outer, x).sum().backward()
    assert _same(ref, _grads([x]))
    ck(lambda t: ck(_outer, t), x).sum().backward()  # three levels
    assert _same(ref, _grads([x]))


def test_nested_checkpoint_two_children_and_non_tensors() -> None:
    (x,) = _leaves((4,))

    def parent(t: torch.Tensor, k: int) -> tuple[torch.Tensor, str]:
        a = ck(_inner, t)
        b = ck(lambda u, *, s: (u * s).cos(), t, s=k)
        return a * b, "ok"

    def plain(t: torch.Tensor, k: int) -> torch.Tensor:
        return _inner(t) * (t * k).cos()

    plain(x, 3).sum().backward()
    ref = _grads([x])
    out, tag = ck(parent, x, 3)
    assert tag == "ok"
    out.sum().backward()
    assert _same(ref, _grads([x]))


def test_nested_checkpoint_retain_graph_autograd_grad_and_double_backward() -> None:
    (x,) = _leaves((4,))
    plain = lambda t: _inner(t.cos()).sin() * t  # noqa: E731
    (ref1,) = torch.autograd.grad(plain(x).sum(), x, create_graph=True)
    (ref2,) = torch.autograd.grad(ref1.sum(), x)
    loss = ck(_outer, x).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.equal(x.grad, 2 * ref1.detach())
    x.grad = None
    (g1,) = torch.autograd.grad(ck(_outer, x).sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), x)
    assert torch.equal(g1, ref1) and torch.equal(g2, ref2)


@pytest.mark.parametrize("early_stop", [True, False])
def test_nested_checkpoint_under_set_early_stop(early_stop: bool) -> None:
    (x,) = _leaves((4,))
    outer, inner = _Counter(lambda t: ck(inner, t.cos()).sin() * t), _Counter(_inner)
    with tuc.set_checkpoint_early_stop(early_stop):
        out = ck(outer, x)
        out.sum().backward()
    assert torch.equal(x.grad, _grads_plain(x))
    assert outer.calls == 2 and inner.calls >= 3  # the inner region is recomputed too


def _grads_plain(x: torch.Tensor) -> torch.Tensor:
    x2 = x.detach().requires_grad_()
    (_inner(x2.cos()).sin() * x2).sum().backward()
    return x2.grad  # type: ignore[return-value]


# -- 7. early stop on and off ----------------------------------------------------------------


@pytest.mark.parametrize("early_stop", [True, False])
def test_early_stop_stops_after_the_last_saved_tensor(early_stop: bool) -> None:
    (x,) = _leaves((4,))
    tail = []

    def f(t: torch.Tensor) -> torch.Tensor:
        y = t.sin() * t  # saves t and sin(t)
        tail.append(1)  # nothing after this point saves a tensor for backward
        return y + 1

    ck(f, x, early_stop=early_stop).sum().backward()
    assert len(tail) == (1 if early_stop else 2)
    assert torch.equal(x.grad, x.detach().cos() * x.detach() + x.detach().sin())


def test_set_checkpoint_early_stop_overrides_the_argument() -> None:
    (x,) = _leaves((4,))
    tail = []

    def f(t: torch.Tensor) -> torch.Tensor:
        y = t.exp()
        tail.append(1)
        return y * 2

    with tuc.set_checkpoint_early_stop(False):
        out = ck(f, x, early_stop=True)
    out.sum().backward()
    assert len(tail) == 2


# -- 8. RNG: dropout masks ------------------------------------------------------------------


def test_dropout_between_and_inside_checkpoints_matches() -> None:
    (x,) = _leaves((2000,))
    d1, d2 = nn.Dropout(), nn.Dropout()
    torch.manual_seed(5)
    d2(d1(x)).sum().backward()
    ref = _grads([x])
    torch.manual_seed(5)
    ck(d2, d1(x)).sum().backward()
    assert _same(ref, _grads([x]))


def test_rng_state_after_checkpoint_and_backward_is_as_without() -> None:
    (x,) = _leaves((64,))
    torch.manual_seed(2)
    F.dropout(x, 0.3).sum().backward()
    expected = torch.rand(3)
    torch.manual_seed(2)
    ck(lambda t: F.dropout(t, 0.3), x).sum().backward()
    assert torch.equal(torch.rand(3), expected)


def test_preserve_rng_state_false_runs() -> None:
    (x,) = _leaves((64,))
    out = ck(lambda t: F.dropout(t, 0.5), x, preserve_rng_state=False)
    out.sum().backward()  # the masks may differ; it must run (torch's test says the same)
    assert x.grad is not None


def test_random_tensor_created_inside_is_replayed() -> None:
    p = torch.randn(6, 6, requires_grad=True)
    x = torch.randn(3, 6, requires_grad=True)

    def f(t: torch.Tensor) -> torch.Tensor:
        return t @ (p @ torch.randn(6, 6))

    torch.manual_seed(9)
    f(x).sum().backward()
    ref = _grads([p, x])
    torch.manual_seed(9)
    ck(f, x).sum().backward()
    assert _same(ref, _grads([p, x]))


# -- 9. device and autocast contexts -------------------------------------------------------


def test_device_context_is_kept_in_recompute() -> None:
    seen: list[torch.device] = []
    (x,) = _leaves((4,))

    def f(t: torch.Tensor) -> torch.Tensor:
        seen.append(torch.empty(2).device)  # follows the torch.device context
        return t.sin()

    with torch.device("meta"):
        out = ck(f, x)
    out.sum().backward()  # recompute outside the with block
    assert [d.type for d in seen] == ["meta", "meta"]


def test_autocast_in_forward_is_replayed_outside_it() -> None:
    x, w = _leaves((4, 8), (8, 8))
    dtypes: list[torch.dtype] = []

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = a @ b
        dtypes.append(h.dtype)
        return h.float().tanh()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        f(x, w).sum().backward()
    ref = _grads([x, w])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ck(f, x, w)
    out.sum().backward()
    assert dtypes == [torch.bfloat16] * 3
    assert _same(ref, _grads([x, w]))


def test_autocast_disabled_inside_enabled_outside() -> None:
    x, w = _leaves((4, 8), (8, 8))
    dtypes: list[torch.dtype] = []

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = a @ b
        dtypes.append(h.dtype)
        return h.tanh()

    out = ck(f, x, w)  # no autocast in forward...
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.sum().backward()  # ...so none in the recompute either
    assert dtypes == [torch.float32, torch.float32]


# -- 10. determinism check and debug mode -----------------------------------------------------


def _shape_changes_in_recompute() -> Callable[[torch.Tensor], torch.Tensor]:
    calls = [0]

    def f(t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        n = 4 if calls[0] == 1 else 3
        return t[:n].sin()

    return f


def test_determinism_check_catches_a_changed_recompute() -> None:
    (x,) = _leaves((4,))
    out = ck(_shape_changes_in_recompute(), x)
    with pytest.raises(gradckpt.CheckpointMismatchError, match="did not reproduce"):
        out.sum().backward()
    # callers catching torch's CheckpointError base (RuntimeError) still catch it
    assert issubclass(gradckpt.CheckpointMismatchError, RuntimeError)


def test_determinism_check_none_turns_it_off() -> None:
    (x,) = _leaves((4,))
    out = ck(_shape_changes_in_recompute(), x, determinism_check="none")
    with pytest.raises(RuntimeError) as info:  # the shapes then fail inside autograd itself
        out.sum().backward()
    assert not isinstance(info.value, gradckpt.CheckpointMismatchError)


def test_unknown_determinism_check_is_refused() -> None:
    with pytest.raises(ValueError, match="determinism_check"):
        ck(torch.sin, torch.randn(2, requires_grad=True), determinism_check="bitwise")


def test_debug_mode_error_lists_the_ops_of_both_runs() -> None:
    (x,) = _leaves((4,))
    out = ck(_shape_changes_in_recompute(), x, debug=True)
    with pytest.raises(tuc.CheckpointError, match="(?s)original forward.*recomputation"):
        out.sum().backward()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def test_debug_mode_with_context_fn_is_refused() -> None:
    with pytest.raises(ValueError, match="debug=True"):  # torch raises ValueError too
        ck(torch.sin, torch.randn(2), debug=True, context_fn=lambda: (_Null(), _Null()))


def test_error_in_forward_leaves_no_hooks_behind() -> None:
    (x,) = _leaves((4,))

    def boom(t: torch.Tensor) -> torch.Tensor:
        t.sin()
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        ck(boom, x)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    (x * x).sum().backward()  # an ordinary graph afterwards works
    assert torch.equal(x.grad, 2 * x.detach())


# -- 11. selective-checkpoint policies through context_fn ---------------------------------


def _sac(policy: Any) -> Callable[[], Any]:
    return functools.partial(tuc.create_selective_checkpoint_contexts, policy)


def _mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (torch.relu(x @ w1) @ w2).sin()


def _recomputed_ops(context_fn: Callable[[], Any] | None, retain: bool = False) -> dict:
    x, w1, w2 = _leaves((4, 6), (6, 6), (6, 6))
    _mlp(x, w1, w2).sum().backward()
    ref = _grads([x, w1, w2])
    kw = {} if context_fn is None else {"context_fn": context_fn}
    out = ck(_mlp, x, w1, w2, **kw)
    log = _OpLog()
    with log:
        if retain:
            out.sum().backward(retain_graph=True)
            _grads([x, w1, w2])
        out.sum().backward()
    assert _same(ref, _grads([x, w1, w2]))
    return log.counts


def test_sac_ops_list_keeps_matmuls() -> None:
    aten = torch.ops.aten
    plain = _recomputed_ops(None)
    kept = _recomputed_ops(_sac([aten.mm.default]))
    # backward itself runs 4 mm (2 per matmul); the plain recompute 2 more; SAC none
    assert plain[aten.mm] == 6 and kept[aten.mm] == 4
    assert kept.get(aten.relu, 0) == plain.get(aten.relu, 0) >= 1  # relu still recomputed


def test_sac_policy_function_and_must_recompute() -> None:
    aten = torch.ops.aten

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> tuc.CheckpointPolicy:
        if op == aten.mm.default:
            return tuc.CheckpointPolicy.MUST_SAVE
        return tuc.CheckpointPolicy.MUST_RECOMPUTE

    assert _recomputed_ops(_sac(policy))[aten.mm] == 4


def test_sac_with_retain_graph_refuses_the_second_backward_as_torch() -> None:
    # torch's selective contexts hand each kept output out once (freeing it) and refuse a
    # second backward through the region; through gradckpt.checkpoint that stays torch's rule
    # (policy='selective' handles it: tests/test_checkpoint.py).
    with pytest.raises(RuntimeError, match="backward an extra time"):
        _recomputed_ops(_sac([torch.ops.aten.mm.default]), retain=True)


def test_sac_mutating_a_saved_output_is_refused() -> None:
    aten = torch.ops.aten
    x, w = _leaves((3, 3), (3, 3))

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = a @ b
        h.mul_(2)  # modifies the kept mm output
        return h.sin()

    out = ck(f, x, w, context_fn=_sac([aten.mm.default]))
    with pytest.raises(RuntimeError, match="mutated"):
        out.sum().backward()


def test_context_fn_contexts_are_entered_around_forward_and_recompute() -> None:
    events: list[str] = []

    class Tag:
        def __init__(self, name: str) -> None:
            self.name = name

        def __enter__(self) -> None:
            events.append(f"enter {self.name}")

        def __exit__(self, *exc: Any) -> None:
            events.append(f"exit {self.name}")

    (x,) = _leaves((3,))
    out = ck(lambda t: t.sin(), x, context_fn=lambda: (Tag("fwd"), Tag("rec")))
    out.sum().backward()
    assert events == ["enter fwd", "exit fwd", "enter rec", "exit rec"]


# -- 12. what gradckpt adds on top --------------------------------------------------------


def test_reentrant_is_refused() -> None:
    with pytest.raises(gradckpt.GradCkptError, match="reentrant"):
        ck(torch.sin, torch.randn(2), use_reentrant=True)


def test_batchnorm_statistics_updated_once() -> None:
    bn = nn.BatchNorm1d(3)
    ref = nn.BatchNorm1d(3)
    x = torch.randn(6, 3, requires_grad=True)
    ck(bn, x).sum().backward()
    ref(x)
    assert int(bn.num_batches_tracked) == 1 and torch.equal(bn.running_mean, ref.running_mean)
