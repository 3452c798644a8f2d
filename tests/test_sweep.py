"""Sweeps, searches and the GPU table (``gradckpt.sweep``, ``gradckpt plan --seq/--batch lists,
--max-batch, --max-seq, --which-gpu, --price, --plot``).

Checks: the search is exact against brute force; peaks grow with batch and sequence length for
every policy and ``full`` is never above ``none``; the largest batch (sequence) found fits while
one more does not, by direct ``gradckpt.estimate`` calls; throughput and cost per token follow
from the estimate and the prices given; bad input exits 2 with one line; the library takes lists
(comma strings still work for one release, with a DeprecationWarning at the caller's line).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_sweep.py -q
"""

from __future__ import annotations

import itertools
import json
import math
import re
import warnings

import pytest

import gradckpt
from gradckpt.cli import main
from gradckpt.cli._args import parse_int_list, parse_prices
from gradckpt.estimate.gpus import GPU
from gradckpt.estimate.search import largest_fitting

pytest.importorskip("transformers")

GiB = 1024**3
# A GPU with a real preset's throughput but little memory, so GPT-2's batches stay small
# (each batch size the search tries is one fake step).
TINY = GPU("tiny-4090", 5 * GiB // 2, 165.2, 1008.0, "rtx-4090 figures, 2.5 GiB")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["plan", *argv])
    except SystemExit as e:  # argparse refusals
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# -- the search, without a model --------------------------------------------------------------


@pytest.mark.parametrize(
    "peak",
    [
        lambda k: 10 + 3 * k,  # linear: batch
        lambda k: 5 + k + 0.02 * k * k,  # quadratic: eager attention in sequence length
        lambda k: 50 + 40 * math.sqrt(k),  # concave: the line overshoots its aim
        lambda k: 7 + 9 * (k // 4),  # plateaus: equal peaks for several k
    ],
)
def test_largest_fitting_matches_brute_force(peak) -> None:
    for capacity in (peak(1), peak(1) + 0.5, 60, 100, 333.3, 1000, 10**5):
        if peak(1) > capacity:
            continue
        for limit in (1, 7, 64, 4096):
            probed: list[int] = []

            def fits(k: int, cap: float = capacity, probed: list[int] = probed) -> bool:
                probed.append(k)
                return peak(k) <= cap

            k = largest_fitting(fits, peak, capacity, limit)
            brute = max(j for j in range(1, limit + 1) if peak(j) <= capacity)
            assert k == brute, (capacity, limit)
            assert all(1 <= j <= limit for j in probed)
            assert len(set(probed)) <= 2 * math.log2(limit + 1) + 4


def test_parsers() -> None:
    assert parse_int_list("1024, 512,1024", "seq") == [512, 1024]
    assert parse_int_list(8, "batch") == [8]
    assert parse_int_list([4, 1], "batch") == [1, 4]
    assert parse_prices("4090=0.35, a100-80gb=1.6") == {"rtx-4090": 0.35, "a100-80gb": 1.6}
    assert parse_prices({"h100": 0}) == {"h100": 0.0}
    assert parse_prices(None) == {}


def test_library_takes_lists_comma_strings_warn_for_one_release() -> None:
    from gradckpt.estimate import GPU_PRESETS, TrainingSetup
    from gradckpt.estimate.estimator import policy_list
    from gradckpt.estimate.sweep import gpu_list, gpu_prices, int_values

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # lists and single names: no warning
        assert int_values([1024, 512, 1024], "seq") == [512, 1024]
        assert [g.name for g in gpu_list(["4090", "24GB", "rtx-4090"])] == ["rtx-4090", "24GB"]
        assert gpu_prices({"4090": 0.35}) == {"rtx-4090": 0.35}
        assert policy_list("full") == ["full"] and policy_list(["none", "every:2"])[1] == "every:2"
        assert TrainingSetup(lora_targets=["q_proj"]).lora_targets == ("q_proj",)
        assert TrainingSetup(lora_targets="v_proj").lora_targets == ("v_proj",)
    cases = [
        (lambda: int_values("512, 1024", "seq"), [512, 1024], "seq='512, 1024'"),
        (lambda: [g.name for g in gpu_list("all")], list(GPU_PRESETS), "gpu='all'"),
        (lambda: [g.name for g in gpu_list("l4,h100")], ["l4", "h100"], "gpu='l4,h100'"),
        (lambda: gpu_prices("4090=0.5"), {"rtx-4090": 0.5}, "prices='4090=0.5'"),  # type: ignore[arg-type]
        (lambda: policy_list("none,full"), ["none", "full"], "policies='none,full'"),
        (
            lambda: TrainingSetup(lora_targets="q_proj, v_proj").lora_targets,
            ("q_proj", "v_proj"),
            "lora_targets='q_proj, v_proj'",
        ),
    ]
    for call, want, what in cases:
        with pytest.warns(DeprecationWarning, match=re.escape(what)):
            assert call() == want
    # the warning points at the caller's line, not at gradckpt's internals
    refused = pytest.raises(gradckpt.ConfigError, match="max_batch searches what fits a GPU")
    with pytest.warns(DeprecationWarning) as record, refused:
        gradckpt.sweep("gpt2", seq="128,256", policies="none,full", max_batch=True)
    assert [w.filename for w in record] == [__file__, __file__]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq": []}, "seq list is empty"),
        ({"seq": ""}, "seq list is empty"),
        ({"batch": "1,two"}, "batch value 'two' is not a whole number"),
        ({"seq": [512, 1.5]}, "seq value 1.5 is not a whole number"),
        ({"batch": [0, 1]}, "batch must be >= 1, got 0"),
        ({"seq": True}, "seq must be a whole number"),
        ({"gpu": []}, "GPU list is empty"),
        ({"gpu": "rtx-4090,rtx-4080"}, "unknown GPU 'rtx-4080'"),
        ({"max_batch": True}, "max_batch searches what fits a GPU"),
        ({"gpu": "rtx-4090", "prices": {"rtx-4090": -0.2}}, "negative"),
        ({"gpu": "rtx-4090", "prices": {"rtx-4090": "cheap"}}, "not a number"),
        ({"gpu": "rtx-4090", "prices": {"rtx-4090": float("nan")}}, "not a number"),
        ({"gpu": "rtx-4090", "prices": "h300=3"}, "unknown GPU 'h300'"),
        ({"gpu": "rtx-4090", "prices": "rtx-4090"}, "is not GPU=PRICE"),
        ({"gpu": "rtx-4090", "prices": {}}, "price list is empty"),
        ({"gpu": "rtx-4090", "prices": "4090=1,rtx-4090=2"}, "has two prices"),
        ({"gpu": "rtx-4090", "prices": "a100-80gb=1.6"}, "not among the GPUs asked"),
        ({"gpu": "24GB", "prices": "24GB=0.3"}, "bare memory size has no throughput"),
        ({"seq": [512, 2048]}, "exceeds gpt2's maximum of 1024 positions"),
        ({"policies": "none,fulll"}, "unknown policy 'fulll'"),
        ({"policies": "auto"}, "policy 'auto' plans for a GPU"),
        ({"gpu": "2GiB", "max_seq": True, "seq_step": 0}, "seq_step must be"),
    ],
)
def test_bad_input_raises_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(gradckpt.GradCkptError, match=message.replace("(", r"\(")):
        gradckpt.sweep("gpt2", **kwargs)


