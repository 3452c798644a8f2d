"""Planning across GPUs: ``estimate(..., gpus=N, shard=...)``, ``gpus_needed`` and ``plan --gpus``.

- The ZeRO paper's Figure 1 (Rajbhandari et al. 2020: 7.5B parameters, Adam, mixed precision,
  K = 12, 64 GPUs): 120 GB unsharded, 31.4 GB with stage 1, 16.6 GB with stage 2, 1.9 GB with
  stage 3, reproduced from byte counts alone (``Sharding.static``).
- On a real (fake-tensor) estimate: per-GPU weights, gradients and optimizer states are the
  single-GPU ones divided as each mode says, activations are unchanged, buffers are one block's
  parameters unsharded + one prefetched (+ FSDP2's root), and the peak falls as GPUs are added.
- ``auto`` plans for each GPU's share (the planner's budget is what the card leaves after the
  per-GPU weights, states and buffers; its profile holds each gradient as a 1/N shard).
- ``gpus_needed`` finds the smallest count that fits; bad input (N < 1, an unknown mode,
  DeepSpeed with fp32 model weights) is refused with one clear line,
  exit 2 on the command line.

Run: PYTHONPATH=src .venv/bin/python -m pytest -p no:xdist -q tests/test_sharding.py
"""

from __future__ import annotations

import json

import pytest

from gradckpt.errors import ConfigError
from gradckpt.estimate.sharding import Sharding, ShardTotals

pytest.importorskip("transformers")

GB = 10**9


def paper_totals(params: int) -> ShardTotals:
    # DeepSpeed bf16 as the estimator reports it: bf16 weights and gradients, bf16 Adam states
    # (2 x 2 bytes); Sharding adds the fp32 master and widens the states to fp32.
    return ShardTotals(
        weight_bytes=2 * params,
        trainable_params=params,
        trainable_bytes=2 * params,
        grad_bytes=2 * params,
        optimizer_bytes=4 * params,
        step_grad_bytes=2 * params,
        root_bytes=0,
        block_bytes=0,
        block_grad_bytes=0,
    )


@pytest.mark.parametrize(
    ("mode", "gpus", "published_gb"),
    [("zero1", 1, 120.0), ("zero1", 64, 31.4), ("zero2", 64, 16.6), ("zero3", 64, 1.9)],
)
def test_zero_paper_figure_1(mode: str, gpus: int, published_gb: float) -> None:
    t = paper_totals(7_500_000_000)
    got = Sharding(gpus, mode).fixed_bytes(t, "adamw")
    assert round(got / GB, 1) == published_gb


def test_static_split_per_mode() -> None:
    t = paper_totals(1_000_000)
    ddp = Sharding(4, "ddp").static(t, "adamw")
    assert ddp == {"weights": 2_000_000, "gradients": 2_000_000, "optimizer_states": 4_000_000}
    z3 = Sharding(4, "zero3").static(t, "adamw")
    # 12 bytes per parameter of master weights + fp32 Adam states, over 4 GPUs
    assert z3 == {"weights": 500_000, "gradients": 500_000, "optimizer_states": 3_000_000}
    fsdp = Sharding(4, "fsdp2").static(t, "adamw")  # torch's AdamW: states in the params' dtype
    assert fsdp == {"weights": 500_000, "gradients": 500_000, "optimizer_states": 1_000_000}
    assert Sharding(3, "fsdp2").static(t, "sgd")["weights"] == 666_667  # shards round up


