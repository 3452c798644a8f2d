"""GPU presets: the cards people rent, each with figures and a source; names and aliases resolve.

Run: PYTHONPATH=src python -m pytest -q -p no:xdist tests/test_gpus.py
"""

from __future__ import annotations

import pytest

from gradckpt.errors import ConfigError
from gradckpt.estimate import GPU_PRESETS, get_gpu

RENTED = (
    "h100", "h100-pcie", "h100-nvl", "h200", "b200", "l40s", "a6000", "rtx-5090", "a10g", "l4",
    "t4", "mi300x", "a100-40gb", "a100-80gb", "rtx-4090",
)  # fmt: skip


@pytest.mark.parametrize("name", RENTED)
def test_every_rented_card_has_figures_and_a_source(name: str) -> None:
    g = GPU_PRESETS[name]
    assert g.has_speed and g.memory_bytes > 10 * 2**30
    assert len(g.source) > 40  # says where memory, TFLOPS and bandwidth come from


def test_ordering_of_the_figures_is_the_datasheets() -> None:
    p = GPU_PRESETS
    assert p["h200"].memory_bytes > p["h100-nvl"].memory_bytes > p["h100"].memory_bytes
    assert p["h100"].memory_bytes == p["h100-pcie"].memory_bytes
    assert p["h100"].bf16_tflops == p["h200"].bf16_tflops  # same Hopper die
    assert p["h200"].bandwidth_gbs > p["h100"].bandwidth_gbs > p["h100-pcie"].bandwidth_gbs
    assert p["b200"].bf16_tflops > p["mi300x"].bf16_tflops > p["h100"].bf16_tflops
    assert p["t4"].memory_bytes < p["l4"].memory_bytes < p["rtx-5090"].memory_bytes


def test_aliases_and_unknown_names() -> None:
    assert get_gpu("RTX-A6000") is GPU_PRESETS["a6000"] and get_gpu("5090").name == "rtx-5090"
    with pytest.raises(ConfigError, match="did you mean 'h200'"):
        get_gpu("h20O")
