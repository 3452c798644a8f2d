"""Vision-language models in an estimate: the image tokens and pixel inputs of one training step.

A VLM step runs the vision tower on each image's patches, projects them into the language
model's embedding space and puts them in the sequence in place of the image tokens. Its memory
therefore depends on the image size where the tower takes images as they come (Qwen2-VL,
Qwen2.5-VL) or cuts them into tiles (Idefics3, SmolVLM), and on the number of image tokens where
the processor resizes every image to the tower's resolution (LLaVA, PaliGemma, Gemma 3).

``image_layout`` tells, per family, what the processor makes of an image of a given size (the
tokens it takes in the sequence, the pixel tensor the tower reads); ``step_inputs`` builds one
batch of them for the fake step; ``RealIndexMath`` lets the model's index arithmetic (image grids,
token positions, the 3-D rotary positions of Qwen2-VL) run on real values while every activation
stays a fake tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from ..errors import ConfigError

__all__ = [
    "FAMILIES",
    "ImageLayout",
    "RealIndexMath",
    "image_layout",
    "image_tokens",
    "layout_note",
    "check_images",
    "is_vlm",
    "parse_image_size",
    "step_inputs",
    "text_config",
]

#: VLM families the estimate models: model_type -> how its processor treats an image
FAMILIES = {
    "llava": "resized to the tower's resolution",
    "paligemma": "resized to the tower's resolution",
    "gemma3": "resized to the tower's resolution, pooled to mm_tokens_per_image",
    "qwen2_vl": "kept near its size (multiples of 28 px, at most 12.8 Mpx)",
    "qwen2_5_vl": "kept near its size (multiples of 28 px, at most 12.8 Mpx)",
    "idefics3": "cut into tiles of the tower's resolution plus one global view",
    "smolvlm": "cut into tiles of the tower's resolution plus one global view",
}

# Qwen2-VL's and Qwen2.5-VL's image processor defaults (preprocessor_config.json)
_QWEN_MIN_PIXELS = 56 * 56
_QWEN_MAX_PIXELS = 28 * 28 * 16384
# Idefics3's and SmolVLM's processors resize the longest edge to 4 tiles before cutting
_TILES_PER_EDGE = 4
#: a factory op (no tensor input) up to this many elements runs on real values (index math)
REAL_FACTORY_NUMEL = 1 << 20


def is_vlm(cfg: Any) -> bool:
    """Whether ``cfg`` is a vision-language model's config (a text and a vision config)."""
    return getattr(cfg, "vision_config", None) is not None and hasattr(cfg, "text_config")


def text_config(cfg: Any) -> Any:
    """The language model's config: ``cfg.text_config`` for a VLM, else ``cfg`` itself."""
    return cfg.text_config if is_vlm(cfg) else cfg


def parse_image_size(value: Any) -> tuple[int, int]:
    """``(height, width)`` in pixels from ``448``, ``"448"``, ``"448x336"`` or ``(448, 336)``.

    Raises:
        ConfigError: anything else, or a side < 1.
    """
    sides: Any = value
    if isinstance(value, str):
        sides = value.lower().replace("×", "x").split("x")
        try:
            sides = [int(s.strip()) for s in sides]
        except ValueError:
            sides = None
    elif isinstance(value, int) and not isinstance(value, bool):
        sides = [value]
    elif isinstance(value, (tuple, list)):
        sides = list(value)
    ok = (
        isinstance(sides, list)
        and len(sides) in (1, 2)
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sides)
    )
    if not ok:
        raise ConfigError(
            f"image size must be pixels, one side (448) or height x width ('448x336'), got {value!r}"
        )
    return (sides[0], sides[-1])


@dataclass(frozen=True)
class ImageLayout:
    """What a family's processor makes of one image of the given size.

    Attributes:
        tokens: image tokens the image takes in the sequence.
        pixels: the image's pixel tensor shape, as the processor returns it (per image, or per
            patch row for Qwen2-VL: ``(patches, channels * temporal * patch * patch)``).
        grid: Qwen2-VL's ``image_grid_thw`` row ``(1, rows, cols)`` of patches; else None.
        tiles: Idefics3/SmolVLM: tiles the image is cut into (global view included); else 1.
        how: one line telling it.
    """

    tokens: int
    pixels: tuple[int, ...]
    grid: tuple[int, int, int] | None
    tiles: int
    how: str


