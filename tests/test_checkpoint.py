"""gradckpt.checkpoint is a drop-in for torch.utils.checkpoint.checkpoint (non-reentrant only).

Run: .venv/bin/python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradckpt
from gradckpt.state import is_recomputing


def _f(
    x: torch.Tensor, w: torch.Tensor, *, scale: float, bias: torch.Tensor | None = None
) -> tuple:
    y = F.dropout(torch.tanh(x @ w), p=0.5, training=True) * scale
    if bias is not None:
        y = y + bias
    return y, "tag", {"norm": y.norm()}


def test_kwargs_non_tensor_args_and_outputs_and_dropout_rng() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)

    def run(use_ckpt: bool) -> list:
        for t in (x, w, bias):
            t.grad = None
        torch.manual_seed(1)
        if use_ckpt:
            y, tag, extra = gradckpt.checkpoint(_f, x, w, scale=2.0, bias=bias)
        else:
            y, tag, extra = _f(x, w, scale=2.0, bias=bias)
        assert tag == "tag"
        (y.sum() + extra["norm"]).backward()
        return [x.grad.clone(), w.grad.clone(), bias.grad.clone(), y.detach()]

    ref, got = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    # the dropout mask was drawn from the same RNG state both times (else grads would differ)
    assert (ref[3] - bias.detach() == 0).any()


def test_rng_state_after_checkpoint_is_as_without() -> None:
    x = torch.randn(4, 4, requires_grad=True)
    torch.manual_seed(3)
    F.dropout(x, 0.5).sum().backward()
    expected = torch.rand(1)
    torch.manual_seed(3)
    gradckpt.checkpoint(lambda t: F.dropout(t, 0.5), x).sum().backward()
    assert torch.equal(torch.rand(1), expected)


def test_autocast_state_is_kept_in_recompute() -> None:
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = lin(x)
        ref.float().sum().backward()
    g_ref = lin.weight.grad.clone()
    lin.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gradckpt.checkpoint(lin, x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()  # recompute runs outside the autocast block: state was captured
    assert torch.equal(lin.weight.grad, g_ref)


def test_reentrant_is_refused_with_reason() -> None:
    with pytest.raises(gradckpt.GradCkptError, match="reentrant"):
        gradckpt.checkpoint(torch.sin, torch.randn(2), use_reentrant=True)


def test_input_without_grad_still_gives_parameter_grads() -> None:
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4)  # requires_grad=False: the reentrant variant would give no grads
    gradckpt.checkpoint(lin, x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_module_batchnorm_updated_once() -> None:
    bn = nn.BatchNorm1d(4)
    x = torch.randn(8, 4, requires_grad=True)
    gradckpt.checkpoint(bn, x).sum().backward()
    assert int(bn.num_batches_tracked) == 1
    ref = nn.BatchNorm1d(4)
    ref(x)
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)


def test_recompute_flag_is_visible_only_during_recompute() -> None:
    seen = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        seen.append(is_recomputing())
        return t.sin()

    x = torch.randn(3, requires_grad=True)
    gradckpt.checkpoint(fn, x).sum().backward()
    assert seen == [False, True]


def test_stateful_modules_keyword_and_the_deprecated_stateful() -> None:
    bn = nn.BatchNorm1d(4)
    x = torch.randn(8, 4, requires_grad=True)

    def fn(t: torch.Tensor) -> torch.Tensor:  # a plain function: gradckpt cannot see bn
        return bn(t).sin()

    gradckpt.checkpoint(fn, x, stateful_modules=[bn]).sum().backward()
    assert int(bn.num_batches_tracked) == 1
    # the old name still works where fn cannot take it, and says it is deprecated
    with pytest.warns(DeprecationWarning, match="stateful_modules"):
        gradckpt.checkpoint(fn, x, stateful=[bn]).sum().backward()
    assert int(bn.num_batches_tracked) == 2
    with pytest.raises(gradckpt.ConfigError, match="both stateful= and stateful_modules="):
        gradckpt.checkpoint(fn, x, stateful=[bn], stateful_modules=[bn])


def test_a_function_with_its_own_stateful_keyword_gets_it() -> None:
    x = torch.randn(3, requires_grad=True)
    seen = []

    def fn(t: torch.Tensor, stateful: bool = False) -> torch.Tensor:
        seen.append(stateful)
        return t.sin()

    gradckpt.checkpoint(fn, x, stateful=True).sum().backward()
    assert seen == [True, True]  # forward and recompute
