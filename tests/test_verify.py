"""gradckpt.verify and `gradckpt verify`: exact comparison of a step with and without a plan.

Checks that verify passes every policy on models with dropout and BatchNorm, leaves the model,
its buffers, gradients and the RNG as it found them, and catches each way a plan can go wrong:
no gradient for trainable parameters (the reentrant-checkpoint bug), BatchNorm statistics
updated twice, values that differ without any shape change, a recompute mismatch error.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_verify.py -q
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.utils.checkpoint as tuc
from torch import nn

import gradckpt
from gradckpt import Decision, Plan
from gradckpt.bench.models import MLPStack
from gradckpt.cli import main
from gradckpt.errors import ConfigError, GradCkptError, PolicyError
from gradckpt.runtime.decisions import WRAPPERS
from gradckpt.state import is_recomputing
from gradckpt.verify import VerifyReport, format_diff

SMALL = ["--model", "mlp", "--layers", "2", "--batch", "1", "--seq", "8"]


class Block(nn.Module):
    def __init__(self, dim: int = 8, p: float = 0.3) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.bn(self.lin(x).transpose(1, 2)).transpose(1, 2)
        return x + self.drop(torch.tanh(h)) * scale


class Net(nn.Module):
    """Embedding, 4 blocks with BatchNorm and dropout, head; returns a loss like HF models."""

    def __init__(self, n: int = 4, dim: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim) for _ in range(n)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, scale: float = 1.0) -> Any:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h, scale=scale)
        logits = self.head(h)
        return {
            "loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()),
            "logits": logits,
        }


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().train()


def example() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    return {"ids": ids, "labels": ids.roll(1, dims=1), "scale": 0.5}


def all_policies() -> list[str]:
    out = []
    for usage in gradckpt.policy_names(exact=True):
        name, _, arg = usage.partition(":")
        if not arg:
            out.append(name)
        elif arg == "K":
            out += [f"{name}:2", f"{name}:3"]
    return out


@pytest.mark.parametrize("policy", all_policies())
def test_every_policy_passes_bit_exact(policy: str) -> None:
    model = net()
    report = gradckpt.verify(model, example(), policy)
    assert report.passed, report.table()
    assert report.error is None
    assert report.max_abs == 0.0 and report.loss == report.loss_with_plan
    names = [g.name for g in report.groups]
    assert names == ["output", "embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"]
    by_name = {g.name: g for g in report.groups}
    # Each block: lin.weight, lin.bias, bn.weight, bn.bias grads + running_mean/var/num_batches_tracked.
    assert by_name["layers.2"].tensors == 7
    assert by_name["output"].tensors == 2  # loss and logits
    assert all(g.max_rel == 0.0 for g in report.groups)


def test_report_table_json_and_str() -> None:
    report = gradckpt.verify(net(), example(), "sqrt")
    text = report.table()
    assert "layers.3" in text and text.endswith("PASS") and str(report) == text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is True and data["plan"]["policy"] == "sqrt"
    assert Plan.from_dict(data["plan"]) == report.plan
    assert data["groups"][0]["name"] == "output"
    assert (
        format_diff(0.0) == "0"
        and format_diff(math.inf) == "inf"
        and format_diff(1.5e-7) == "1.5e-07"
    )


def test_plan_object_and_blocks_argument() -> None:
    model = net()
    names = [f"layers.{i}" for i in range(4)]
    plan = Plan(
        tuple(names),
        (Decision.RECOMPUTE, Decision.RECOMPUTE, Decision.SAVE, Decision.RECOMPUTE),
        segments=((0, 2),),
    )
    assert gradckpt.verify(model, example(), plan).passed
    assert gradckpt.verify(model, example(), "full", blocks=names[1:3]).plan.blocks == tuple(
        names[1:3]
    )


def test_positional_and_tensor_examples_and_input_grads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Dropout(0.2)) for _ in range(3)]
    ).train()
    x = torch.randn(4, 6, requires_grad=True)
    report = gradckpt.verify(model, x, "full")
    assert report.passed
    assert [g.name for g in report.groups][:2] == ["output", "inputs"]
    assert x.grad is None  # the example itself is not touched
    assert gradckpt.verify(model, (x,), "every:2").passed
    assert gradckpt.verify(model, [x], "every:2", loss_fn=lambda out: out.square().mean()).passed


def test_model_left_as_found() -> None:
    model = net()
    ex = example()
    # The user's own state: a plan, accumulated gradients, moved BatchNorm statistics, an RNG.
    gradckpt.enable(model, policy="every:2")
    model(**ex)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    forwards = {n: m.__dict__.get("forward") is not None for n, m in model.named_modules()}
    torch.manual_seed(1234)
    rng = torch.get_rng_state()

    assert gradckpt.verify(model, ex, "sqrt").passed

    assert torch.equal(torch.get_rng_state(), rng)
    plan = gradckpt.applied_plan(model)
    assert plan is not None and plan.policy == "every:2"
    assert {n: m.__dict__.get("forward") is not None for n, m in model.named_modules()} == forwards
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_seed_none_starts_from_the_current_rng() -> None:
    model = net()
    torch.manual_seed(7)
    a = gradckpt.verify(model, example(), "full", seed=None)
    torch.manual_seed(7)
    b = gradckpt.verify(model, example(), "full", seed=None)
    c = gradckpt.verify(model, example(), "full", seed=3)
    assert a.passed and a.loss == b.loss and a.loss != c.loss  # dropout masks follow the RNG


# -- what verify catches -------------------------------------------------------------------


def _reentrant(
    name: str, block: nn.Module, forward: Callable[..., Any], options: Mapping[str, Any]
) -> Any:
    """The classic bug: torch's reentrant checkpoint gives no gradients when the input needs none."""

    def fwd(*args: Any, **kwargs: Any) -> Any:
        return tuc.checkpoint(lambda *a: forward(*a, **kwargs), *args, use_reentrant=True)

    return fwd


