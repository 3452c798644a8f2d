"""Non-reentrant checkpoint with gradckpt's fixes: stateful layers updated once, recompute flagged."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
import torch.utils.checkpoint as tuc
from torch import nn

from ..errors import CheckpointMismatchError, ConfigError, GradCkptError
from ..state import is_recomputing, recompute_flag
from .replay import decision_contexts

__all__ = ["checkpoint", "is_recomputing", "stateful_modules"]

ContextFn = Callable[[], tuple[AbstractContextManager[Any], AbstractContextManager[Any]]]


def stateful_modules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Sub-modules whose forward updates buffers in train mode (BatchNorm, InstanceNorm with stats)."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    for root in modules:
        for m in root.modules():
            if (
                isinstance(m, nn.modules.batchnorm._NormBase)
                and m.track_running_stats
                and id(m) not in seen
            ):
                seen.add(id(m))
                out.append(m)
    return out


_find_stateful = stateful_modules  # checkpoint() has a keyword of that name


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` accepts keyword ``name`` (a parameter of that name, or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == name and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in params
    )


@contextlib.contextmanager
def _restore_buffers(stateful: list[nn.Module]) -> Iterator[None]:
    """Undo buffer updates made during a recompute.

    A plain recompute runs BatchNorm's train-mode forward twice, so running_mean/var move twice
    and num_batches_tracked goes up by 2 per step (seen on torch 2.13). The recompute's output does
    not depend on the running statistics in train mode (batch statistics are used), so restoring
    the pre-recompute values afterwards gives exactly the statistics of a run without checkpointing.
    """
    saved = []
    for m in stateful:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buf = getattr(m, name, None)
            if isinstance(buf, torch.Tensor):
                saved.append((buf, buf.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _context_fn(
    extra: ContextFn | None,
    stateful: list[nn.Module],
    name: str = "checkpointed function",
    *,
    replay: bool = False,
) -> ContextFn:
    """gradckpt's (forward, recompute) contexts around the caller's ``extra`` ones.

    torch calls ``context_fn()`` once per checkpointed call but enters the recompute context
    once per recompute: a second ``backward(retain_graph=True)``, each ``autograd.grad`` on the
    same graph and a double backward each recompute again. So each entry builds fresh context
    managers (a ``@contextmanager`` generator can be entered only once). ``replay`` keeps the
    forward's data-dependent decisions (topk/argmax/sort/nonzero...) and hands them back during
    recompute (``replay.decision_contexts``).
    """

    def make() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
        fwd: AbstractContextManager[Any]
        rec: AbstractContextManager[Any]
        if extra is not None:
            fwd, rec = extra()
        else:
            fwd, rec = contextlib.nullcontext(), contextlib.nullcontext()
        record, replayer = decision_contexts(name) if replay else (None, None)
        forward_cms: list[Callable[[], AbstractContextManager[Any]]] = [
            lambda: _NamedMismatch(name)
        ]
        if record is not None:
            forward_cms.append(lambda: record)
        forward_cms.append(lambda: fwd)
        # Entered when a recompute starts, in this order: flag, buffer guard, decisions, user's.
        recompute_cms: list[Callable[[], AbstractContextManager[Any]]] = [
            recompute_flag,
            lambda: _restore_buffers(stateful),
        ]
        if replayer is not None:
            recompute_cms.append(lambda: replayer)
        recompute_cms.append(lambda: rec)
        return _Chain(forward_cms), _Chain(recompute_cms)

    return make


def _mismatch_error(name: str, err: Exception) -> CheckpointMismatchError:
    detail = str(err).split("Tip:")[0].replace("torch.utils.checkpoint: ", "")
    detail = " ".join(detail.split()).rstrip(".")
    return CheckpointMismatchError(
        f"{name}: the recompute during backward did not reproduce the forward pass ({detail}); "
        "its gradients would be wrong, so backward stopped. The forward is not deterministic "
        "(control flow or sizes that depend on Python-side state, a call counter or randomness "
        "torch does not replay, or in-place changes to its inputs): make it deterministic, or "
        "keep this block's activations (Decision.SAVE for it in the plan)"
    )


class _NamedMismatch(AbstractContextManager[None]):
    """Forward context that names the block in torch's recompute-mismatch errors.

    torch checks during backward that the recompute saved as many tensors, of the same shapes,
    dtypes and devices, as the forward did, and raises a bare ``CheckpointError`` from the
    saved-tensor unpack hook when not. torch enters the forward context right inside its own
    saved-tensor hooks, so the hooks on top of the stack here are the region's: they are pushed
    again with an unpack that turns that error into ``CheckpointMismatchError`` naming the block.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._pushed = False

    def __enter__(self) -> None:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is None:  # grad disabled: torch pushed no hooks, nothing is saved
            return
        pack, unpack = top
        name = self._name

        def unpack_named(handle: Any) -> Any:
            try:
                return unpack(handle)
            except tuc.CheckpointError as e:
                if "already unpacked once" in str(e):
                    raise  # ctx.saved_tensors read twice: torch's own message says what to do
                raise _mismatch_error(name, e) from e

        torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack_named)
        self._pushed = True

    def __exit__(self, *exc: Any) -> None:
        if self._pushed:
            self._pushed = False
            torch._C._autograd._pop_saved_tensors_default_hooks()


