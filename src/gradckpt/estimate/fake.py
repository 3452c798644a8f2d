"""Run the real model code on fake tensors and record a memory/FLOP timeline of one training step.

The model is a Hugging Face ``transformers`` class built from its config on the meta device,
set up for training (LoRA via peft, NF4 for QLoRA) and moved to ``FakeTensorMode``: parameters
and activations have shapes, dtypes and storages but no data, so a 70B model costs no memory.
One forward+backward runs under a dispatch mode that tracks live storage bytes the way
``gradckpt.measure`` does (every storage from the op that creates it until Python frees it;
the model's own tensors are the baseline), and also cuts the step into intervals at block
boundaries (forward of block i, backward of block i), keeping for each interval its peak, the
composition of live bytes at that peak (activations kept from forward, logits/loss, gradients,
backward temporaries) and the FLOPs and bytes of every op.

Blocks of a decoder are identical, so the timeline of an L-block model is the timeline of a
few-block model with its middle blocks repeated. ``estimate`` therefore runs the first period of
blocks, one more period (one block each for ``none``/``full``, K for ``every:K``) and the last
block, and replays the second period to reach L blocks; the result equals a full-depth run byte
for byte (checked in tests). Plans that are not periodic (``sqrt`` segments, planner plans)
run at full depth.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..checkpoint import is_recomputing
from ..errors import ConfigError, GradCkptError
from ..measure import count_flops
from ..plan import Decision, Plan
from .setup import TrainingSetup, apply_method, optimizer_state_bytes

__all__ = [
    "FakeSession",
    "StepProfile",
    "Timeline",
    "block_names_at_depth",
    "clear_cache",
    "get_session",
    "keep_only",
    "layer_types",
    "layers_differ_by_index",
    "model_totals",
    "num_layers",
    "period_of",
    "reduced_layout",
    "replay",
    "tensor_totals",
]

# Live-bytes categories of the step. Storages alive before the step (weights, inputs) are the
# baseline and carry no tag.
ACT, HEAD, BWD, GRAD = 0, 1, 2, 3
TAGS = ("activations", "logits_loss", "backward_transient", "gradients")
_ZERO = (0, 0, 0, 0)


def _add(a: Sequence[int], b: Sequence[int]) -> tuple[int, int, int, int]:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3])


def _sub(a: Sequence[int], b: Sequence[int]) -> tuple[int, int, int, int]:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3])


# -- the timeline ---------------------------------------------------------------------------


@dataclass
class Interval:
    """One stretch of the step between two marks, relative to the live bytes at its start.

    ``at_max``: tag vector (see ``TAGS``) at the moment live bytes peaked within the interval,
    minus the vector at its start; ``at_end``: the same at its end. ``costs`` counts ops by
    ``(phase, flops, bytes)``.
    """

    label: str
    at_max: tuple[int, int, int, int] = _ZERO
    at_end: tuple[int, int, int, int] = _ZERO
    costs: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    #: bytes freed in this interval (by tag) of storages created in an earlier interval, by
    #: that interval's label: up to the peak moment, and in all. The replay needs them for the
    #: ``exit`` interval, which frees what every block made: autocast's weight-cast cache.
    freed_at_max: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    freed_at_end: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


@dataclass
class Timeline:
    """The step as intervals: ``pre``, ``f0..f{n-1}``, ``head``, ``exit``, ``bhead``, ``b{n-1}..b0``, ``post``."""

    intervals: list[Interval]
    n_blocks: int

    def by_label(self) -> dict[str, Interval]:
        return {iv.label: iv for iv in self.intervals}


@dataclass
class StepProfile:
    """What one policy costs for one training step, replayed at full depth.

    Bytes are relative to the weights (baseline): ``peak`` is the most bytes the step adds,
    ``peak_parts`` their composition at that moment (by ``TAGS``), ``activation`` the bytes
    held for backward when backward starts (``activation_parts`` split by ``TAGS``).
    ``costs`` counts ops by ``(phase, flops, bytes)`` over the whole step.
    """

    peak: int
    peak_parts: tuple[int, int, int, int]
    peak_phase: str
    activation: int
    activation_parts: tuple[int, int, int, int]
    costs: Counter[tuple[str, int, int]]

    def flops(self, phase: str) -> int:
        return sum(f * n for (ph, f, _b), n in self.costs.items() if ph == phase)

    def nbytes(self, phase: str) -> int:
        return sum(b * n for (ph, _f, b), n in self.costs.items() if ph == phase)


def replay(timeline: Timeline, order: Sequence[int]) -> StepProfile:
    """Replay ``timeline`` with its blocks in ``order`` (block index of the small run per real block).

    Example: a 3-block run replayed as a 32-block model is ``order = [0] + [1] * 30 + [2]``.
    """
    ivs = timeline.by_label()
    seq: list[Interval] = [ivs["pre"], *(ivs[f"f{k}"] for k in order), ivs["head"], ivs["exit"]]
    seq.append(ivs["bhead"])
    seq += [ivs[f"b{k}"] for k in reversed(order)]
    if "post" in ivs:
        seq.append(ivs["post"])
    copies = Counter(iv.label for iv in seq)

    def extra(freed: dict[str, tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
        # Leaving autocast frees the cast cache: the casts of every copy of a replayed block.
        out: tuple[int, int, int, int] = _ZERO
        for origin, vec in freed.items():
            k = copies.get(origin, 1) - 1
            if k > 0:
                out = _add(out, [k * x for x in vec])
        return out

    v: tuple[int, int, int, int] = _ZERO
    best, best_label = _ZERO, "pre"
    act = _ZERO
    costs: Counter[tuple[str, int, int]] = Counter()
    for iv in seq:
        at_max, at_end = iv.at_max, iv.at_end
        if iv.label == "exit":
            at_max = _sub(at_max, extra(iv.freed_at_max))
            at_end = _sub(at_end, extra(iv.freed_at_end))
        cand = _add(v, at_max)
        if sum(cand) > sum(best):
            best, best_label = cand, iv.label
        v = _add(v, at_end)
        if iv.label == "exit":
            act = v
        costs.update(iv.costs)
    forward = ("pre", "head", "exit")
    phase = "forward" if best_label in forward or best_label.startswith("f") else "backward"
    return StepProfile(
        peak=sum(best),
        peak_parts=best,
        peak_phase=phase,
        activation=sum(act),
        activation_parts=act,
        costs=costs,
    )


# -- the tracker ----------------------------------------------------------------------------

_VIEW_CACHE: dict[Any, bool] = {}


def _is_view_op(func: Any) -> bool:
    """True for ops whose outputs alias an input without writing it (view, t, expand...)."""
    v = _VIEW_CACHE.get(func)
    if v is None:
        try:
            rets = func._schema.returns
            v = bool(rets) and all(
                r.alias_info is not None and not r.alias_info.is_write for r in rets
            )
        except AttributeError:
            v = False
        _VIEW_CACHE[func] = v
    return v


def _elems(t: torch.Tensor) -> int:
    """Distinct elements a kernel touches: broadcast (stride-0) dimensions count once."""
    n = 1
    for s, st in zip(t.shape, t.stride()):
        if st != 0:
            n *= s
    return n


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class TimelineTracker(TorchDispatchMode):
    """Track live storage bytes by category and cut the step into intervals at ``mark`` calls.

    Storages are counted from the op that creates them until Python frees them (weakref), as in
    ``gradckpt.measure``; storages alive before the step are seeded as the baseline.
    """

    def __init__(self) -> None:
        super().__init__()
        # storage key -> (bytes, tag, interval it was created in); tag -1 = baseline
        self._live: dict[int, tuple[int, int, int]] = {}
        self._refs: dict[int, weakref.ref[Any]] = {}
        self.vec = [0, 0, 0, 0]
        self.tag = ACT
        self._start: tuple[int, int, int, int] = _ZERO
        self._max: tuple[int, int, int, int] = _ZERO
        self._max_total = 0
        self._costs: Counter[tuple[str, int, int]] = Counter()
        self._freed: dict[int, list[int]] = {}  # origin interval -> bytes freed, by tag
        self._freed_max: dict[int, tuple[int, int, int, int]] = {}
        self.intervals: list[Interval] = []

    # storages -------------------------------------------------------------------------------
    def _free(self, key: int) -> None:
        info = self._live.pop(key, None)
        self._refs.pop(key, None)
        if info is not None and info[1] >= 0:
            n, tag, origin = info
            self.vec[tag] -= n
            if origin != len(self.intervals):
                self._freed.setdefault(origin, [0, 0, 0, 0])[tag] += n

    def _track(self, t: torch.Tensor, tag: int) -> None:
        st = _storage(t)
        if st is None:
            return
        key = id(st)
        if key in self._live:
            return

        def on_free(_r: Any, k: int = key) -> None:
            self._free(k)

        try:
            self._refs[key] = weakref.ref(st, on_free)
        except TypeError:
            return
        n = int(st.nbytes())
        self._live[key] = (n, tag, len(self.intervals))
        if tag >= 0:
            self.vec[tag] += n
            total = self.vec[0] + self.vec[1] + self.vec[2] + self.vec[3]
            if total > self._max_total:
                self._max_total = total
                self._max = (self.vec[0], self.vec[1], self.vec[2], self.vec[3])
                if self._freed:
                    self._freed_max = {o: (v[0], v[1], v[2], v[3]) for o, v in self._freed.items()}

    def seed(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            self._track(t, -1)

    def retag(self, t: torch.Tensor, tag: int) -> None:
        """Move a tracked storage to another category (a new gradient becomes ``GRAD``)."""
        st = _storage(t)
        if st is None:
            return
        info = self._live.get(id(st))
        if info is None or info[1] < 0 or info[1] == tag:
            return
        n, old, origin = info
        self._live[id(st)] = (n, tag, origin)
        self.vec[old] -= n
        self.vec[tag] += n

    # intervals ------------------------------------------------------------------------------
    def _vec(self) -> tuple[int, int, int, int]:
        return (self.vec[0], self.vec[1], self.vec[2], self.vec[3])

    def mark(self, label: str) -> None:
        """Close the current interval, naming it ``label``, and open the next one."""
        now = self._vec()
        peak_inside = self._max_total >= sum(now)
        peak = self._max if peak_inside else now
        names = [iv.label for iv in self.intervals]

        def by_label(freed: Any) -> dict[str, tuple[int, int, int, int]]:
            return {names[o]: (v[0], v[1], v[2], v[3]) for o, v in freed.items() if o < len(names)}

        iv = Interval(label, _sub(peak, self._start), _sub(now, self._start), self._costs)
        iv.freed_at_end = by_label(self._freed)
        iv.freed_at_max = by_label(self._freed_max if peak_inside else self._freed)
        self.intervals.append(iv)
        self._start = now
        self._max = now
        self._max_total = sum(now)
        self._costs = Counter()
        self._freed = {}
        self._freed_max = {}

    # dispatch -------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_view_op(func):
            return out
        in_bwd = torch._C._current_graph_task_id() != -1
        phase = "recompute" if is_recomputing() else ("backward" if in_bwd else "forward")
        tag = BWD if in_bwd else self.tag
        nbytes = 0
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor):
                nbytes += _elems(a) * a.element_size()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                nbytes += _elems(t) * t.element_size()
                self._track(t, tag)
        flops = count_flops(func, args, kwargs, out)
        self._costs[(phase, flops, nbytes)] += 1
        return out


# -- building the model ---------------------------------------------------------------------

_MASKED = (
    "bert",
    "roberta",
    "distilbert",
    "electra",
    "xlm-roberta",
    "camembert",
    "deberta",
    "deberta-v2",
)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the hf extra
        raise ConfigError(
            "estimating a model needs Hugging Face transformers: pip install 'gradckpt[hf]'"
        ) from e
    transformers.logging.set_verbosity_error()
    return transformers


def _layer_count_key(cfg: Any) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return key
    raise ConfigError(f"{type(cfg).__name__} has no num_hidden_layers; cannot estimate this model")


def num_layers(cfg: Any) -> int:
    """Number of repeated blocks in a config."""
    return int(getattr(cfg, _layer_count_key(cfg)))


def layer_types(cfg: Any) -> list[Any] | None:
    """Per-layer attention types (Gemma 2 alternates sliding and global attention), if any."""
    lt = getattr(cfg, "layer_types", None)
    if isinstance(lt, (list, tuple)) and len(lt) == num_layers(cfg):
        return list(lt)
    return None


def layers_differ_by_index(cfg: Any) -> bool:
    """True when the layers differ by their index but the config lists no ``layer_types``.

    transformers 4.x releases such as 4.46 give Gemma 2 no ``layer_types``: its even layers
    use sliding-window attention by ``layer_idx % 2`` in the modeling code, and Gemma 3 and
    Cohere 2 pick theirs by ``sliding_window_pattern``. A small model cannot be told which of
    its layers stands for which (its last layer has its own index's kind), so the estimate
    runs such configs at full depth instead of replaying a period.
    """
    if layer_types(cfg) is not None:
        return False
    return cfg.model_type == "gemma2" or getattr(cfg, "sliding_window_pattern", None) is not None


def _per_layer_lists(cfg: Any) -> list[str]:
    """Config fields other than ``layer_types`` holding one value per layer (block roles unknown)."""
    n = num_layers(cfg)
    out = []
    for k, v in cfg.to_dict().items():
        if k != "layer_types" and isinstance(v, (list, tuple)) and len(v) == n and n > 2:
            out.append(k)
    return out


def _model_class(t: Any, cfg: Any) -> Any:
    for arch in getattr(cfg, "architectures", None) or ():
        cls = getattr(t, arch, None)
        if cls is not None and ("CausalLM" in arch or "MaskedLM" in arch or "LMHead" in arch):
            return cls
    # The *_MAPPING_NAMES dicts name the class per model type without importing every model.
    from transformers.models.auto import modeling_auto as ma

    maps = (ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES, ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if cfg.model_type not in _MASKED:
        maps = maps[::-1]
    for names in maps:
        cls_name = names.get(cfg.model_type)
        cls = getattr(t, cls_name, None) if isinstance(cls_name, str) else None
        if cls is not None:
            return cls
    raise ConfigError(
        f"model_type {cfg.model_type!r} is neither a causal nor a masked language model in transformers"
    )


FUSED_ATTENTION = "gradckpt_fused"


def _fused_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention as flash-attention-2 computes it, memory-wise: one fused kernel keeping output + logsumexp.

    Used for ``attention="flash"``: causal (or full, for encoders) attention with no mask
    materialized, whatever the model's sliding windows or logit soft-capping (which the flash
    kernel applies in place). Those change values, not the tensors kept for backward.
    """
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    out = nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal and query.shape[2] > 1,
        enable_gqa=groups > 1,
    )
    return out.transpose(1, 2).contiguous(), None


