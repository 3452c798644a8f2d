"""``gradckpt plan``: tables and JSON from the library's estimate, one-line errors with exit code 2.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_cli_plan.py -q
"""

from __future__ import annotations

import json
import warnings

import pytest

from gradckpt.cli import main
from gradckpt.cli._args import gpu_names
from gradckpt.estimate import GPU_PRESETS

pytest.importorskip("transformers")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["plan", *argv])
    except SystemExit as e:  # argparse refusals
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_list_models_and_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--list-models", "--list-gpus", "--json")
    assert code == 0
    data = json.loads(out)
    names = {m["name"] for m in data["models"]}
    assert len(names) >= 10 and {"mistral-7b", "llama-3-8b", "qwen2.5-14b", "mixtral-8x7b"} <= names
    gpus = {g["name"]: g for g in data["gpus"]}
    assert {"rtx-3090", "rtx-4090", "l4", "a10g", "a100-40gb", "a100-80gb", "h100"} <= set(gpus)
    assert all(g["memory_bytes"] > 0 and g["bf16_tflops"] > 0 for g in gpus.values())
    code, out, _ = _run(capsys, "--list-models")
    assert code == 0 and "mistralai/Mistral-7B-v0.3" in out


def test_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "gpt2", "--seq", "128", "--batch", "2", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert [r["policy"] for r in d["results"]] == ["none", "full"]
    for r in d["results"]:
        assert r["fits"] is None and isinstance(r["peak_bytes"], int)
        assert sum(r["breakdown"].values()) == r["peak_bytes"]
    assert d["setup"] == {
        **d["setup"],
        "method": "full",
        "batch": 2,
        "seq": 128,
        "optimizer": "adamw",
    }
    assert d["results"][1]["speed_cost"] > 0 == d["results"][0]["speed_cost"]


def test_loss_liger_is_the_chunked_head(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "gpt2", "--seq", "256", "--loss", "liger", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["setup"]["hf_loss"] == "liger"
    assert all("chunked loss head" in r["plan"] for r in d["results"])
    assert any("Liger-Kernel" in n for n in d["notes"])


def test_table_with_gpu_and_verdicts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        capsys, "gpt2", "--seq", "128", "--gpu", "rtx-4090", "--policy", "none,full,every:2"
    )
    assert code == 0, err
    for text in ("peak", "kept for backward", "speed cost", "summary", "fits rtx-4090"):
        assert text in out
    assert "none: fits rtx-4090 with" in out and "every:2: fits rtx-4090 with" in out


def test_no_fit_lists_alternatives(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        capsys, "gpt2", "--seq", "128", "--gpu", "1.5GiB", "--policy", "full", "--json"
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["results"][0]["fits"] is False and d["results"][0]["headroom_bytes"] < 0
    alts = {a["change"]: a for a in d["alternatives"]}
    assert any("LoRA" in c for c in alts) and any("QLoRA" in c for c in alts)


def test_cli_splits_its_strings_and_leaves_the_rules_to_the_library(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = _run(
            capsys,
            *("gpt2", "--lora-targets", "c_attn,c_proj", "--seq", "32,64", "--gpu", "l4,4090"),
            *("--policy", "none,full", "--price", "4090=0.3", "--json"),
        )
    assert code == 0, err
    # the library got lists: none of its deprecated string forms was used
    assert not [w for w in caught if "will be refused in the next release" in str(w.message)]
    d = json.loads(out)
    assert [g["name"] for g in d["gpus"]] == ["l4", "rtx-4090"]
    assert d["setup"]["lora_targets"] == ["c_attn", "c_proj"] and d["prices"] == {"rtx-4090": 0.3}
    # prices imply the GPU table (sweep's rule, not re-decided here): every point x GPU x policy
    assert len(d["gpu_table"]) == 2 * 2 * 2
    assert gpu_names("all") == list(GPU_PRESETS) and gpu_names(" l4, ,24GB") == ["l4", "24GB"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["mistral-7"], "did you mean 'mistral-7b'?"),
        (["gpt2", "--batch", "0"], "batch must be >= 1, got 0"),
        (["gpt2", "--batch", "-4"], "batch must be >= 1, got -4"),
        (["gpt2", "--batch", "two"], "invalid int value: 'two'"),
        (["gpt2", "--gpu", "rtx-4080"], "unknown GPU 'rtx-4080'"),
        (["gpt2", "--policy", "none,fulll"], "unknown policy 'fulll'"),
        (["gpt2", "--method", "dora"], "invalid choice: 'dora'"),
        (["gpt2", "--loss", "fused"], "invalid choice: 'fused'"),
        ([], "name a model"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err


def test_malformed_config_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text("{not json")
    code, _, err = _run(capsys, str(cfg))
    assert code == 2 and err.count("\n") == 1 and "is not valid JSON" in err