def _plain_torch(
    name: str, block: nn.Module, forward: Callable[..., Any], options: Mapping[str, Any]
) -> Any:
    """torch's non-reentrant checkpoint without gradckpt's fix: BatchNorm statistics move twice."""

    def fwd(*args: Any, **kwargs: Any) -> Any:
        return tuc.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return fwd


def test_detects_parameters_without_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    model = net()
    model.embed.weight.requires_grad_(False)  # frozen embeddings, as with adapters
    monkeypatch.setitem(WRAPPERS, Decision.RECOMPUTE, _reentrant)
    with pytest.warns(UserWarning, match="requires_grad"):
        report = gradckpt.verify(model, example(), "full")
    assert not report.passed and report.error is None
    failed = [g.name for g in report.groups if not g.passed]
    assert failed == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert any("lin.weight.grad: no gradient with the plan" in p for p in report.problems)
    assert report.max_abs == math.inf
    assert gradckpt.applied_plan(model) is None


def test_detects_batchnorm_statistics_updated_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    model = net()
    monkeypatch.setitem(WRAPPERS, Decision.RECOMPUTE, _plain_torch)
    report = gradckpt.verify(model, example(), "full")
    assert not report.passed
    problems = "\n".join(report.problems)
    assert (
        "layers.0: bn.num_batches_tracked (buffer): differs in 1 of 1 values (max abs 1.0e+00"
        in problems
    )
    assert "bn.running_mean (buffer)" in problems
    # Gradients themselves are right: only buffers fail.
    assert all("grad" not in p for p in report.problems)
    assert report.groups[0].passed  # loss and logits identical


class Flaky(nn.Module):
    """Scales its output differently when recomputed: same shapes, different values."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x) * (2.0 if is_recomputing() else 1.0))


class Miscount(nn.Module):
    """Saves one tensor fewer when recomputed: torch's count check fires during backward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h.cos() if is_recomputing() else h.sin().cos()