def _image_token(cfg: Any) -> int:
    for key in ("image_token_id", "image_token_index"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    raise ConfigError(
        f"{type(cfg).__name__} names no image token (image_token_id); cannot place images"
    )


def _qwen_resize(h: int, w: int, factor: int) -> tuple[int, int]:
    """Qwen2-VL's ``smart_resize``: sides rounded to multiples of ``factor``, pixels bounded."""
    if max(h, w) / min(h, w) > 200:
        raise ConfigError(f"image {h}x{w}: Qwen2-VL's processor refuses aspect ratios over 200")
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > _QWEN_MAX_PIXELS:
        beta = math.sqrt(h * w / _QWEN_MAX_PIXELS)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < _QWEN_MIN_PIXELS:
        beta = math.sqrt(_QWEN_MIN_PIXELS / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def image_layout(cfg: Any, size: tuple[int, int]) -> ImageLayout:
    """What ``cfg``'s processor makes of an image of ``size = (height, width)`` pixels.

    Raises:
        ConfigError: a family the estimate does not model (``FAMILIES`` lists those it does).
    """
    kind = cfg.model_type
    v = cfg.vision_config
    h, w = size
    channels = int(getattr(v, "num_channels", None) or getattr(v, "in_channels", None) or 3)
    if kind in ("llava", "paligemma", "gemma3"):
        s, p = int(v.image_size), int(v.patch_size)
        tokens = (s // p) ** 2
        if kind == "llava" and getattr(cfg, "vision_feature_select_strategy", "default") == "full":
            tokens += 1  # the class token is kept
        if kind == "gemma3":
            tokens = int(cfg.mm_tokens_per_image)
        how = f"resized to {s}x{s} by the processor: {tokens} image tokens whatever its size"
        return ImageLayout(tokens, (channels, s, s), None, 1, how)
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        p, m, tp = int(v.patch_size), int(v.spatial_merge_size), int(v.temporal_patch_size)
        hb, wb = _qwen_resize(h, w, p * m)
        rows, cols = hb // p, wb // p
        tokens = rows * cols // (m * m)
        how = (
            f"resized to {hb}x{wb} (multiples of {p * m} px): {rows}x{cols} patches of {p} px, "
            f"merged {m}x{m} into {tokens} image tokens"
        )
        return ImageLayout(tokens, (rows * cols, channels * tp * p * p), (1, rows, cols), 1, how)
    if kind in ("idefics3", "smolvlm"):
        s, p = int(v.image_size), int(v.patch_size)
        edge = _TILES_PER_EDGE * s
        scale = edge / max(h, w)
        rows = math.ceil(round(h * scale) / s)
        cols = math.ceil(round(w * scale) / s)
        tiles = rows * cols + (1 if rows * cols > 1 else 0)
        per_tile = (s // p) ** 2 // int(cfg.scale_factor) ** 2
        how = (
            f"with its longest edge resized to {edge} px cut into {rows}x{cols} tiles of {s} px"
            + (" plus one global view" if tiles > rows * cols else "")
            + f": {tiles} x {per_tile} = {tiles * per_tile} image tokens"
        )
        return ImageLayout(tiles * per_tile, (channels, s, s), None, tiles, how)
    raise ConfigError(
        f"{type(cfg).__name__} ({kind}) is a vision-language model the estimate does not model "
        f"yet (it models {', '.join(FAMILIES)}); estimate its language model from its "
        "text_config (config.text_config.to_json_file('text.json'))"
    )


def _text_ids(g: torch.Generator, shape: tuple[int, int], vocab: int, special: set[int]) -> Any:
    ids = torch.randint(0, vocab, shape, generator=g)
    filler = next(i for i in range(vocab) if i not in special)
    for s in special:
        ids[ids == s] = filler
    return ids


def step_inputs(
    model: Any, cfg: Any, size: tuple[int, int], images: int, batch: int, seq: int, vocab: int
) -> dict[str, Any]:
    """One batch for a VLM step: ``images`` images of ``size`` per sequence of ``seq`` tokens.

    Token ids, labels, grids and masks are real tensors (the model's index math reads them;
    ``RealIndexMath`` runs it); pixel values are real too (Idefics3 looks for padding images in
    them). Each row holds its images first, then text; the labels leave image tokens out (-100),
    as TRL's collators do.

    ``check_images`` has checked that they leave room for text.
    """
    lay = image_layout(cfg, size)
    kind = cfg.model_type
    image = _image_token(cfg)
    start = getattr(cfg, "vision_start_token_id", None)
    end = getattr(cfg, "vision_end_token_id", None)
    marks = 2 if kind in ("qwen2_vl", "qwen2_5_vl") else 0  # <|vision_start|> ... <|vision_end|>
    g = torch.Generator().manual_seed(0)
    special = {t for t in (image, start, end) if isinstance(t, int)}
    ids = _text_ids(g, (batch, seq), vocab, special)
    at = 1
    for _ in range(images):
        if marks:
            ids[:, at] = start
            at += 1
        ids[:, at : at + lay.tokens] = image
        at += lay.tokens
        if marks:
            ids[:, at] = end
            at += 1
    labels = ids.clone()
    labels[ids == image] = -100
    out: dict[str, Any] = {"input_ids": ids, "labels": labels}
    n = batch * images
    if lay.grid is not None:
        out["pixel_values"] = torch.randn(n * lay.pixels[0], lay.pixels[1], generator=g)
        out["image_grid_thw"] = torch.tensor([lay.grid] * n)
        if "mm_token_type_ids" in _forward_args(model):
            out["mm_token_type_ids"] = (ids == image).long()
    elif lay.tiles > 1 or kind in ("idefics3", "smolvlm"):
        out["pixel_values"] = torch.randn(batch, images * lay.tiles, *lay.pixels, generator=g)
        out["pixel_attention_mask"] = torch.ones(
            batch, images * lay.tiles, *lay.pixels[1:], dtype=torch.bool
        )
    else:
        out["pixel_values"] = torch.randn(n, *lay.pixels, generator=g)
    if "token_type_ids" in _forward_args(model):
        # Gemma 3: 1 on image tokens (bidirectional attention among them); PaliGemma: 0 on the
        # prefix (here the image), 1 on the suffix it learns
        is_image = (ids == image).long()
        out["token_type_ids"] = is_image if kind == "gemma3" else 1 - is_image
    return out


def layout_note(cfg: Any, size: tuple[int, int], images: int, seq: int) -> str:
    """One line for the report: what each sequence of the step holds."""
    lay = image_layout(cfg, size)
    return (
        f"vision-language model ({cfg.model_type}): {images} image(s) of {size[0]}x{size[1]} px "
        f"per sequence, each {lay.how}; the vision tower is its own block list, planned with the "
        f"same policy; the rest of the {seq} tokens are text"
    )


def _forward_args(model: Any) -> set[str]:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    return set(inspect.signature(type(inner).forward).parameters)


class RealIndexMath(TorchDispatchMode):
    """Run ops whose tensor inputs are all real on real values, inside ``FakeTensorMode``.

    A VLM reads values of its inputs: Qwen2-VL takes sequence lengths from ``image_grid_thw``
    (``.tolist()``) and finds images in the token ids to build its 3-D rotary positions;
    Idefics3 finds padding images in the pixels. Those ops see real tensors only (the ids, the
    grid and what is computed from them, and small factory outputs such as ``arange``), so they
    run for real; anything touching a fake tensor (a parameter, an activation) goes on to the
    fake mode. Enter it inside the ``FakeTensorMode`` (with ``allow_non_fake_inputs``), below
    any tracker, which then sees every op's output, real or fake.
    """

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if any(isinstance(a, FakeTensor) for a in tensors):
            return func(*args, **kwargs)
        if not tensors:  # a factory: real when small (positions, ranges), else fake
            out = func(*args, **kwargs)
            made = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            if sum(o.numel() for o in made) > REAL_FACTORY_NUMEL:
                return out
        with _disable_current_modes():
            return func(*args, **kwargs)


def image_tokens(cfg: Any, size: tuple[int, int], images: int) -> int:
    """Tokens ``images`` images of ``size`` take in each sequence (Qwen2-VL's start/end marks too)."""
    marks = 2 if cfg.model_type in ("qwen2_vl", "qwen2_5_vl") else 0
    return images * (image_layout(cfg, size).tokens + marks)


def check_images(
    cfg: Any, name: str, size: tuple[int, int] | None, images: int, seq: int
) -> str | None:
    """Check a setup's images against the model: the report's note for a VLM, None for a text model.

    Raises:
        ConfigError: a VLM without an image size, an image size for a text model, a family not
            modelled, or images taking the whole sequence.
    """
    if not is_vlm(cfg):
        if size is not None:
            raise ConfigError(
                f"{name} is a text model: an image size is for vision-language models; leave it out"
            )
        return None
    if size is None:
        raise ConfigError(
            f"{name} is a vision-language model: its step depends on the images; give their size "
            "(--image-size 448 or 448x336; image_size=) and how many per sequence (--images, default 1)"
        )
    lay = image_layout(cfg, size)
    per_seq = image_tokens(cfg, size, images)
    if per_seq >= seq:
        raise ConfigError(
            f"{images} image(s) of {size[0]}x{size[1]} take {per_seq} tokens of each sequence "
            f"({lay.how}), leaving no text in a sequence of {seq}: use a longer sequence, fewer "
            "or smaller images"
        )
    return layout_note(cfg, size, images, seq)
