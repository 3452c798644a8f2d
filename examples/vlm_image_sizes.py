"""How a VLM fine-tune's peak moves with its images: a markdown table of `gradckpt.estimate`.

Qwen2-VL 7B (images kept near their size: tokens grow with pixels) and LLaVA-1.5 7B (every image
resized to 336x336: 576 tokens), LoRA, 4096-token sequences, `none` and `full`, speed on an
RTX 4090. Predictions from configs, no weights or GPU (about a minute on 2 CPU cores).

Run: .venv/bin/python examples/vlm_image_sizes.py
"""

from __future__ import annotations

import gradckpt
from gradckpt.estimate import resolve_model
from gradckpt.estimate.vision import image_layout, parse_image_size

ROWS = [
    ("qwen2-vl-7b", "448", 1),
    ("qwen2-vl-7b", "1024x768", 1),
    ("qwen2-vl-7b", "1024x768", 2),
    ("qwen2-vl-7b", "1792x1344", 1),
    ("llava-1.5-7b", "1024x768", 1),
]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    print(
        "| model | images per sequence | image tokens | `none` peak | `full` peak | `full` speed cost |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for model, size, n in ROWS:
        report = gradckpt.estimate(
            model,
            method="lora",
            seq=4096,
            image_size=size,
            images=n,
            policies=["none", "full"],
            gpu="rtx-4090",
            alternatives=False,
        )
        tokens = image_layout(resolve_model(model).config, parse_image_size(size)).tokens * n
        none, full = report.result("none"), report.result("full")
        print(
            f"| {model} | {n} x {size} | {tokens} | {_gib(none.peak_bytes)} | "
            f"{_gib(full.peak_bytes)} | {full.speed_cost:+.1%} |"
        )


if __name__ == "__main__":
    main()