def describe(fn: Callable[..., Any]) -> str:
    """How errors name a checkpointed function: ``block 'layers.3'``, ``LlamaMLP``, ``f``."""
    label = getattr(fn, "_gradckpt_label", None)
    if isinstance(label, str):
        return label
    if isinstance(fn, nn.Module):
        return type(fn).__name__
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return type(owner).__name__
    return str(getattr(fn, "__qualname__", None) or type(fn).__name__)


class _Chain(AbstractContextManager[Any]):
    """Enter several context managers as one (the recompute context torch expects is a single one).

    Built from factories, so that each entry (torch enters the recompute context once per
    recompute) gets fresh context managers; entries may nest.
    """

    def __init__(self, factories: list[Callable[[], AbstractContextManager[Any]]]) -> None:
        self._factories = factories
        self._stacks: list[ExitStack] = []

    def __enter__(self) -> None:
        stack = ExitStack()
        try:
            for make in self._factories:
                stack.enter_context(make())
        except BaseException:
            stack.close()  # a failed __enter__ gets no __exit__: undo the ones entered
            raise
        self._stacks.append(stack)

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stacks.pop().__exit__(*exc)


def _modules_of(fn: Callable[..., Any]) -> list[nn.Module]:
    if isinstance(fn, nn.Module):
        return [fn]
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return [owner]
    return []