# -- peaks along sequence length and batch ----------------------------------------------------


def _nondecreasing(series: list[tuple[int, int]]) -> bool:
    return all(y1 >= y0 for (_, y0), (_, y1) in itertools.pairwise(series))


def _check_monotone(report: gradckpt.SweepReport) -> None:
    """Peaks never fall as batch or sequence grow, and rise over the grid; activations always rise.

    Peaks may stay equal at small settings: there the step's peak is at the end of backward
    (all gradients and the tied embedding's gradient alive, activations freed), which does not
    depend on the tokens (GPT-2 at batch 1 x 128..512 with ``full``: 1,744,274,286 bytes each).
    """
    for p in report.policies:
        for b in report.batches:
            assert _nondecreasing(report.series(p, batch=b)), (p, b)
        for q in report.seqs:
            assert _nondecreasing(report.series(p, seq=q)), (p, q)
        first, last = report.points[0].result(p), report.points[-1].result(p)
        assert last.peak_bytes > first.peak_bytes, p
    for pt in report.points:
        for o in report.points:
            bigger = (
                (o.batch, o.seq) != (pt.batch, pt.seq) and o.batch >= pt.batch and o.seq >= pt.seq
            )
            for p in report.policies:
                if bigger:  # what checkpointing reduces grows strictly with the step's tokens
                    assert o.result(p).activation_bytes > pt.result(p).activation_bytes
        assert pt.result("full").peak_bytes <= pt.result("none").peak_bytes
    last_pt = report.points[-1]
    assert last_pt.result("full").peak_bytes < last_pt.result("none").peak_bytes


