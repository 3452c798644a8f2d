"""Named policies: one registry mapping a name (``"full"``, ``"every:2"``...) to a Plan maker."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .blocks import block_groups
from .errors import PolicyError
from .plans import Decision, Plan

__all__ = [
    "PolicySpec",
    "make_plan",
    "policy_aliases",
    "policy_names",
    "register_alias",
    "register_policy",
]

#: ``maker(block_names, arg, options) -> Plan``; ``arg`` is the text after ``:`` (``"2"`` in ``"every:2"``).
PlanMaker = Callable[[Sequence[str], "str | None", dict[str, Any]], Plan]


@dataclass(frozen=True)
class PolicySpec:
    """A named policy.

    Attributes:
        name: what users type (``"every"`` for ``"every:K"``).
        help: one line for ``--help`` and error messages.
        make: builds the Plan for a list of block names.
        arg: the argument's metavar (``"K"``) when the policy takes one, else ``None``.
        options: keyword options ``enable`` passes through (e.g. ``("save_ops",)``).
        exact: whether its gradients are bit-identical to no checkpointing (fp32, deterministic
            kernels); False for policies that reorder sums (``lean``: chunked loss, tiles),
            which are equal within ``verify``'s documented tolerance.
    """

    name: str
    help: str
    make: PlanMaker
    arg: str | None = None
    options: tuple[str, ...] = ()
    exact: bool = True

    @property
    def usage(self) -> str:
        return f"{self.name}:{self.arg}" if self.arg else self.name


_REGISTRY: dict[str, PolicySpec] = {}
#: Other tools' names for a registered policy: alias -> (policy, why it is the same thing).
_ALIASES: dict[str, tuple[str, str]] = {}

#: Options every policy takes, stored in ``Plan.options`` and read by the decision wrappers.
#: ``early_stop`` (bool, default True): torch's early stop of a recompute; False re-runs whole
#: blocks, so module hooks inside them run in the recompute too (see ``runtime.decisions.early_stop_option``).
COMMON_OPTIONS: tuple[str, ...] = ("early_stop",)


def register_policy(
    name: str,
    help: str,
    *,
    arg: str | None = None,
    options: tuple[str, ...] = (),
    exact: bool = True,
) -> Callable[[PlanMaker], PlanMaker]:
    """Decorator adding a policy to the registry; adding a policy touches only this call."""

    def deco(fn: PlanMaker) -> PlanMaker:
        _REGISTRY[name] = PolicySpec(name, help, fn, arg, options, exact)
        return fn

    return deco


def register_alias(alias: str, policy: str, why: str) -> None:
    """Let ``alias`` (another tool's name) select the registered ``policy``; ``why`` says why.

    An alias makes exactly the plan its policy makes (the plan says the policy's own name) and is
    not listed by ``policy_names()``, so sweeps over every policy do not run it twice.
    """
    if policy not in _REGISTRY:
        raise PolicyError(f"alias {alias!r}: no policy named {policy!r} is registered")
    if alias in _REGISTRY:
        raise PolicyError(f"alias {alias!r} would hide the policy of that name")
    _ALIASES[alias] = (policy, why)


def policy_aliases() -> dict[str, str]:
    """Other tools' names gradckpt accepts, and the policy each selects (``{"unsloth": "offload"}``)."""
    return {alias: target for alias, (target, _why) in _ALIASES.items()}


def policy_names(*, exact: bool | None = None) -> list[str]:
    """The policies users can ask for, as typed (``["none", "full", "every:K", ...]``).

    ``exact=True``: only those whose gradients are bit-identical to no checkpointing (every
    policy but ``lean``); ``exact=False``: only the others; None: all.
    """
    return [spec.usage for spec in _REGISTRY.values() if exact is None or spec.exact is exact]


def get_policy(policy: str) -> tuple[PolicySpec, str | None]:
    if not isinstance(policy, str):
        raise PolicyError(f"policy must be a name like 'full', got {type(policy).__name__}")
    name, sep, arg = policy.strip().partition(":")
    alias = _ALIASES.get(name.lower())
    spec = _REGISTRY.get(alias[0] if alias else name.lower())
    if spec is None:
        close = difflib.get_close_matches(name.lower(), [*_REGISTRY, *_ALIASES], n=1)
        hint = ""
        if close:
            hint = f" (did you mean {(_REGISTRY[close[0]].usage if close[0] in _REGISTRY else close[0])!r}?)"
        raise PolicyError(
            f"unknown policy {policy!r}{hint}; valid policies: {', '.join(policy_names())}"
        )
    if spec.arg and not sep:
        raise PolicyError(f"policy {spec.name!r} needs an argument: write {spec.usage!r}")
    if not spec.arg and sep:
        raise PolicyError(f"policy {spec.name!r} takes no argument, got {policy!r}")
    return spec, (arg if sep else None)


def make_plan(policy: str, block_names: Sequence[str], **options: Any) -> Plan:
    """Build the Plan named ``policy`` for blocks ``block_names``.

    Example:
        >>> make_plan("every:2", ["l.0", "l.1", "l.2"]).decisions
        (Decision.RECOMPUTE, Decision.SAVE, Decision.RECOMPUTE)
    """
    spec, arg = get_policy(policy)
    common = {k: options.pop(k) for k in COMMON_OPTIONS if k in options}
    for k, v in common.items():
        if not isinstance(v, bool):
            raise PolicyError(f"{k} must be True or False, got {v!r}")
    unknown = set(options) - set(spec.options)
    if unknown:
        allowed = ", ".join((*spec.options, *COMMON_OPTIONS))
        raise PolicyError(
            f"policy {spec.name!r} does not take option(s) {', '.join(sorted(unknown))}; it takes: {allowed}"
        )
    plan = spec.make(list(block_names), arg, dict(options))
    if common:
        plan = replace(plan, options={**plan.options, **common})
    return plan


def _uniform(names: Sequence[str], decision: Decision, policy: str) -> Plan:
    return Plan(tuple(names), tuple(decision for _ in names), policy=policy)


@register_policy("none", "no checkpointing: keep every activation (fastest, most memory)")
def _none(names: Sequence[str], arg: str | None, options: dict[str, Any]) -> Plan:
    return _uniform(names, Decision.SAVE, "none")


@register_policy("full", "recompute every block during backward (keeps only block inputs)")
def _full(names: Sequence[str], arg: str | None, options: dict[str, Any]) -> Plan:
    return _uniform(names, Decision.RECOMPUTE, "full")


def _positive_int(arg: str | None, policy: str) -> int:
    try:
        k = int(arg or "")
    except ValueError:
        raise PolicyError(f"{policy}: K must be an integer >= 1, got {arg!r}") from None
    if k < 1:
        raise PolicyError(f"{policy}: K must be >= 1 (every:1 is full), got {k}")
    return k


@register_policy(
    "every", "recompute one block in every K of each block list (every:1 == full)", arg="K"
)
def _every(names: Sequence[str], arg: str | None, options: dict[str, Any]) -> Plan:
    # Counted within each list (block_groups): the first block of every list is recomputed,
    # so T5's decoder gets the same pattern as its encoder whatever the encoder's length.
    k = _positive_int(arg, f"every:{arg}")
    decisions = [Decision.SAVE] * len(names)
    for start, stop in block_groups(names):
        for i in range(start, stop, k):
            decisions[i] = Decision.RECOMPUTE
    return Plan(tuple(names), tuple(decisions), policy=f"every:{k}")


def sqrt_segments(n: int) -> tuple[tuple[int, int], ...]:
    """Split ``n`` blocks into about sqrt(n) runs of consecutive blocks (Chen et al. 2016).

    Sizes differ by at most one, longer runs first: 8 blocks -> (0, 3), (3, 6), (6, 8).
    """
    if n <= 0:
        return ()
    k = max(1, round(math.sqrt(n)))
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return tuple(out)


@register_policy(
    "sqrt",
    "group each block list into ~sqrt(N) segments, each checkpointed as one unit (Chen et al. 2016)",
)
def _sqrt(names: Sequence[str], arg: str | None, options: dict[str, Any]) -> Plan:
    # A segment replays its blocks one after another from the first one's input, so it cannot
    # span two lists (T5's decoder.block.0 does not take encoder.block.3's output): sqrt(N)
    # per list (block_groups), N that list's length. A list of one block is checkpointed alone.
    segs = tuple(
        (start + a, start + b)
        for start, stop in block_groups(names)
        for a, b in sqrt_segments(stop - start)
        if b - a >= 2
    )
    return Plan(
        tuple(names), tuple(Decision.RECOMPUTE for _ in names), segments=segs, policy="sqrt"
    )
