"""``gradckpt plan <hub id>``: config.json from a real local Hugging Face cache; offline misses exit 2.

The cache is a directory built in the test with the layout ``huggingface_hub`` writes
(``models--owner--name/refs/main`` naming a commit, ``snapshots/<commit>/config.json``), read
by ``huggingface_hub`` itself; the Hub is switched to offline mode, so nothing is fetched.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src python -m pytest -q -p no:xdist tests/test_hub.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradckpt.cli import main
from gradckpt.errors import ConfigError
from gradckpt.estimate.hub import is_hub_id, load_hub_config
from gradckpt.estimate.presets import resolve_model

constants = pytest.importorskip("huggingface_hub.constants")

TINY = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache(root: Path, repo_id: str, config: dict[str, object]) -> Path:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    return snap / "config.json"


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_hub_ids_are_told_from_paths() -> None:
    assert is_hub_id("meta-llama/Llama-3.1-8B") and is_hub_id("Qwen/Qwen2.5-7B")
    assert not is_hub_id("llama-3-8b") and not is_hub_id("configs/tiny.json")
    assert not is_hub_id("a/b/c") and not is_hub_id("../x") and not is_hub_id("/abs/path")


def test_plan_reads_config_from_the_local_cache(
    offline_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _cache(offline_cache, "tiny-org/tiny-llama", TINY)
    data, where = load_hub_config("tiny-org/tiny-llama")
    assert data == TINY and Path(where) == path
    spec = resolve_model("tiny-org/tiny-llama")
    assert spec.config.hidden_size == 64 and "Hugging Face Hub" in spec.source
    code = main(["plan", "tiny-org/tiny-llama", "--seq", "32", "--json", "--policy", "none"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert report["model"] == "tiny-org/tiny-llama" and report["layers"] == 3


def test_offline_miss_exits_2_with_one_line_saying_how_to_pass_a_config(
    offline_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _cache(offline_cache, "tiny-org/tiny-llama", TINY)
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        load_hub_config("tiny-org/other")
    code = main(["plan", "tiny-org/other"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "HF_HUB_OFFLINE" in err and "gradckpt plan path/to/config.json" in err


def test_a_cached_file_that_is_not_a_config_object_is_refused(offline_cache: Path) -> None:
    repo = offline_cache / "models--tiny-org--broken" / "snapshots" / COMMIT
    repo.mkdir(parents=True)
    (offline_cache / "models--tiny-org--broken" / "refs").mkdir()
    (offline_cache / "models--tiny-org--broken" / "refs" / "main").write_text(COMMIT)
    (repo / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        load_hub_config("tiny-org/broken")


def test_a_config_that_needs_remote_code_is_refused(offline_cache: Path) -> None:
    remote = {"model_type": "my-own-arch", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}
    _cache(offline_cache, "tiny-org/remote", remote)
    with pytest.raises(ConfigError, match="never runs"):
        resolve_model("tiny-org/remote")


def test_an_unreachable_hub_is_told_at_once_not_after_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    # a port nothing listens on: bind one, then close it, so the connection is refused
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=f"cannot be reached \\(127.0.0.1:{port}: "):
        load_hub_config("tiny-org/tiny-llama")
    code = main(["plan", "tiny-org/tiny-llama"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "gradckpt plan path/to/config.json" in err