def _register_fused_attention(t: Any) -> None:
    from transformers.masking_utils import AttentionMaskInterface

    t.AttentionInterface.register(FUSED_ATTENTION, _fused_attention)
    AttentionMaskInterface.register(FUSED_ATTENTION, lambda *args, **kwargs: None)


def _attention_for(t: Any, cls: Any, setup: TrainingSetup) -> tuple[str, list[str]]:
    """The attention implementation to run, and a note when it is not the one asked for."""
    if setup.attention == "flash":
        _register_fused_attention(t)
        return FUSED_ATTENTION, [
            "flash attention modelled as one fused kernel keeping output + logsumexp (no mask)"
        ]
    if setup.attention == "sdpa" and not getattr(cls, "_supports_sdpa", True):
        return "eager", [
            f"{cls.__name__} has no SDPA support in transformers (e.g. attention soft-capping): ran "
            "eager attention, which keeps seq x seq scores; --attention flash models "
            "flash-attention-2, which supports it"
        ]
    return setup.attention, []


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _small_config(cfg: Any, n: int, types: list[Any] | None) -> Any:
    small = copy.deepcopy(cfg)
    setattr(small, _layer_count_key(small), n)
    if types is not None:
        small.layer_types = list(types)
    if hasattr(small, "use_cache"):
        small.use_cache = False
    return small