def test_gpt2_peak_grows_with_seq_and_batch_full_never_above_none() -> None:
    report = gradckpt.sweep(
        "gpt2", seq="128,512", batch="1,2", policies="none,selective,full", gpu="rtx-4090"
    )
    assert [(p.batch, p.seq) for p in report.points] == [(b, s) for b in (1, 2) for s in (128, 512)]
    _check_monotone(report)
    for p in report.policies:
        assert report.points[-1].result(p).peak_bytes <= report.points[-1].result("none").peak_bytes
    # the grid is estimate()'s own numbers, and fits is peak vs the GPU's memory
    one = gradckpt.estimate("gpt2", batch=2, seq=128, policies="full", gpu="rtx-4090")
    pt = next(p for p in report.points if (p.batch, p.seq) == (2, 128))
    assert pt.result("full") == one.result("full")
    assert pt.fits["full"]["rtx-4090"] is True and pt.tokens_per_step == 256
    d = json.loads(json.dumps(report.to_dict()))
    assert d["points"][2]["results"][2]["peak_bytes"] == one.result("full").peak_bytes


def test_llama_lora_peak_grows_with_seq_and_batch() -> None:
    report = gradckpt.sweep("llama-3.2-1b", method="lora", seq="256,1024", batch="1,2")
    assert report.policies == ["none", "full"] and report.setup["method"] == "lora"
    _check_monotone(report)


# -- the largest batch / sequence that fits ----------------------------------------------------


def test_max_batch_fits_and_one_more_does_not(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "gpt2", "--seq", "256", "--gpu", "2GiB", "--max-batch", "--json")
    assert code == 0, err
    d = json.loads(out)
    found = {f["policy"]: f for f in d["largest"]}
    assert set(found) == {"none", "full"}
    cap = 2 * GiB
    for policy, f in found.items():
        assert f["found"] and f["vary"] == "batch" and f["seq"] == 256 and f["limited_by"] is None
        b = f["batch"]
        at = gradckpt.estimate("gpt2", batch=b, seq=256, policies=policy).results[0]
        more = gradckpt.estimate("gpt2", batch=b + 1, seq=256, policies=policy).results[0]
        assert at.peak_bytes == f["peak_bytes"] <= cap < more.peak_bytes == f["next_peak_bytes"]
        assert f["tokens_per_step"] == b * 256
        assert f["tokens_per_s"] is None  # a bare size has no throughput figures
    assert found["full"]["batch"] > found["none"]["batch"] >= 1


def test_max_batch_and_max_seq_throughput_and_cost() -> None:
    r = gradckpt.sweep(
        "gpt2",
        seq=256,
        gpu=TINY,
        policies="none,full",
        max_batch=True,
        max_seq=True,
        prices={"tiny-4090": 0.5},
    )
    by = {(f.vary, f.policy): f for f in r.largest}
    for (vary, policy), f in by.items():
        assert f.found and f.peak_bytes <= TINY.memory_bytes
        at = gradckpt.estimate("gpt2", batch=f.batch, seq=f.seq, policies=policy, gpu=TINY)
        pe = at.results[0]
        assert f.tokens_per_s == pe.tokens_per_s and f.step_time_s == pe.step_time_s
        assert f.tokens_per_step == f.batch * f.seq
        assert f.cost_per_mtok == pytest.approx(0.5 / 3600 / pe.tokens_per_s * 1e6, rel=1e-12)
        if vary == "batch":
            one = gradckpt.estimate("gpt2", batch=1, seq=256, policies=policy, gpu=TINY)
            assert f.batch1_tokens_per_s == one.results[0].tokens_per_s
        if vary == "seq":
            assert f.batch == 1 and f.seq % 128 == 0 and f.batch1_tokens_per_s is None
            if f.limited_by is None:
                nxt = gradckpt.estimate("gpt2", seq=f.seq + 128, policies=policy).results[0]
                assert nxt.peak_bytes > TINY.memory_bytes
            else:
                assert f.limited_by == "max_position_embeddings" and f.seq == 1024
    # full reaches gpt2's 1024 positions on 2.5 GiB (2.19 GiB there); none does not (3.21 at 768)
    assert by[("seq", "full")].seq == 1024 and by[("seq", "none")].seq < 1024
    assert by[("batch", "full")].tokens_per_step > by[("batch", "none")].tokens_per_step


