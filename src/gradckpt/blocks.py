"""Find the repeated blocks of a model: the units that a plan checkpoints one by one."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Union

from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from .errors import BlockError

__all__ = ["BlockSpec", "block_groups", "find_blocks", "resolve_blocks"]

#: What ``enable(..., blocks=...)`` accepts: qualified names, or a predicate ``(name, module) -> bool``.
BlockSpec = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]  # noqa: UP007 (runtime alias, py3.10)

# A second list of blocks (the decoder next to an encoder) is kept when it holds at least this
# share of the largest list's parameters, or when its blocks are of the same class. BART-base's
# encoder holds 43% of its layers' parameters, T5's 40%; a list of 2 classifier heads holds ~0%.
_SECOND_LIST_SHARE = 0.25

# transformers (>= 4.52) derives every layer it checkpoints itself from this class
# (transformers/modeling_layers.py); found by name so that gradckpt never imports transformers.
_HF_LAYER_CLASS = ("GradientCheckpointingLayer", "transformers.modeling_layers")


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_hf_layer(module: nn.Module) -> bool:
    return any((c.__name__, c.__module__) == _HF_LAYER_CLASS for c in type(module).__mro__)


def _hf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost modules transformers itself checkpoints (``GradientCheckpointingLayer``).

    Outermost only: Zamba2's hybrid layer holds a Mamba layer of that class too, and a block
    cannot contain another. Empty when transformers was never imported (no module can be one).
    """
    if "transformers.modeling_layers" not in sys.modules:
        return []
    out: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        # named_modules() is pre-order: a module's descendants follow it directly.
        if out and _within(name, out[-1][0]):
            continue
        if name and _is_hf_layer(mod):
            out.append((name, mod))
    return out


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """Every ModuleList/Sequential whose children are all of one class and hold parameters.

    One child is enough: a 1-layer model still has a block list. A weight-norm
    parametrization (``parametrizations.weight``, a ModuleList holding the weight itself, as in
    wav2vec2's positional convolution) is not a list of blocks.
    """
    found: list[tuple[str, nn.Module, int]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or isinstance(
            mod, ParametrizationList
        ):
            continue
        children = list(mod.children())
        if not children or len({type(c) for c in children}) != 1:
            continue
        n = sum(_numel(c) for c in children)
        if n > 0:
            found.append((name, mod, n))
    return found


def _attention_blocks(mod: nn.Module) -> bool:
    """Whether every child of a list holds an attention module: a tower of transformer blocks.

    A vision tower is small next to its language model (SmolVLM's SigLIP encoder: ~93M of
    ~2.2B parameters, 4%), so the share rule alone drops it; what tells its list from a list of
    classifier heads is that each entry holds an attention module (a class named
    ``...Attention``: CLIPAttention, SiglipAttention, torch's MultiheadAttention).
    """
    children = list(mod.children())
    return bool(children) and all(
        any("Attention" in type(m).__name__ for m in c.modules() if m is not c) for c in children
    )


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _called_children(name: str, mod: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of a block list as blocks; a child that is itself a ModuleList/ModuleDict
    (Funnel's ``encoder.blocks``, a list of lists of layers) is never called, so its own
    children are the blocks (overriding a ModuleList's ``forward`` would checkpoint nothing)."""
    out: list[tuple[str, nn.Module]] = []
    for child_name, child in mod.named_children():
        full = _join(name, child_name)
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out.extend(_called_children(full, child))
        else:
            out.append((full, child))
    return out


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the repeated blocks of ``model`` as ``[(qualified_name, module), ...]``.

    Where the model marks the layers it checkpoints itself (transformers' layers derive from
    ``transformers.modeling_layers.GradientCheckpointingLayer``), those are the blocks: all of
    them, in every list (encoder and decoder, vision tower and language model), whatever
    their classes (the attention and Mamba layers of Jamba or Zamba2). Layers of your own
    next to them are not added: name them all with ``enable(..., blocks=...)``.

    Otherwise the rule is general, not a table per model family: the ``nn.ModuleList`` or
    ``nn.Sequential`` of same-class children holding the most parameters is the block list
    (``model.layers`` of Llama, ``transformer.h`` of GPT-2, ``encoder.layer`` of BERT).
    Further lists that are not nested in it are added when their blocks are of the same
    class, hold a comparable share of parameters (the decoder of an encoder-decoder model), or
    each hold an attention module (a vision-language model's vision tower, however small).
    A list of lists contributes the inner lists' modules.

    ``block_groups`` on the returned names says which list each block belongs to.

    Args:
        model: any ``nn.Module``.

    Returns:
        The blocks in the order they are registered (usually execution order).

    Raises:
        BlockError: when the model has no repeated blocks; pass ``blocks=`` to ``enable``.

    Example:
        >>> [name for name, _ in gradckpt.find_blocks(llama)][:2]
        ['model.layers.0', 'model.layers.1']
    """
    if not isinstance(model, nn.Module):
        raise BlockError(f"find_blocks needs an nn.Module, got {type(model).__name__}")
    marked = _hf_layers(model)
    if marked:
        return marked
    cands = sorted(_candidates(model), key=lambda c: -c[2])
    if not cands:
        raise BlockError(
            f"{type(model).__name__} has no repeated blocks (no ModuleList/Sequential of "
            "same-class modules with parameters); pass blocks=[names] or "
            "blocks=lambda name, module: ... to enable()"
        )
    top_name, top_mod, top_n = cands[0]
    top_cls = type(next(iter(top_mod.children())))
    chosen = [(top_name, top_mod)]
    for name, mod, n in cands[1:]:
        if any(_within(name, c) or _within(c, name) for c, _ in chosen):
            continue
        same_cls = type(next(iter(mod.children()))) is top_cls
        if same_cls or n >= _SECOND_LIST_SHARE * top_n or _attention_blocks(mod):
            chosen.append((name, mod))
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    chosen.sort(key=lambda c: order[id(c[1])])
    out: list[tuple[str, nn.Module]] = []
    for name, mod in chosen:
        out.extend(_called_children(name, mod))
    return out


def _list_of(name: str) -> str:
    """The block list a block named ``name`` belongs to: its parent when it is a list entry
    (``"decoder.block.3"`` -> ``"decoder.block"``), else the block itself (a list of one)."""
    parent, _, last = name.rpartition(".")
    return parent if last.isdigit() else name


def block_groups(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Split block names into the lists they come from, as ``(start, stop)`` index ranges.

    A group is a run of consecutive names with the same parent list: ``encoder.block.*`` and
    ``decoder.block.*`` of T5 are two groups, and so are each of Funnel's inner lists. Policies
    that count blocks (``every:K``) or join them into segments (``sqrt``) do so within a
    group, because one list's last block does not feed the next list's first (T5's decoder
    takes the encoder's output as cross-attention input, not as its hidden state). Pure: works
    on names alone, so plans can be made without a model.

    Example:
        >>> block_groups(["enc.0", "enc.1", "dec.0", "dec.1", "dec.2"])
        ((0, 2), (2, 5))
    """
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or _list_of(names[i]) != _list_of(names[start]):
            out.append((start, i))
            start = i
    return tuple(out) if names else ()


def resolve_blocks(model: nn.Module, blocks: BlockSpec = None) -> list[tuple[str, nn.Module]]:
    """Turn ``enable``'s ``blocks=`` argument into ``[(name, module)]`` (default: ``find_blocks``)."""
    if blocks is None:
        return find_blocks(model)
    modules = dict(model.named_modules())
    if callable(blocks) and not isinstance(blocks, str):
        pred = blocks
        out: list[tuple[str, nn.Module]] = []
        for name, mod in model.named_modules():
            if name == "" or any(_within(name, c) for c, _ in out):
                continue
            if pred(name, mod):
                out.append((name, mod))
        if not out:
            raise BlockError(
                "the blocks= predicate matched no module; check it against model.named_modules()"
            )
        return out
    if not isinstance(blocks, (str, Iterable)):
        raise BlockError(
            f"blocks= must be module names or a predicate (name, module) -> bool, got {type(blocks).__name__}"
        )
    names = [blocks] if isinstance(blocks, str) else list(blocks)
    if not names:
        raise BlockError(
            "blocks= is empty; name at least one module or leave it out to find blocks"
        )
    out = []
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise BlockError(f"blocks= must hold module names (str), got {type(name).__name__}")
        if name not in modules or name == "":
            hint = ", ".join(n for n, _ in _suggest(model))
            raise BlockError(
                f"no module named {name!r} in {type(model).__name__}; blocks found: {hint}"
            )
        if name in seen:
            raise BlockError(f"block {name!r} is named twice in blocks=")
        seen.add(name)
        out.append((name, modules[name]))
    for a, _ in out:
        for b, _ in out:
            if a != b and _within(b, a):
                raise BlockError(
                    f"blocks {a!r} and {b!r} are nested; a block cannot contain another"
                )
    return out


def _suggest(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        found = find_blocks(model)
    except BlockError:
        return [(n, m) for n, m in model.named_children()][:6]
    return found[:3] + ([("...", nn.Identity())] if len(found) > 3 else [])