def checkpoint(
    fn: Callable[..., Any],
    *args: Any,
    use_reentrant: bool | None = None,
    context_fn: ContextFn | None = None,
    preserve_rng_state: bool = True,
    determinism_check: str = "default",
    debug: bool = False,
    early_stop: bool = True,
    stateful_modules: Iterable[nn.Module] | None = None,
    **kwargs: Any,
) -> Any:
    """Drop-in for ``torch.utils.checkpoint.checkpoint``, always on its non-reentrant path.

    Differences from torch: ``use_reentrant`` defaults to False and True is refused (it gives
    adapters no gradient when the block input does not require grad, breaks DDP and ignores
    kwargs); RNG state (CPU and the inputs' accelerator) is replayed so dropout masks match;
    autocast state is kept; BatchNorm running statistics of ``fn`` (when it is a module or a
    module's method, or of the modules given in ``stateful_modules``) are updated once, not
    twice; without ``context_fn``, data-dependent decisions (``topk``/``argmax``/``sort``/
    ``nonzero``... : which expert a token goes to) are kept from the forward and replayed, so
    the recompute routes exactly as the forward did.

    Args:
        fn: the function or module to run; recomputed during backward.
        *args, **kwargs: passed to ``fn``; may include non-tensors and keyword tensors. Every
            keyword not listed here reaches ``fn``, as in torch (``stateful=`` included).
        context_fn: as in torch: returns (forward context, recompute context), e.g. from
            ``torch.utils.checkpoint.create_selective_checkpoint_contexts``.
        stateful_modules: modules whose running statistics must not be updated by the
            recompute (default: the BatchNorm-like sub-modules of ``fn`` when it is a module).
            Formerly ``stateful=``, still accepted (with a DeprecationWarning) when ``fn``
            cannot take a ``stateful`` keyword itself.
        debug: torch's debug mode (operator traces in mismatch errors); it runs torch's
            checkpoint unchanged, so without the BatchNorm fix or ``CheckpointMismatchError``.

    Returns:
        Whatever ``fn`` returns.

    Raises:
        CheckpointMismatchError: during backward, when the recompute saved tensors of another
            count, shape or dtype than the forward (the forward is not deterministic).

    Example:
        >>> y = gradckpt.checkpoint(block, x, attention_mask=mask)
    """
    if not callable(fn):
        raise ConfigError(f"checkpoint needs a function or module to run, got {type(fn).__name__}")
    if use_reentrant:
        raise ConfigError(
            "gradckpt.checkpoint does not run the reentrant variant: it silently gives no "
            "gradients to adapters when the input does not require grad, breaks DDP and "
            "ignores keyword arguments; drop use_reentrant=True"
        )
    if "stateful" in kwargs and not _takes_keyword(fn, "stateful"):
        if stateful_modules is not None:
            raise ConfigError(
                "checkpoint got both stateful= and stateful_modules=: give stateful_modules= only"
            )
        warnings.warn(
            "gradckpt.checkpoint(stateful=...) is deprecated: call it stateful_modules=...; "
            "stateful= is passed to the function when the function takes it, as torch does",
            DeprecationWarning,
            stacklevel=2,
        )
        stateful_modules = kwargs.pop("stateful")
    if torch.compiler.is_compiling():
        # Under torch.compile, dynamo turns this call into a higher-order op whose context_fn
        # must be a plain function or partial returning TorchDispatchModes (torch/utils/
        # checkpoint.py, _is_compiling); gradckpt's own contexts are neither, so only the
        # caller's context_fn (e.g. selective-checkpoint modes) is passed on. Nothing is lost:
        # the compiled graph applies buffer mutations once, in forward (BatchNorm statistics
        # match an uncheckpointed run; tested in tests/test_compile.py), and measure() does not
        # trace compiled code op by op, so the recompute flag has no reader there.
        # (Dynamo sees any context_fn keyword as a custom one, even torch's noop: leave it out.)
        extra = {} if context_fn is None else {"context_fn": context_fn}
        return tuc.checkpoint(
            fn,
            *args,
            use_reentrant=False,
            preserve_rng_state=preserve_rng_state,
            determinism_check=determinism_check,
            debug=debug,
            early_stop=early_stop,
            **extra,
            **kwargs,
        )
    forced = getattr(tuc, "_checkpoint_debug_enabled", None)  # set_checkpoint_debug_enabled
    if debug if forced is None else forced:
        # torch's debug mode installs its own logging contexts and refuses any other context_fn
        # (ValueError "debug=True is incompatible with non-default context_fn"), so it runs as
        # plain torch: the op traces are what matters then, not the BatchNorm fix.
        if context_fn is not None:
            raise ConfigError(  # a ValueError, as torch's refusal
                "debug=True cannot be combined with context_fn: torch's debug mode installs its "
                "own contexts; drop one of them"
            )
        return tuc.checkpoint(
            fn,
            *args,
            use_reentrant=False,
            preserve_rng_state=preserve_rng_state,
            determinism_check=determinism_check,
            debug=True,
            early_stop=early_stop,
            **kwargs,
        )
    mods = list(stateful_modules) if stateful_modules is not None else _modules_of(fn)
    contexts = _context_fn(
        context_fn, _find_stateful(mods), describe(fn), replay=context_fn is None
    )
    return tuc.checkpoint(
        fn,
        *args,
        use_reentrant=False,
        context_fn=contexts,
        preserve_rng_state=preserve_rng_state,
        determinism_check=determinism_check,
        debug=debug,
        early_stop=early_stop,
        **kwargs,
    )


# -- open-ended regions (a segment of several blocks checkpointed as one unit) --------------

_GEN_SIG = inspect.signature(tuc._checkpoint_without_reentrant_generator)


