"""What ``policy="selective"`` keeps: op groups by name, ``save_ops``/``preset`` validation, the policy maker.

Pure option handling (plans store op *names*; ``resolve_save_ops`` turns them into aten ops
when a block is wrapped), split from ``selective.py``, which holds the runtime.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import PolicyError
from ..plans import Decision, Plan

__all__ = [
    "DEFAULT_SAVE_OPS",
    "OP_GROUPS",
    "POLICY_HELP",
    "POLICY_OPTIONS",
    "PRESETS",
    "normalize_save_ops",
    "resolve_save_ops",
    "selective_options",
    "selective_policy",
]

aten = torch.ops.aten

#: Named groups of aten ops that ``save_ops`` accepts by name.
OP_GROUPS: dict[str, tuple[str, ...]] = {
    # Everything a Linear or a matmul lowers to (linear -> mm/addmm, batched matmul -> bmm),
    # plus the grouped and scaled variants MoE experts and float8 training use.
    "mm": (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "addbmm",
        "mv",
        "addmv",
        "_grouped_mm",
        "_scaled_mm",
        "_scaled_grouped_mm",
        "_int_mm",
    ),
    # The fused attention kernels scaled_dot_product_attention dispatches to on each device.
    "attention": (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_flash_attention_forward",
        "_efficient_attention_forward",
        "_cudnn_attention_forward",
    ),
}
_ALIASES = {"matmul": "mm", "linear": "mm", "sdpa": "attention"}

#: What ``policy="selective"`` keeps when ``save_ops`` is not given.
DEFAULT_SAVE_OPS: tuple[str, ...] = ("mm", "attention")

#: ``default``: keep ``save_ops`` (matmuls and attention), recompute the rest.
#: ``megatron``: keep everything except the attention core, which is recomputed.
PRESETS: tuple[str, ...] = ("default", "megatron")

# -- naming the ops to keep (pure; plans store names, not op objects) -----------------------


def _op_name(op: Any) -> str:
    if isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(op)  # "aten.mm.default" / "aten.mm"
    if isinstance(op, str):
        name = op.strip()
        name = name.removeprefix("torch.ops.").replace("::", ".")
        low = name.lower()
        if low in OP_GROUPS or low in _ALIASES:
            return _ALIASES.get(low, low)
        if "." not in name:
            name = f"aten.{name}"
        _lookup(name)  # validate now, so a typo fails at enable(), not in the middle of a step
        return name
    raise PolicyError(
        f"save_ops entries are op names ('mm', 'attention', 'aten.gelu') or torch.ops.aten "
        f"ops, got {type(op).__name__}"
    )


def _lookup(name: str) -> torch._ops.OpOverload | torch._ops.OpOverloadPacket:
    parts = name.split(".")
    if len(parts) not in (2, 3):
        raise PolicyError(
            f"save_ops: {name!r} is not an op name like 'aten.mm' or 'aten.mm.default'"
        )
    ns = getattr(torch.ops, parts[0], None)
    packet = getattr(ns, parts[1], None) if ns is not None else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        choices = [
            *OP_GROUPS,
            *_ALIASES,
            *(f"aten.{n}" for n in dir(aten) if not n.startswith("__")),
        ]
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PolicyError(
            f"save_ops: no op named {name!r}{hint}; give a group ({', '.join(OP_GROUPS)}) or an "
            "aten op such as 'aten.gelu'"
        )
    if len(parts) == 2:
        return packet
    overload = getattr(packet, parts[2], None)
    if not isinstance(overload, torch._ops.OpOverload):
        raise PolicyError(
            f"save_ops: {parts[0]}.{parts[1]} has no overload {parts[2]!r}; "
            f"overloads: {', '.join(packet.overloads())}"
        )
    return overload


def normalize_save_ops(save_ops: Any) -> list[str]:
    """Turn what users write for ``save_ops`` into the names a Plan stores (JSON-friendly).

    Args:
        save_ops: ``None`` (the default set), a group name (``"mm"``, ``"attention"``), an op
            name (``"gelu"``, ``"aten.gelu"``, ``"aten::gelu.default"``), a ``torch.ops.aten``
            op or overload, or a list of these.

    Returns:
        Canonical names: groups as ``"mm"``, ops as ``"aten.gelu"`` or ``"aten.gelu.default"``.

    Example:
        >>> normalize_save_ops(["matmul", torch.ops.aten.gelu.default])
        ['mm', 'aten.gelu.default']
    """
    if save_ops is None:
        return list(DEFAULT_SAVE_OPS)
    if isinstance(save_ops, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        save_ops = [save_ops]
    if not isinstance(save_ops, Iterable) or isinstance(save_ops, Mapping):
        raise PolicyError(
            f"save_ops must be a list of op names or ops, got {type(save_ops).__name__}"
        )
    return list(dict.fromkeys(_op_name(op) for op in save_ops))


def resolve_save_ops(names: Sequence[str]) -> frozenset[Any]:
    """The op overloads and packets named by ``normalize_save_ops`` output.

    Example:
        >>> torch.ops.aten.mm in resolve_save_ops(["mm"])
        True
    """
    out: set[Any] = set()
    for name in names:
        group = OP_GROUPS.get(_ALIASES.get(name, name))
        if group is not None:
            out.update(getattr(aten, n) for n in group if hasattr(aten, n))
        else:
            out.add(_lookup(name))
    return frozenset(out)


def selective_options(options: Mapping[str, Any]) -> dict[str, Any]:
    preset = options.get("preset") or "default"
    if preset not in PRESETS:
        raise PolicyError(f"selective: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    if preset == "megatron":
        if options.get("save_ops") is not None:
            raise PolicyError(
                "selective: preset='megatron' keeps everything but the attention core; "
                "it takes no save_ops (drop one of them)"
            )
        return {"preset": "megatron"}
    return {"preset": "default", "save_ops": normalize_save_ops(options.get("save_ops"))}


#: The ``selective`` policy's help line and options (registered by ``runtime.builtin``).
POLICY_HELP = (
    "checkpoint every block but keep matmul and attention outputs (recompute only pointwise "
    "ops, norms, softmax); save_ops=[...] or preset='megatron'"
)
POLICY_OPTIONS = ("save_ops", "preset")


def selective_policy(names: Sequence[str], arg: str | None, options: dict[str, Any]) -> Plan:
    return Plan(
        tuple(names),
        tuple(Decision.SELECTIVE for _ in names),
        policy="selective",
        options=selective_options(options),
    )
