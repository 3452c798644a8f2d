"""One rule for calling a model and finding its loss, shared by plan, verify and bench.

Run: .venv/bin/python -m pytest tests/test_model_io.py -q
"""

from __future__ import annotations

import pytest
import torch

import gradckpt
from gradckpt import _model_io
from gradckpt.planner import api as planner_api
from gradckpt.verify import default_loss as verify_loss


def test_default_loss_sums_every_output_that_requires_grad() -> None:
    # issue 12: the planner differentiated 2.0 (the first element) and verify 8.0 for this output
    x = torch.ones(2, requires_grad=True)
    y = torch.full((3,), 2.0, requires_grad=True)
    assert float(_model_io.default_loss((x, y)).detach()) == 8.0
    assert float(_model_io.default_loss({"a": x, "b": [y], "c": torch.ones(4)}).detach()) == 8.0


def test_plan_and_verify_use_the_same_default_loss() -> None:
    assert planner_api.default_loss is _model_io.default_loss
    assert verify_loss is _model_io.default_loss


def test_planner_profiles_the_gradient_of_every_output() -> None:
    # A model with two outputs: only the second branch's block gets a gradient under a
    # first-element loss; under the shared rule both blocks are on the path to the loss.
    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.detach() * 1.0, self.layers[1](self.layers[0](x))

    model = Two()
    x = torch.randn(4, 8, requires_grad=True)
    plan = gradckpt.plan(model, "1GiB", example=(x,))
    assert plan.policy == "auto" and len(plan.blocks) == 2


def test_loss_attribute_wins_and_no_grad_output_is_refused() -> None:
    class Out:
        loss = torch.tensor(3.0, requires_grad=True)

    assert float(_model_io.default_loss(Out()).detach()) == 3.0
    with pytest.raises(gradckpt.ConfigError, match="no loss and no tensor that requires grad"):
        _model_io.default_loss((torch.ones(2),))


def test_batch_of_and_call_model() -> None:
    m = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    assert _model_io.batch_of({"x": x}) == 5 and _model_io.batch_of((x,)) == 5
    assert _model_io.batch_of(torch.tensor(1.0)) == 0
    assert torch.equal(_model_io.call_model(m, {"input": x}), m(x))
    assert torch.equal(_model_io.call_model(m, (x,)), _model_io.call_model(m, x))
