"""A Hugging Face model on fake tensors, set up for training, and one recorded step of it.

The model is a ``transformers`` class built from its config on the meta device, set up for
training (LoRA via peft, NF4 for QLoRA) and moved to ``FakeTensorMode``: parameters and
activations have shapes, dtypes and storages but no data, so a 70B model costs no memory.
``FakeSession.run`` installs a plan and runs one forward+backward under ``TimelineTracker``
(see ``timeline``); sessions are cached, since batch and sequence length do not change the model.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten

from ..blocks import block_groups, find_blocks
from ..errors import BlockError, ConfigError
from ..plans import Plan
from ..state import is_recomputing
from .hf_patches import no_padding_checks, one_sequence_per_row
from .presets import hf_transformers
from .timeline import GRAD, HEAD, Timeline, TimelineTracker
from .totals import TensorTotals, replayed_totals, tensor_totals
from .training import TrainingSetup, apply_method
from .vision import RealIndexMath, is_vlm, step_inputs, text_config

__all__ = [
    "FakeSession",
    "get_session",
    "keep_only",
    "layer_types",
    "layers_differ_by_index",
    "max_positions",
    "model_totals",
    "num_layers",
    "per_layer_lists",
]


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


def _layer_count_key(cfg: Any) -> str:
    # cfg: a language model's config (a VLM's text_config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return key
    raise ConfigError(f"{type(cfg).__name__} has no num_hidden_layers; cannot estimate this model")


def num_layers(cfg: Any) -> int:
    """Number of repeated blocks in a config (a VLM's: its language model's layers)."""
    text = text_config(cfg)
    return int(getattr(text, _layer_count_key(text)))


def layer_types(cfg: Any) -> list[Any] | None:
    """Per-layer attention types (Gemma 2 alternates sliding and global attention), if any."""
    lt = getattr(text_config(cfg), "layer_types", None)
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
    text = text_config(cfg)
    return text.model_type == "gemma2" or getattr(text, "sliding_window_pattern", None) is not None


def per_layer_lists(cfg: Any) -> list[str]:
    """Config fields other than ``layer_types`` holding one value per layer (block roles unknown)."""
    n = num_layers(cfg)
    out = []
    for k, v in text_config(cfg).to_dict().items():
        if k != "layer_types" and isinstance(v, (list, tuple)) and len(v) == n and n > 2:
            out.append(k)
    return out


def _model_class(t: Any, cfg: Any) -> Any:
    kinds = ("ConditionalGeneration",) if is_vlm(cfg) else ("CausalLM", "MaskedLM", "LMHead")
    for arch in getattr(cfg, "architectures", None) or ():
        cls = getattr(t, arch, None)
        if cls is not None and any(k in arch for k in kinds):
            return cls
    # The *_MAPPING_NAMES dicts name the class per model type without importing every model.
    from transformers.models.auto import modeling_auto as ma

    maps: tuple[Any, ...] = (
        ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )
    if cfg.model_type not in _MASKED:
        maps = maps[::-1]
    if is_vlm(cfg):
        maps = tuple(
            getattr(ma, m)
            for m in (
                "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES",
            )
            if hasattr(ma, m)
        )
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
    text = text_config(small)  # a VLM's vision tower keeps its depth
    setattr(text, _layer_count_key(text), n)
    if types is not None:
        text.layer_types = list(types)
    for c in {id(small): small, id(text): text}.values():
        if hasattr(c, "use_cache"):
            c.use_cache = False
    return small


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
        t = hf_transformers()
        self.setup = setup
        #: replayed step results of this model, by plan and step shape (``estimator`` fills it)
        self.steps = LRU(64)
        #: a VLM's batch holds real index tensors (``vision.RealIndexMath``)
        self.vlm = is_vlm(cfg)
        self.mode = FakeTensorMode(allow_non_fake_inputs=self.vlm)
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
        self.cfg = small
        self.vocab = int(text_config(small).vocab_size)
        found = find_blocks(model)
        #: the blocks of the other lists (a VLM's vision tower), at full depth, run before
        #: ``blocks`` in the step; plans name them first
        self.extra_blocks: list[tuple[str, nn.Module]] = []
        self.blocks = found
        if self.vlm:
            self.blocks, self.extra_blocks = _split_text_list(found, n_layers)
        if len(self.blocks) != n_layers:
            raise BlockError(
                f"found {len(self.blocks)} blocks in a {n_layers}-layer {cls.__name__}; "
                "this model's blocks are not its layers, cannot estimate it"
            )

    @property
    def block_names(self) -> list[str]:
        """Every block's name, as plans of this model list them (other lists first)."""
        return [n for n, _ in (*self.extra_blocks, *self.blocks)]

    def inputs(self, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
        """One batch for the step: ``input_ids`` and ``labels`` (a VLM's: with its images)."""
        st = self.setup
        if self.vlm and st.image_size is not None:
            return step_inputs(
                self.model, self.cfg, st.image_size, st.images, batch, seq, self.vocab
            )
        with self.mode:
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, self.vocab, (batch, seq), generator=g)
        return {"input_ids": ids, "labels": ids}

    def index_math(self) -> Any:
        """A context running a VLM's index math on real values (``RealIndexMath``); else a no-op."""
        return RealIndexMath() if self.vlm else nullcontext()

    # tensors of the model --------------------------------------------------------------------
    def totals(self, optimizer: str) -> tuple[TensorTotals, list[TensorTotals]]:
        """``(whole model, per block)`` tensor totals."""
        return tensor_totals(self.model, optimizer), [
            tensor_totals(b, optimizer) for _, b in self.blocks
        ]

    def extra_totals(self, optimizer: str) -> list[TensorTotals]:
        """Tensor totals of each block of the other lists (``extra_blocks``)."""
        return [tensor_totals(b, optimizer) for _, b in self.extra_blocks]

    # one step --------------------------------------------------------------------------------
    def run(
        self, plan: Plan, batch: int, seq: int, *, grad_accum: int = 1, seed: int = 0
    ) -> Timeline:
        """Run one forward+backward with ``plan`` installed and return its timeline."""
        from ..enable import disable, enable

        model, mode, setup = self.model, self.mode, self.setup
        batch_in = self.inputs(batch, seq, seed)
        ids = batch_in["input_ids"]
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
            enable(model, plan=plan, blocks=list(plan.blocks))
            try:
                with mode:
                    if grad_accum > 1:  # gradients of earlier micro-batches live all step long
                        for p in trainable:
                            p.grad = torch.zeros_like(p)
                    inputs = [v for v in batch_in.values() if isinstance(v, torch.Tensor)]
                    tracker.seed([*_model_tensors(model), *inputs])
                    tracker.mark("start")  # empty interval: sets the baseline
                    with ExitStack() as stack:
                        stack.enter_context(self.index_math())
                        stack.enter_context(one_sequence_per_row())
                        stack.enter_context(no_padding_checks(model))
                        stack.enter_context(tracker)
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.autocast):
                            if setup.hf_loss == "shift-copy":
                                loss = _shift_copy_loss(model(input_ids=ids), ids)
                            else:  # the installed transformers' own loss
                                loss = model(**batch_in).loss
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


