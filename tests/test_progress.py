"""Progress bars of long commands: drawn on a terminal, silent with --json or without a TTY.

Checks ``gradckpt.cli._progress.progress_bar`` directly (a terminal faked by rich's own
``is_terminal`` flag), and that the library's ``progress=`` hooks (``sweep``, ``gpus_needed``)
are called once per estimate.
Run: PYTHONPATH=src .venv/bin/python -m pytest -p no:xdist -q tests/test_progress.py
"""

from __future__ import annotations

import io

import pytest

from gradckpt.cli._progress import progress_bar


def _draw(enabled: bool, terminal: bool, monkeypatch: pytest.MonkeyPatch) -> str:
    from rich.console import Console

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: terminal))
    out = io.StringIO()
    with progress_bar("verify", 3, enabled=enabled, file=out) as step:
        for name in ("none", "full", "sqrt"):
            step(f"verified {name}")
    return out.getvalue()


def test_bar_drawn_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "verified" in _draw(True, True, monkeypatch)


@pytest.mark.parametrize(
    ("enabled", "terminal"), [(False, True), (True, False)], ids=["json", "no-tty"]
)
def test_bar_silent_with_json_or_without_tty(
    enabled: bool, terminal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _draw(enabled, terminal, monkeypatch) == ""


def test_library_hooks_called_per_estimate() -> None:
    pytest.importorskip("transformers")
    import gradckpt
    from gradckpt.estimate import gpus_needed

    seen: list[str] = []
    r = gradckpt.sweep(
        "qwen2.5-0.5b", seq=[128, 256], policies=["none", "full"], progress=seen.append
    )
    assert len(seen) == 4 == sum(len(p.results) for p in r.points)
    counts: list[str] = []
    g = gpus_needed(
        "qwen2.5-0.5b", gpu="6GiB", shard="zero3", seq=128, policies=["full"],
        progress=counts.append,
    )  # fmt: skip
    assert counts[-1] == f"{g.counts[0].gpus} GPU" + ("s" if g.counts[0].gpus > 1 else "")