@pytest.mark.parametrize(
    ("gpus", "shard", "match"),
    [
        (0, "fsdp2", "gpus must be a whole number >= 1, got 0"),
        (-2, "ddp", "gpus must be a whole number >= 1"),
        (2, "fsdp", "unknown shard mode 'fsdp' \\(did you mean 'fsdp2'\\?\\)"),
        (2, "zero4", "unknown shard mode 'zero4'"),
    ],
)
def test_bad_sharding_is_refused(gpus: int, shard: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Sharding(gpus, shard)


MODEL = "qwen2.5-0.5b"
SETTINGS = {"batch": 1, "seq": 256, "policies": ["none", "full"], "alternatives": False}


@pytest.fixture(scope="module")
def single() -> object:
    import gradckpt

    return gradckpt.estimate(MODEL, **SETTINGS)


def _parts(r: object) -> dict[str, int]:
    return dict(r.breakdown)  # type: ignore[attr-defined]


def test_fsdp2_per_gpu_breakdown(single: object) -> None:
    import gradckpt

    got = gradckpt.estimate(MODEL, gpus=4, shard="fsdp2", **SETTINGS)
    assert got.setup["gpus"] == 4 and got.setup["shard"] == "fsdp2"
    assert "per GPU of 4 (fsdp2)" in got.setup_line()
    for one, four in zip(single.results, got.results, strict=True):  # type: ignore[attr-defined]
        a, b = _parts(one), _parts(four)
        assert b["weights"] == -(-a["weights"] // 4)
        assert b["optimizer_states"] == -(-a["optimizer_states"] // 4)
        for key in ("activations", "logits_loss", "backward_transient"):
            assert b[key] == a[key], key  # each GPU runs its own micro-batch: not sharded
        assert a["shard_buffers"] == 0 < b["shard_buffers"]
        assert b["gradients"] <= -(-a["gradients"] // 4)
        assert four.peak_bytes == sum(b.values()) < one.peak_bytes
        assert four.speed_cost == one.speed_cost


def test_buffers_are_one_block_gathered_and_one_prefetched() -> None:
    import gradckpt
    from gradckpt.estimate import fake_model
    from gradckpt.estimate.presets import resolve_model
    from gradckpt.estimate.training import TrainingSetup

    spec = resolve_model(MODEL)
    sess = fake_model.get_session(spec.config, TrainingSetup(), 3, None)
    whole, blocks = sess.totals("adamw")
    block = max(b.weight_bytes for b in blocks)
    grads = max(b.grad_bytes for b in blocks)
    root = whole.weight_bytes - sum(b.weight_bytes for b in blocks)
    z3 = gradckpt.estimate(MODEL, gpus=2, shard="zero3", **SETTINGS).results[0]
    assert z3.breakdown["shard_buffers"] == 2 * block + grads
    fsdp = gradckpt.estimate(MODEL, gpus=2, shard="fsdp2", **SETTINGS).results[0]
    assert fsdp.breakdown["shard_buffers"] == root + 2 * block + grads
    z2 = gradckpt.estimate(MODEL, gpus=2, shard="zero2", **SETTINGS).results[0]
    assert z2.breakdown["shard_buffers"] == grads
    ddp = gradckpt.estimate(MODEL, gpus=2, shard="ddp", **SETTINGS).results[1]
    all_grads = fake_model.model_totals(spec.config, TrainingSetup()).grad_bytes
    assert ddp.breakdown["shard_buffers"] == all_grads  # the buckets: a copy of every gradient
    one = gradckpt.estimate(MODEL, gpus=1, shard="ddp", **SETTINGS).results[1]
    assert one.breakdown["shard_buffers"] == 0  # one process: no DDP


def test_mixed_precision_fsdp2_runs_the_bf16_step(single: object) -> None:
    import gradckpt
    from gradckpt.estimate import fake_model
    from gradckpt.estimate.presets import resolve_model
    from gradckpt.estimate.training import TrainingSetup

    fp32 = fake_model.model_totals(resolve_model(MODEL).config, TrainingSetup(precision="mixed"))
    mixed = gradckpt.estimate(MODEL, precision="mixed", gpus=2, shard="fsdp2", **SETTINGS)
    for bf16, mp in zip(single.results, mixed.results, strict=True):  # type: ignore[attr-defined]
        # fp32 shards, bf16 activations (the bf16 step: no autocast weight copies)
        assert mp.breakdown["weights"] == -(-fp32.weight_bytes // 2)
        assert mp.breakdown["optimizer_states"] == -(-fp32.optimizer_bytes // 2)
        assert mp.breakdown["activations"] == bf16.breakdown["activations"]
    with pytest.raises(ConfigError, match="DeepSpeed's bf16 mode .* not 'mixed'"):
        gradckpt.estimate(MODEL, precision="mixed", gpus=2, shard="zero3", **SETTINGS)


def test_auto_plans_for_each_gpus_share() -> None:
    import gradckpt

    kw = {"gpus": 2, "shard": "fsdp2", "seq": 256, "batch": 4, "alternatives": False}
    none, full = gradckpt.estimate(MODEL, policies=["none", "full"], **kw).results
    # a card between the two per-GPU peaks: 'none' does not fit, 'full' does
    card = (none.peak_bytes + full.peak_bytes) // 2 // 2**20
    got = gradckpt.estimate(MODEL, policies=["auto"], gpu=f"{card}MiB", **kw)
    auto = got.results[0]
    assert got.setup["gpus"] == 2 and got.setup["shard"] == "fsdp2"
    # planned for what each GPU holds (its shard of weights and states, the buffers), so it
    # fits the card and saves more than 'full' does: cheaper than recomputing every block
    assert auto.fits and auto.peak_bytes <= card * 2**20
    assert 0 < auto.speed_cost < full.speed_cost
    assert auto.breakdown["weights"] == none.breakdown["weights"]  # the per-GPU share


def test_sweep_max_batch_is_per_gpu() -> None:
    import gradckpt

    kw = {"seq": 256, "gpu": "rtx-4090", "policies": ["full"], "max_batch": True}
    one = gradckpt.sweep(MODEL, **kw).largest[0]
    eight = gradckpt.sweep(MODEL, gpus=8, shard="zero3", **kw).largest[0]
    assert eight.batch > one.batch  # the freed weights and states hold more sequences
    assert eight.peak_bytes <= 24 * 1024**3


def test_gpus_needed_finds_the_smallest_count() -> None:
    from gradckpt.estimate import gpu_count

    kw = {"batch": 1, "seq": 256, "policies": ["none", "full"]}
    r = gpu_count.gpus_needed(MODEL, gpu="6GiB", shard="zero3", **kw)
    by = {c.policy: c for c in r.counts}
    for c in r.counts:
        assert c.gpus is not None and c.tried[-1] == (c.gpus, c.peak_bytes)
        assert c.headroom_bytes >= 0
        assert all(p > 6 * 1024**3 for _, p in c.tried[:-1])  # every smaller count failed
    assert by["full"].gpus <= by["none"].gpus
    stuck = gpu_count.gpus_needed(MODEL, gpu="1GiB", shard="ddp", **kw)
    assert all(c.gpus is None and "stop lowering" in (c.why or "") for c in stuck.counts)
    with pytest.raises(ConfigError, match="gpus_needed chooses gpus itself"):
        gpu_count.gpus_needed(MODEL, gpu="6GiB", gpus=2)


def _cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from gradckpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_cli_gpus_auto_json() -> None:
    rc, out, _ = _cli(
        "plan", MODEL, "--seq", "256", "--gpu", "6GiB", "--gpus", "auto", "--shard", "zero3",
        "--policy", "full", "--json",
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out)
    assert data["shard"] == "zero3" and data["counts"][0]["gpus"] >= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "0", "--shard", "fsdp2"], "gpus must be a whole number >= 1, got 0"),
        (["--gpus", "two"], "--gpus takes a whole number of GPUs or 'auto', got 'two'"),
        (["--gpus", "2", "--shard", "zero4"], "unknown shard mode 'zero4'"),
        (["--gpus", "auto"], "--gpus auto counts GPUs of one kind: name exactly one with --gpu"),
        (
            ["--gpus", "auto", "--gpu", "a100-80gb", "--seq", "256,512"],
            "--gpus auto answers for one setting",
        ),
    ],
)
def test_cli_bad_input_one_line_exit_2(argv: list[str], message: str) -> None:
    rc, out, err = _cli("plan", MODEL, *argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
