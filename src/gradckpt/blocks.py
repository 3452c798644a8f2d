"""Find the repeated blocks of a model: the units that a plan checkpoints one by one."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Union

from torch import nn

from .errors import BlockError

__all__ = ["BlockSpec", "find_blocks", "resolve_blocks"]

#: What ``enable(..., blocks=...)`` accepts: qualified names, or a predicate ``(name, module) -> bool``.
BlockSpec = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]  # noqa: UP007 (runtime alias, py3.10)

# A second list of blocks (the decoder next to an encoder) is kept when it holds at least this
# share of the largest list's parameters, or when its blocks are of the same class. BART-base's
# encoder holds 43% of its layers' parameters, T5's 40%; a list of 2 classifier heads holds ~0%.
_SECOND_LIST_SHARE = 0.25


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """Every ModuleList/Sequential whose children are all of one class and hold parameters.

    One child is enough: a 1-layer model still has a block list.
    """
    found: list[tuple[str, nn.Module, int]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(mod.children())
        if not children or len({type(c) for c in children}) != 1:
            continue
        n = _numel(mod)
        if n > 0:
            found.append((name, mod, n))
    return found


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the repeated blocks of ``model`` as ``[(qualified_name, module), ...]``.

    The rule is general, not a table per model family: the ``nn.ModuleList`` or
    ``nn.Sequential`` of same-class children holding the most parameters is the block list
    (``model.layers`` of Llama, ``transformer.h`` of GPT-2, ``encoder.layer`` of BERT).
    Further lists that are not nested in it are added when their blocks are of the same
    class or hold a comparable share of parameters (the decoder of an encoder-decoder model).

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
        if same_cls or n >= _SECOND_LIST_SHARE * top_n:
            chosen.append((name, mod))
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    chosen.sort(key=lambda c: order[id(c[1])])
    out: list[tuple[str, nn.Module]] = []
    for name, mod in chosen:
        for child_name, child in mod.named_children():
            out.append((f"{name}.{child_name}" if name else child_name, child))
    return out


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