def open_region(
    recompute: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    stateful: list[nn.Module],
    context_fn: ContextFn | None = None,
    name: str = "checkpointed region",
    early_stop: bool = True,
) -> Generator[None, None, None]:
    """Start a checkpointed region whose forward runs outside this call (across several blocks).

    Returns torch's non-reentrant checkpoint generator, already entered: tensors saved for
    backward from now on belong to the region until ``close_region`` is called; during backward
    ``recompute(*args, **kwargs)`` replays the region (its data-dependent decisions replayed
    as in ``checkpoint`` when ``context_fn`` is None; ``early_stop`` as in torch). Built on the same private generator as
    torch's composable ``checkpoint`` (torch/distributed/_composable/checkpoint_activation.py).
    """
    known: dict[str, Any] = {
        "preserve_rng_state": True,
        "context_fn": _context_fn(context_fn, stateful, name, replay=context_fn is None),
        "determinism_check": "default",
        "debug": False,
        "early_stop": early_stop,
    }
    positional = []
    for p in list(_GEN_SIG.parameters.values())[1:]:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            break
        positional.append(known.get(p.name, p.default))
    gen = tuc._checkpoint_without_reentrant_generator(recompute, *positional, *args, **kwargs)
    next(gen)
    return gen


def close_region(gen: Generator[None, None, None]) -> None:
    """End a region started by ``open_region`` (pops its saved-tensor hooks)."""
    try:
        next(gen)
    except StopIteration:
        return
    raise GradCkptError("internal: checkpoint region generator yielded more than twice")


def abort_region(gen: Generator[None, None, None]) -> None:
    """Close a region after an exception in its forward, so no saved-tensor hooks are left behind."""
    with contextlib.suppress(BaseException):
        gen.close()


# -- a region that steps aside between its blocks, and per-block RNG states -------------------

#: One entry of autograd's saved-tensor hooks stack: ``(pack, unpack)``.
_Hooks = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]


def saved_hooks_top() -> _Hooks | None:
    """The saved-tensor hooks on top of autograd's stack now (None when the stack is empty)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)  # type: ignore[no-any-return]


def _same_hooks(a: _Hooks | None, b: _Hooks | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[0] is b[0] and a[1] is b[1]


def pushed_since(below: _Hooks | None) -> list[_Hooks]:
    """The hooks pushed on top of ``below`` (bottom first), left where they are.

    ``open_region`` pushes two (torch's checkpoint hooks and ``_NamedMismatch``'s); what
    ``pause_region`` takes off and ``resume_region`` puts back.
    """
    popped: list[_Hooks] = []
    try:
        while not _same_hooks(saved_hooks_top(), below):
            top = saved_hooks_top()
            if top is None or len(popped) >= 8:
                raise GradCkptError(
                    "internal: the saved-tensor hooks under a checkpointed segment were not found "
                    "again (a context left open inside a block?); use policy='full'"
                )
            popped.append(top)
            torch._C._autograd._pop_saved_tensors_default_hooks()
    finally:
        resume_region(list(reversed(popped)))
    return list(reversed(popped))


def pause_region(hooks: list[_Hooks]) -> bool:
    """Take an open region's hooks off the stack, so tensors saved until ``resume_region`` are
    saved as if no checkpoint were open (the model's own code between two blocks of a segment,
    which the segment's replay does not run). False when they are not on top (nothing done)."""
    if not hooks or not _same_hooks(saved_hooks_top(), hooks[-1]):
        return False
    for _ in hooks:
        torch._C._autograd._pop_saved_tensors_default_hooks()
    return True


def resume_region(hooks: list[_Hooks]) -> None:
    """Put back the hooks ``pause_region`` took off (bottom first)."""
    for pack, unpack in hooks:
        torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


class RngState:
    """The RNG states a block saw on entry: CPU, and the devices of its tensor arguments."""

    __slots__ = ("cpu", "device_type", "devices", "states")

    def __init__(self, *args: Any) -> None:
        # As torch's checkpoint does for its own inputs (torch/utils/checkpoint.py,
        # _checkpoint_without_reentrant_generator): a device's state only when its runtime is
        # initialized, so that no CUDA context is created here.
        self.cpu = torch.get_rng_state()
        self.device_type = tuc._infer_device_type(*args)
        module = tuc._get_device_module(self.device_type)
        if getattr(module, "_initialized", False):
            self.devices, self.states = tuc.get_device_states(*args)
        else:
            self.devices, self.states = [], []

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.devices:
            tuc.set_device_states(self.devices, self.states, device_type=self.device_type)


@contextlib.contextmanager
def fork_rng(states: Iterable[RngState]) -> Iterator[None]:
    """Run with the CPU RNG and every device named in ``states`` restored afterwards."""
    states = list(states)
    devices = sorted({d for s in states for d in s.devices})
    device_type = next((s.device_type for s in states if s.devices), "cuda")
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        yield