def test_detects_wrong_values_and_tolerance() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), Flaky(), nn.Linear(6, 6))
    x = torch.randn(3, 6)
    report = gradckpt.verify(model, x, "full", blocks=["1", "2"])
    assert not report.passed and report.error is None
    bad = {g.name for g in report.groups if not g.passed}
    assert bad == {
        "0",
        "1",
    }  # wrong gradients flow from the recomputed block back to the first layer
    assert report.groups[0].passed  # the forward (loss) is the same: only backward is wrong
    assert 0 < report.max_abs < math.inf
    assert gradckpt.verify(model, x, "full", blocks=["1", "2"], atol=10.0).passed


def test_reports_checkpoint_mismatch_naming_the_block() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), Miscount(), nn.Linear(6, 6))
    report = gradckpt.verify(model, torch.randn(3, 6), "full", blocks=["0", "1", "2"])
    assert not report.passed and report.loss_with_plan is None
    assert report.error is not None
    assert report.error.startswith("CheckpointMismatchError: block '1': the recompute")
    assert report.problems[0].startswith("step with the plan failed")
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "not a model"}, ConfigError, "nn.Module"),
        ({"example": "text"}, ConfigError, "example must be"),
        ({"example": 3}, ConfigError, "example must be"),
        ({"plan": 5}, ConfigError, "Plan or a policy"),
        ({"plan": "fulll"}, PolicyError, "did you mean 'full'"),
        ({"plan": "every:0"}, PolicyError, ">= 1"),
        ({"plan": Plan(("nope",), (Decision.RECOMPUTE,))}, GradCkptError, "nope"),
        ({"loss_fn": "loss"}, ConfigError, "loss_fn"),
        ({"loss_fn": lambda out: out["logits"]}, ConfigError, "one element"),
        ({"atol": -1.0}, ConfigError, "atol"),
        ({"rtol": float("nan")}, ConfigError, "rtol"),
        ({"atol": "0"}, ConfigError, "atol"),
        ({"seed": -3}, ConfigError, "seed"),
        ({"seed": 1.5}, ConfigError, "seed"),
        (
            {"example": {"ids": torch.zeros(2, 3)}},
            ConfigError,
            "fails on this example even without",
        ),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"model": model, "example": example(), "plan": "full", **kwargs}
    with pytest.raises(error, match=match):
        gradckpt.verify(args.pop("model"), args.pop("example"), args.pop("plan"), **args)
    assert gradckpt.applied_plan(model) is None
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_frozen_model_and_no_grad_are_refused() -> None:
    model = net().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameter"):
        gradckpt.verify(model, example())
    with torch.no_grad(), pytest.raises(ConfigError, match="no_grad"):
        gradckpt.verify(net(), example())


def test_report_is_a_frozen_dataclass() -> None:
    report = gradckpt.verify(net(), example(), "none")
    assert isinstance(report, VerifyReport)
    with pytest.raises(AttributeError):
        report.error = "x"  # type: ignore[misc]


# -- the command ---------------------------------------------------------------------------


def test_cli_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", *SMALL, "--policy", "full,sqrt", "--policy", "every:2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] is True and out["layers"] == 2 and out["device"] == "cpu"
    assert [r["plan"]["policy"] for r in out["results"]] == ["full", "sqrt", "every:2"]
    for r in out["results"]:
        assert all(g["max_abs"] == 0 for g in r["groups"])