def _logical_numel(mod: nn.Module, p: torch.Tensor, name: str) -> int:
    from .nf4 import NF4Linear

    if isinstance(mod, NF4Linear) and name == "weight":
        return mod.in_features * mod.out_features
    return p.numel()


@dataclass
class TensorTotals:
    """Bytes and counts of a set of modules' tensors (shared storages counted once)."""

    weight_bytes: int = 0
    params: int = 0
    trainable: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    trainable_tensors: list[torch.Tensor] = field(default_factory=list)

    def __add__(self, o: TensorTotals) -> TensorTotals:
        return TensorTotals(
            self.weight_bytes + o.weight_bytes,
            self.params + o.params,
            self.trainable + o.trainable,
            self.grad_bytes + o.grad_bytes,
            self.optimizer_bytes + o.optimizer_bytes,
        )

    def __sub__(self, o: TensorTotals) -> TensorTotals:
        return TensorTotals(
            self.weight_bytes - o.weight_bytes,
            self.params - o.params,
            self.trainable - o.trainable,
            self.grad_bytes - o.grad_bytes,
            self.optimizer_bytes - o.optimizer_bytes,
        )


def tensor_totals(module: nn.Module, optimizer: str) -> TensorTotals:
    """Weights (parameters + buffers), trainable parameters, gradient and optimizer bytes."""
    seen: set[int] = set()
    tot = TensorTotals()
    trainable: list[torch.Tensor] = []
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            st = _storage(p)
            key = id(st) if st is not None else id(p)
            if key in seen:
                continue
            seen.add(key)
            tot.weight_bytes += p.numel() * p.element_size()
            n = _logical_numel(mod, p, name)
            tot.params += n
            if p.requires_grad:
                tot.trainable += n
                tot.grad_bytes += p.numel() * p.element_size()
                trainable.append(p)
        for b in mod.buffers(recurse=False):
            st = _storage(b)
            key = id(st) if st is not None else id(b)
            if key in seen:
                continue
            seen.add(key)
            tot.weight_bytes += b.numel() * b.element_size()
    tot.optimizer_bytes = optimizer_state_bytes(trainable, optimizer)
    tot.trainable_tensors = trainable
    return tot