def _split_text_list(
    found: list[tuple[str, nn.Module]], n_layers: int
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """A VLM's blocks as ``(language model's list, the other lists)``.

    The language model's list is the one under ``language_model``/``text_model``, else the last.
    """
    groups = [found[a:b] for a, b in block_groups([n for n, _ in found])]
    text = [g for g in groups if any(k in g[0][0] for k in ("language_model", "text_model"))]
    pick = text[-1] if text else (groups[-1] if groups else [])
    if len(pick) != n_layers:
        raise BlockError(
            f"found no list of {n_layers} blocks for this VLM's language model "
            f"(lists: {', '.join(f'{g[0][0]} x{len(g)}' for g in groups)}); cannot estimate it"
        )
    return pick, [b for g in groups if g is not pick for b in g]


def _shift_copy_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss as transformers 4.46-4.48's ``ForCausalLMLoss`` computes it (memory-wise).

    It upcasts the logits to fp32 and then copies the shifted logits
    (``logits[..., :-1, :].contiguous()``) while the fp32 upcast is still referenced, so both
    live through the cross entropy; 4.49 pads the labels instead and makes no copy. Releases
    before 4.46 upcast in the model's forward and copy the same way.
    """
    logits = out.logits
    del out  # the caller drops the output; the bf16 logits stay referenced here, as there
    up = logits.float()
    shift_logits = up[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    vocab = shift_logits.shape[-1]
    return nn.functional.cross_entropy(
        shift_logits.view(-1, vocab), shift_labels.view(-1), ignore_index=-100
    )


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


def max_positions(cfg: Any) -> int | None:
    """The longest sequence the config states (``max_position_embeddings``/``n_positions``), if any."""
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(text_config(cfg), key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# -- the cache ------------------------------------------------------------------------------


class LRU:
    """A bounded mapping that forgets the least recently used entry first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: dict[Any, Any] = {}

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """The value for ``key``, made by ``make()`` (and kept) when absent."""
        value = self.items.pop(key, _MISSING)
        if value is _MISSING:
            value = make()
        self.items[key] = value  # most recently used last
        while len(self.items) > self.size:
            self.items.pop(next(iter(self.items)))
        return value


_MISSING = object()
# The one estimate cache: fake models by (config, setup, depth). Each session keeps its own
# step results (``FakeSession.steps``), so they go when the session goes.
_SESSIONS = LRU(4)


def _cache_key(cfg: Any, setup: TrainingSetup, n: int, types: list[Any] | None) -> Any:
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
    sess: FakeSession = _SESSIONS.get(
        _cache_key(cfg, setup, n, types), lambda: FakeSession(cfg, setup, n, types)
    )
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
    return replayed_totals(whole, per_block, order)


def keep_only(session: FakeSession) -> None:
    """Forget every cached fake model but ``session``."""
    _SESSIONS.items = {k: v for k, v in _SESSIONS.items.items() if v is session}