def test_cli_table_and_json_file(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    target = tmp_path / "v.json"
    assert main(["verify", *SMALL, "--json", str(target)]) == 0
    captured = capsys.readouterr()
    assert (
        "blocks.1" in captured.out
        and "PASS: 1 plan(s)" in captured.out
        and "bit-identical" in captured.out
    )
    assert json.loads(target.read_text())["results"][0]["plan"]["policy"] == "full"


def test_cli_all_policies_and_plan_file(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    plan = gradckpt.make_plan("every:2", ["blocks.0", "blocks.1"])
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    assert main(["verify", *SMALL, "--policy", "all", "--plan", str(path), "--json"]) == 0
    policies = [r["plan"]["policy"] for r in json.loads(capsys.readouterr().out)["results"]]
    # 'all' is every policy, lean included (it passes within the tolerance for reordered sums)
    every = [p.replace(":K", ":2") for p in gradckpt.policy_names()]
    assert policies == [*every, "every:2"]


def test_cli_exits_1_on_mismatch(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(WRAPPERS, Decision.RECOMPUTE, _broken_rng)
    assert main(["verify", *SMALL, "--policy", "full,none"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: full changed" in out and "blocks.0" in out and "differs in" in out


def _broken_rng(
    name: str, block: nn.Module, forward: Callable[..., Any], options: Mapping[str, Any]
) -> Any:
    """A recompute that does not replay the RNG: dropout draws new masks."""

    def fwd(*args: Any, **kwargs: Any) -> Any:
        return tuc.checkpoint(
            forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs
        )

    return fwd


def test_cli_hugging_face_config_json(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    path = tmp_path / "config.json"
    cfg.to_json_file(str(path))
    assert (
        main(
            [
                "verify",
                "--model",
                str(path),
                "--batch",
                "1",
                "--seq",
                "8",
                "--policy",
                "full,sqrt",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and out["layers"] == 2


class LegacyCacheLM(nn.Module):
    """transformers 4.x's causal LM, as gradckpt sees it: the KV cache comes back as tuples.

    HF-like by duck typing (``config``, ``get_input_embeddings``), so gradckpt's HF guard turns
    ``config.use_cache`` off while a plan is on and the output then has no ``past_key_values``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"use_cache": True})()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 16)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        h = self.embed(input_ids)
        cache = []
        for layer in self.layers:
            h = torch.tanh(layer(h))
            cache.append((h * 2, h * 3))  # (key, value) per layer, as 4.46's legacy cache
        out = {"logits": self.head(h)}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(out["logits"].flatten(0, 1), labels.flatten())
        if self.config.use_cache:
            out["past_key_values"] = tuple(cache)
        return out


@pytest.mark.parametrize("labels", [True, False], ids=["loss", "default-loss"])
def test_kv_cache_tuples_are_not_compared(labels: bool) -> None:
    """transformers 4.46 returned its cache as tensors: verify failed every HF decoder there."""
    torch.manual_seed(0)
    model = LegacyCacheLM()
    ids = torch.randint(0, 16, (2, 5))
    example = {"input_ids": ids, "labels": ids} if labels else {"input_ids": ids}
    report = gradckpt.verify(model, example, "full")
    assert report.passed, report.table()
    assert model.config.use_cache  # restored after the step with the plan
    output = next(g for g in report.groups if g.name == "output")
    assert output.tensors == 2  # the loss and the logits: the cache is not compared


def test_mlp_preset_small() -> None:
    torch.manual_seed(0)
    model = MLPStack(layers=3, dim=16, vocab=32, dropout=0.2).train()
    ids = torch.randint(0, 32, (2, 6))
    assert gradckpt.verify(model, {"input_ids": ids, "labels": ids}, "sqrt").passed


def test_pending_budget_plan_still_replans_after_verify() -> None:
    """enable(budget=) without an example profiles the first step; verify must not cancel that."""
    torch.manual_seed(0)
    model = MLPStack(layers=4, dim=16, vocab=32).train()
    ids = torch.randint(0, 32, (2, 8))
    # A budget everything fits: the profile counts every tensor alive in the process (under
    # pytest-xdist, other tests' leftovers too), so a tight budget would depend on test order.
    pending = gradckpt.enable(model, budget="64GiB")
    if not pending.notes.get("pending"):
        pytest.skip("this planner plans without a first step")
    assert gradckpt.verify(model, {"input_ids": ids, "labels": ids}, "sqrt").passed
    assert gradckpt.applied_plan(model).notes.get("pending")
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    plan = gradckpt.applied_plan(model)
    assert plan.policy == "auto" and not plan.notes.get("pending")