def _hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    h = kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


def _first_tensor(out: Any) -> torch.Tensor | None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    return None


class FakeSession:
    """A model built on fake tensors for one (config, setup, depth), reused across batch sizes.

    Attributes:
        model: the trainable model (a peft model for LoRA/QLoRA), fake parameters.
        mode: the ``FakeTensorMode`` it lives in.
        blocks: ``[(name, module)]`` from ``find_blocks``.
        notes: what was modelled and how.
    """

    def __init__(
        self, cfg: Any, setup: TrainingSetup, n_layers: int, types: list[Any] | None
    ) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        from ..blocks import find_blocks

        t = _transformers()
        self.setup = setup
        self.mode = FakeTensorMode(allow_non_fake_inputs=False)
        small = _small_config(cfg, n_layers, types)
        cls = _model_class(t, small)
        attn, attn_notes = _attention_for(t, cls, setup)
        small._attn_implementation = attn
        # Built on the meta device, then every tensor is turned into a fake CPU tensor: fake
        # parameters cannot go through Module.to() (torch swaps them, and fake tensors carry a
        # weakref that forbids the swap), which peft calls on its adapters.
        with torch.device("meta"), _default_dtype(setup.weight_dtype):
            try:
                model = cls(small)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise ConfigError(
                    f"transformers cannot build {cls.__name__} from this config: {e}"
                ) from None
            model.train()
            model, notes = apply_method(model, setup)
        self.notes = attn_notes + notes
        _to_fake(model, self.mode)
        self.model: nn.Module = model
        self.vocab = int(small.vocab_size)
        self.max_positions = _max_positions(small)
        self.blocks = find_blocks(model)
        if len(self.blocks) != n_layers:
            raise GradCkptError(
                f"found {len(self.blocks)} blocks in a {n_layers}-layer {cls.__name__}; "
                "this model's blocks are not its layers, cannot estimate it"
            )

    # tensors of the model --------------------------------------------------------------------
    def totals(self, optimizer: str) -> tuple[TensorTotals, list[TensorTotals]]:
        """``(whole model, per block)`` tensor totals."""
        return tensor_totals(self.model, optimizer), [
            tensor_totals(b, optimizer) for _, b in self.blocks
        ]

    # one step --------------------------------------------------------------------------------
    def run(
        self, plan: Plan, batch: int, seq: int, *, grad_accum: int = 1, seed: int = 0
    ) -> Timeline:
        """Run one forward+backward with ``plan`` installed and return its timeline."""
        from ..apply import disable, enable

        model, mode, setup = self.model, self.mode, self.setup
        with mode:
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, self.vocab, (batch, seq), generator=g)
        trainable = [p for p in model.parameters() if p.requires_grad]
        tracker = TimelineTracker()
        n = len(self.blocks)
        hooks: list[Any] = []
        state = {"fwd": True}

        def pre(i: int) -> Callable[..., None]:
            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if not state["fwd"] or is_recomputing():
                    return
                tracker.mark("pre" if i == 0 else f"f{i - 1}")
                h = _hidden_input(args, kwargs)
                if h is not None and h.requires_grad:
                    h.register_hook(lambda _g, i=i: tracker.mark(f"b{i}"))

            return hook

        def post(_m: nn.Module, _a: Any, out: Any) -> None:
            if not state["fwd"] or is_recomputing():
                return
            tracker.mark(f"f{n - 1}")
            tracker.tag = HEAD
            o = _first_tensor(out)
            if o is not None and o.requires_grad:
                o.register_hook(lambda _g: tracker.mark("bhead"))

        for i, (_name, blk) in enumerate(self.blocks):
            hooks.append(blk.register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(self.blocks[-1][1].register_forward_hook(post))
        for p in trainable:
            hooks.append(
                p.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, GRAD))
            )

        with warnings.catch_warnings():
            # transformers >= 5 warns when its renamed checkpointing flag is read (enable, disable)
            warnings.simplefilter("ignore", FutureWarning)
            # the estimate says itself how it treats offload on this CPU-only run
            warnings.filterwarnings("ignore", message=".*OFFLOAD on a CPU-only run.*")
            enable(model, plan=plan, blocks=[name for name, _ in self.blocks])
            try:
                with mode:
                    if grad_accum > 1:  # gradients of earlier micro-batches live all step long
                        for p in trainable:
                            p.grad = torch.zeros_like(p)
                    tracker.seed([*_model_tensors(model), ids])
                    tracker.mark("start")  # empty interval: sets the baseline
                    with ExitStack() as stack:
                        stack.enter_context(_one_sequence_per_row())
                        stack.enter_context(_no_padding_checks(model))
                        stack.enter_context(tracker)
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.autocast):
                            loss = model(input_ids=ids, labels=ids).loss
                            tracker.mark("head")
                        tracker.mark("exit")  # leaving autocast frees its weight-cast cache
                        state["fwd"] = False
                        loss.backward()
                        del loss
                        tracker.mark(self._last_label(tracker))
            finally:
                disable(model)
                for h in hooks:
                    h.remove()
                for p in trainable:
                    p.grad = None
        ivs = tracker.intervals[1:]  # drop "start"
        return Timeline(ivs, n)

    @staticmethod
    def _last_label(tracker: TimelineTracker) -> str:
        # The interval still open at the end: "post" after block 0's input gradient, else "b0"
        # (block 0's input needs no gradient when the embeddings are frozen).
        labels = [iv.label for iv in tracker.intervals]
        return "post" if "b0" in labels else "b0"


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor the model holds: parameters, their gradients, buffers, tensor attributes.

    The baseline of the step (``gradckpt.measure`` seeds every live tensor of the process; the
    model's are the only ones a fake step can touch, and scanning the heap takes ~0.5 s).
    """
    out: list[torch.Tensor] = []
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                out.append(p)
                if p.grad is not None:
                    out.append(p.grad)
        out.extend(b for b in mod._buffers.values() if b is not None)
        out.extend(v for v in vars(mod).values() if isinstance(v, torch.Tensor))
    return out


def _to_fake(model: nn.Module, mode: Any) -> None:
    """Replace every meta tensor of ``model`` (parameters, buffers, tensor attributes) by a fake CPU one.

    Tensors shared between modules (tied embeddings) stay shared.
    """
    conv = mode.fake_tensor_converter
    cpu = torch.device("cpu")
    done: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        out = done.get(id(t))
        if out is None:
            out = conv.from_meta_and_device(mode, t.detach(), cpu)
            if isinstance(t, nn.Parameter):
                out = nn.Parameter(out, requires_grad=t.requires_grad)
            done[id(t)] = out
        return out

    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                mod._parameters[name] = fake(p)  # type: ignore[assignment]
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                mod._buffers[name] = fake(b)
        for name, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and v.device.type == "meta":
                setattr(mod, name, fake(v))


@contextmanager
def _one_sequence_per_row() -> Iterator[None]:
    """Tell transformers the fake batch is not packed, as it finds on a real batch.

    transformers looks for packed sequences in the position ids; on a real batch it sees one
    sequence per row and lets SDPA use ``is_causal`` (no mask), but fake tensors count as
    tracing, where it cannot look, so it would build a (batch, 1, seq, seq) mask that SDPA
    then keeps per layer: memory a real run does not use.
    """
    try:
        import transformers.masking_utils as mu
    except ImportError:  # pragma: no cover - older transformers: no packed-sequence detection
        yield
        return
    orig = getattr(mu, "find_packed_sequence_indices", None)
    if orig is None:  # pragma: no cover
        yield
        return
    mu.find_packed_sequence_indices = lambda position_ids: None  # type: ignore[attr-defined]
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = orig  # type: ignore[attr-defined]


@contextmanager
def _no_padding_checks(model: nn.Module) -> Iterator[None]:
    """Answer transformers 4.x's "is there padding?" checks as a real batch without padding does.

    The fake batch is random ids with no attention mask, so on a real run of it every mask
    transformers builds is all ones. transformers 5 never reads the values: its ``is_tracing``
    counts fake tensors. 4.x releases such as 4.46 read them, which fake tensors cannot answer
    (DataDependentOutputException on ``.item()``), in two places:

    - ``warn_if_padding_and_no_attention_mask`` (BERT, RoBERTa, ...) tests
      ``pad_token_id in input_ids[:, [-1, 0]]`` only to warn: skipped.
    - ``_prepare_4d_attention_mask_for_sdpa`` (encoders with SDPA) returns None for an
      all-ones mask (SDPA then runs without one) and a (batch, 1, seq, seq) mask otherwise:
      None here, as on the real batch. The modeling modules import it by name, so it is
      replaced in each module's namespace; transformers 5's modeling code has no such name.
    """
    method, mask_fn = "warn_if_padding_and_no_attention_mask", "_prepare_4d_attention_mask_for_sdpa"
    patched = [m for m in model.modules() if callable(getattr(m, method, None))]
    namespaces = {type(m).__module__ for m in model.modules()}
    swapped: list[tuple[Any, Any]] = []
    for name in namespaces:
        ns = sys.modules.get(name)
        if ns is not None and callable(getattr(ns, mask_fn, None)):
            swapped.append((ns, getattr(ns, mask_fn)))
    for m in patched:
        m.__dict__[method] = lambda *args, **kwargs: None
    for ns, _ in swapped:
        setattr(ns, mask_fn, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop(method, None)
        for ns, orig in swapped:
            setattr(ns, mask_fn, orig)


def _max_positions(cfg: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# -- periodic plans -------------------------------------------------------------------------

_BLOCK_NAME = re.compile(r"^(.*?)(\d+)$")
MAX_PERIOD = 6


def block_names_at_depth(small_names: Sequence[str], depth: int) -> list[str] | None:
    """Names of the blocks of the ``depth``-layer model, from those of a smaller build."""
    prefixes = set()
    for i, name in enumerate(small_names):
        m = _BLOCK_NAME.match(name)
        if not m or int(m.group(2)) != i:
            return None
        prefixes.add(m.group(1))
    if len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    return [f"{prefix}{i}" for i in range(depth)]


def period_of(plan: Plan, types: list[Any] | None) -> int | None:
    """Smallest P such that blocks P..L-2 repeat with period P (decisions and layer types).

    None when the plan has segments or no period up to ``MAX_PERIOD`` (run at full depth).
    """
    if plan.segments:
        return None
    L = len(plan)
    keys = [(d, None if types is None else types[i]) for i, d in enumerate(plan.decisions)]
    for p in range(1, MAX_PERIOD + 1):
        if all(keys[i] == keys[p + (i - p) % p] for i in range(p, L - 1)):
            return p
    return None


def reduced_layout(
    plan: Plan, types: list[Any] | None
) -> tuple[list[int], list[Decision], list[Any] | None] | None:
    """How to run ``plan`` on a small model: ``(order, small decisions, small layer types)``.

    The small model has ``2P + 1`` blocks: the first period as is, one period of middle blocks
    (replayed), and the last block. The first period stays un-replayed because tensors shared
    by all blocks of a kind (the rotary tables, each layer type's mask) are freed in the
    backward of the first block that uses them. ``order[i]`` is the small-model block standing
    in for block i. None: run at full depth.
    """
    L = len(plan)
    p = period_of(plan, types)
    if p is None or 2 * p + 1 >= L:
        return None
    idx = [*range(2 * p), L - 1]
    order = [*range(p)] + [p + (i - p) % p for i in range(p, L - 1)] + [2 * p]
    decisions = [plan.decisions[i] for i in idx]
    small_types = None if types is None else [types[i] for i in idx]
    return order, decisions, small_types


# -- session cache --------------------------------------------------------------------------

_CACHE: dict[Any, FakeSession] = {}
_CACHE_SIZE = 4


def _cache_key(cfg: Any, setup: TrainingSetup, n: int, types: list[Any] | None) -> Any:
    import json

    # batch, sequence, accumulation and optimizer do not change the model: one build serves all
    setup_key = setup.with_(batch=1, seq=1, grad_accum=1, optimizer="sgd").to_dict()
    return (
        type(cfg).__name__,
        cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else repr(cfg),
        json.dumps(setup_key, sort_keys=True),
        n,
        None if types is None else tuple(map(str, types)),
    )


def get_session(cfg: Any, setup: TrainingSetup, n: int, types: list[Any] | None) -> FakeSession:
    """A ``FakeSession`` for this config, setup (batch and sequence aside) and depth; cached."""
    key = _cache_key(cfg, setup, n, types)
    sess = _CACHE.pop(key, None)
    if sess is None:
        sess = FakeSession(cfg, setup, n, types)
    _CACHE[key] = sess  # most recently used last
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    return sess


def model_totals(cfg: Any, setup: TrainingSetup) -> TensorTotals:
    """Weights, parameter counts, gradient and optimizer bytes of the full-depth model, without a step.

    Builds the first block, one middle block and the last block (or every block when the layer
    types do not repeat) and counts the middle one ``L - 2`` times.
    """
    L = num_layers(cfg)
    types = layer_types(cfg)
    if L >= 3 and (types is None or len({str(t) for t in types[1:-1]}) == 1):
        idx = [0, 1, L - 1]
        order = [0] + [1] * (L - 2) + [2]
    else:
        idx, order = list(range(L)), list(range(L))
    sess = get_session(cfg, setup, len(idx), None if types is None else [types[i] for i in idx])
    whole, per_block = sess.totals(setup.optimizer)
    outside = whole - sum(per_block[1:], per_block[0])
    return sum((per_block[k] for k in order[1:]), outside + per_block[order[0]])


def keep_only(session: FakeSession) -> None:
    """Forget every cached fake model but ``session``."""
    for key in [k for k, v in _CACHE.items() if v is not session]:
        del _CACHE[key]


def clear_cache() -> None:
    """Forget the fake models kept between calls."""
    _CACHE.clear()
