"""Bad input: every API function and CLI command given wrong types, values, files or names.

A GradCkptError subclass from the API, exit 2 with one line on stderr and no traceback from
the CLI, and nothing half-applied to the model.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_bad_input.py -q
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradckpt
from gradckpt import GradCkptError, Plan
from gradckpt.bench.models import MLPStack, build_bench_model, make_batch
from gradckpt.cli import main
from gradckpt.errors import BlockError, BudgetError, ConfigError, PlanError, PolicyError
from guard_models import clean_state

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