def test_nothing_fits_is_reported_not_searched() -> None:
    r = gradckpt.sweep("gpt2", seq=1024, gpu="1GiB", max_batch=True, policies="full")
    (f,) = r.largest
    assert not f.found and f.batch == 1 and f.peak_bytes > GiB and f.cost_per_mtok is None


# -- which GPU, with and without prices --------------------------------------------------------


def test_which_gpu_table_with_prices(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        capsys,
        "gpt2",
        "--seq",
        "512",
        "--batch",
        "4",
        "--gpu",
        "rtx-4090,a100-80gb,3GiB",
        "--price",
        "rtx-4090=0.35,a100-80gb=1.6",
        "--json",
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["prices"] == {"rtx-4090": 0.35, "a100-80gb": 1.6}
    rows = {(o["gpu"], o["policy"]): o for o in d["gpu_table"]}
    assert set(rows) == {
        (g, p) for g in ("rtx-4090", "a100-80gb", "3GiB") for p in ("none", "full")
    }
    for (g, p), o in rows.items():
        pe = gradckpt.estimate("gpt2", batch=4, seq=512, policies=p, gpu=g).results[0]
        assert o["fits"] == pe.fits and o["peak_bytes"] == pe.peak_bytes
        if g == "3GiB":
            assert o["tokens_per_s"] is None and o["cost_per_mtok"] is None
        else:
            assert o["tokens_per_s"] == pe.tokens_per_s
            want = d["prices"][g] / 3600 / pe.tokens_per_s * 1e6
            assert o["cost_per_mtok"] == pytest.approx(want, rel=1e-12)
    assert rows[("3GiB", "none")]["fits"] is False and rows[("3GiB", "full")]["fits"] is True
    # no prices: time only, every preset
    code, out, err = _run(capsys, "gpt2", "--seq", "512", "--batch", "4", "--which-gpu")
    assert code == 0, err
    for text in ("which GPU", "rtx-3090", "h100", "tok/s"):
        assert text in out
    assert "$/M tok" not in out


def test_plot_and_table(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    png = tmp_path / "seq.png"
    code, out, err = _run(
        capsys, "gpt2", "--seq", "128,512", "--gpu", "2GiB,rtx-4090", "--plot", str(png)
    )
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for text in (
        "peak GiB per policy (+ recompute's speed cost on rtx-4090), batch 1:",
        "largest seq of these that fits",
        f"plot: {png}",
    ):
        assert text in out
    # GPT-2 full fine-tune, batch 1: 'none' needs 2.28 GiB at 512 tokens, 'full' 1.62 GiB
    assert "2GiB " in out and "(2.00 GiB): none 128, full 512" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gpt2", "--seq", ""], "argument --seq: empty list"),
        (["gpt2", "--seq", "512,abc"], "argument --seq: invalid int value: 'abc'"),
        (["gpt2", "--batch", "1,2,x"], "argument --batch: invalid int value: 'x'"),
        (["gpt2", "--batch", "1,0"], "batch must be >= 1, got 0"),
        (["gpt2", "--seq", "128,2048"], "exceeds gpt2's maximum of 1024 positions"),
        (["gpt2", "--price", "rtx-4080=1"], "unknown GPU 'rtx-4080'"),
        (["gpt2", "--gpu", "rtx-4090", "--price", "rtx-4090=-1"], "is negative"),
        (["gpt2", "--gpu", "rtx-4090", "--price", "rtx-4090=abc"], "not a number"),
        (["gpt2", "--gpu", "rtx-4090", "--price", "a100-80gb=2"], "not among the GPUs asked"),
        (["gpt2", "--price", ","], "price list is empty"),
        (["gpt2", "--max-batch"], "max_batch searches what fits a GPU"),
        (["gpt2", "--gpu", ",", "--max-batch"], "--gpu list is empty"),
        (["gpt2", "--gpu", "rtx-4090,rtx-4080"], "unknown GPU 'rtx-4080'"),
        (["gpt2", "--seq", "128,256", "--plot", "x.jpg"], "must end in .png"),
        (["gpt2", "--plot", "x.png"], "--plot draws a sweep"),
        (["gpt2", "--gpu", "2GiB", "--max-seq", "--seq-step", "-5"], "seq_step must be"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err
