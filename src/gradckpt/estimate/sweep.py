"""Sweeps over ``estimate()``: peak vs sequence length and batch, the largest setting that fits, which GPU.

Every number here comes from ``gradckpt.estimate``: a sweep is a loop over it. Fake models are
cached between calls (batch and sequence length do not change the model), so each new batch or
sequence length costs one fake step per policy (1-3 s for a 7B on a 2-core CPU) and asking again
for another GPU costs nothing.

Example:
    >>> import gradckpt
    >>> r = gradckpt.sweep("llama-3-8b", method="lora", seq=[512, 1024, 2048], gpu="rtx-4090",
    ...                    max_batch=True)
    >>> [(p.seq, p.result("full").peak_bytes) for p in r.points]
    >>> [(f.policy, f.batch, f.tokens_per_s) for f in r.largest]
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from .compat import deprecated_csv, deprecated_prices, warn_deprecated
from .estimator import REFERENCE_GPU, check_positions, estimate_one, policy_list
from .gpus import GPU, GPU_PRESETS, get_gpu
from .presets import resolve_model
from .report import GpuOption, LargestFit, PolicyEstimate, SweepPoint, SweepReport
from .search import Capacity, largest_fitting
from .sharding import sharding
from .training import TrainingSetup
from .vision import image_tokens, is_vlm

__all__ = [
    "SWEEP_POLICIES",
    "GpuOption",
    "LargestFit",
    "SweepPoint",
    "SweepReport",
    "gpu_list",
    "gpu_prices",
    "int_values",
    "parse_int_list",
    "parse_prices",
    "sweep",
]

#: Policies a sweep compares when none are named. ``auto`` is left out: its plan depends on the
#: GPU and each one costs a planner profile of the full-depth model (about 10 s for a 7B).
SWEEP_POLICIES = ("none", "full")
#: Largest micro-batch the search tries: far beyond any single-GPU fine-tune, so reaching it
#: means "memory is not the limit".
BATCH_LIMIT = 4096
#: Sequence lengths are searched in multiples of this many tokens (kernels and tokenizers pad
#: to multiples of 64-128 anyway).
SEQ_STEP = 128
#: Longest sequence the search tries when the config states no maximum.
SEQ_LIMIT = 1 << 20


# -- inputs -----------------------------------------------------------------------------------


def int_values(value: int | Sequence[int], what: str) -> list[int]:
    """Whole numbers >= 1 from an int or a list; sorted, without repeats.

    A comma-separated string (``"512,1024"``) is still split, with a DeprecationWarning, until
    the next release (``gradckpt.cli._args.parse_int_list`` parses command lines).

    Args:
        value: ``2048`` or ``[512, 1024]``.
        what: the setting's name, for error messages (``"seq"``, ``"batch"``).

    Returns:
        The values in increasing order.

    Raises:
        ConfigError: an empty list, something that is not a whole number, or a value < 1.

    Example:
        >>> int_values([1024, 512, 1024], "seq")
        [512, 1024]
    """
    if isinstance(value, str):
        tokens = deprecated_csv(value, what, "[512, 1024]")
        value = [] if all(not t for t in tokens) else [_int_token(t) for t in tokens]
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a whole number or a list of them, got {value!r}")
    if isinstance(value, int):
        items: list[Any] = [value]
    elif isinstance(value, Sequence):
        items = list(value)
        if not items:
            raise ConfigError(f"{what} list is empty: give at least one value, e.g. [512, 1024]")
    else:
        raise ConfigError(
            f"{what} must be a whole number or a list of them, got {type(value).__name__}"
        )
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ConfigError(f"{what} value {item!r} is not a whole number")
        if item < 1:
            raise ConfigError(f"{what} must be >= 1, got {item}")
        out.append(item)
    return sorted(set(out))


def _int_token(token: str) -> int | str:
    # a token of a deprecated comma string: digits become an int, the rest stays to be refused
    return int(token) if token.lstrip("+-").isdigit() else token


def gpu_prices(prices: Mapping[str, float] | None, known: Sequence[GPU] = ()) -> dict[str, float]:
    """Hourly GPU prices by preset name, checked; aliases (``"4090"``) resolved.

    There are no built-in prices: they differ between providers and change every month.
    ``"rtx-4090=0.35,a100-80gb=1.6"`` is still parsed, with a DeprecationWarning, until the
    next release (``gradckpt.cli._args.parse_prices`` parses command lines).

    Args:
        prices: ``{GPU name: price per hour}``, or None.
        known: ``GPU`` objects whose names count too (custom GPUs passed to ``sweep``).

    Returns:
        ``{preset name: price per hour}``.

    Raises:
        ConfigError: empty, a price that is not a number, negative or non-finite, a GPU named
            twice, an unknown GPU (with the closest preset), or a bare memory size (a price
            needs a preset's throughput to become a cost per token).

    Example:
        >>> gpu_prices({"4090": 0.35, "a100-80gb": 1.6})
        {'rtx-4090': 0.35, 'a100-80gb': 1.6}
    """
    if prices is None:
        return {}
    if isinstance(prices, str):
        pairs: list[tuple[Any, Any]] = list(deprecated_prices(prices))
    elif isinstance(prices, Mapping):
        pairs = list(prices.items())
    else:
        raise ConfigError(
            f"prices must be a mapping of GPU name to hourly price, got {type(prices).__name__}"
        )
    if not pairs:
        raise ConfigError("price list is empty: write e.g. rtx-4090=0.35,a100-80gb=1.6")
    out: dict[str, float] = {}
    for name, amount in pairs:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"price without a GPU name: write e.g. rtx-4090={amount}")
        gpu = next((g for g in known if g.name == name.strip()), None) or get_gpu(name)
        if not gpu.has_speed:
            raise ConfigError(
                f"price for {name!r}: a bare memory size has no throughput, so no cost per "
                f"token; name a preset ({', '.join(GPU_PRESETS)})"
            )
        try:
            value = float(amount) if not isinstance(amount, bool) else math.nan
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(
                f"price for {name!r} is {amount!r}, not a number; write an hourly price like {name}=0.35"
            )
        if value < 0:
            raise ConfigError(
                f"price for {name!r} is negative ({amount}); prices are >= 0 per hour"
            )
        if gpu.name in out:
            raise ConfigError(f"GPU {gpu.name!r} has two prices; give one")
        out[gpu.name] = value
    return out


def gpu_list(gpu: str | GPU | Sequence[str | GPU] | None) -> list[GPU]:
    """GPUs from a name, a ``GPU``, or a list of them; repeats dropped, in the order given.

    ``"rtx-4090,a100-80gb"`` and ``"all"`` (every preset) are still accepted, with a
    DeprecationWarning, until the next release.

    Raises:
        ConfigError: an empty list or an unknown GPU.
    """
    if gpu is None:
        return []
    names: list[str | GPU]
    if isinstance(gpu, GPU):
        names = [gpu]
    elif isinstance(gpu, str) and gpu.strip().lower() == "all":
        warn_deprecated(
            "gpu='all' is deprecated and will be refused in the next release; pass "
            "gpu=list(gradckpt.estimate.GPU_PRESETS) for every preset"
        )
        names = list(GPU_PRESETS.values())
    elif isinstance(gpu, str):
        if "," in gpu:
            names = [n for n in deprecated_csv(gpu, "gpu", "['rtx-4090', 'a100-80gb']") if n]
        else:
            names = [gpu.strip()] if gpu.strip() else []
    else:
        names = list(gpu)
    if not names:
        raise ConfigError("GPU list is empty: name presets, e.g. rtx-4090,a100-80gb, or 'all'")
    out: list[GPU] = []
    for n in names:
        if isinstance(n, str) and not n:
            continue
        g = get_gpu(n)
        if all(g.name != o.name for o in out):
            out.append(g)
    return out


def parse_int_list(value: int | str | Sequence[int], what: str) -> list[int]:
    """Deprecated: ``int_values`` (lists) or ``gradckpt.cli._args.parse_int_list`` (strings)."""
    warn_deprecated(
        "gradckpt.estimate.sweep.parse_int_list is deprecated: sweep() takes lists; "
        "gradckpt.cli._args.parse_int_list parses command lines"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return int_values(value, what)  # type: ignore[arg-type]


def parse_prices(
    prices: Mapping[str, float] | str | None, known: Sequence[GPU] = ()
) -> dict[str, float]:
    """Deprecated: ``gpu_prices`` (mappings) or ``gradckpt.cli._args.parse_prices`` (strings)."""
    warn_deprecated(
        "gradckpt.estimate.sweep.parse_prices is deprecated: sweep() takes a mapping; "
        "gradckpt.cli._args.parse_prices parses command lines"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return gpu_prices(prices, known)  # type: ignore[arg-type]


def _cost_per_mtok(price: float | None, tokens_per_s: float | None) -> float | None:
    """Dollars (or whatever the price is in) per million tokens: price per hour / tokens per hour."""
    if price is None or not tokens_per_s:
        return None
    return price / 3600.0 / tokens_per_s * 1e6


# -- the sweep --------------------------------------------------------------------------------


class _Estimator:
    """Memoized ``estimate_one`` calls, one policy at a time, for one model and training setup."""

    def __init__(
        self,
        model: Any,
        settings: dict[str, Any],
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.progress = progress
        self.calls = 0
        self._peaks: dict[tuple[str, int, int, str], int | None] = {}
        self._results: dict[tuple[str, int, int, str], PolicyEstimate | None] = {}

    def result(self, policy: str, batch: int, seq: int, gpu: GPU | None) -> PolicyEstimate | None:
        key = (policy, batch, seq, "" if gpu is None else gpu.name)
        if key not in self._results:
            self.calls += 1
            # None: 'auto' found no plan for this GPU at this setting (left out of the point)
            res = estimate_one(self.model, policy, batch=batch, seq=seq, gpu=gpu, **self.settings)
            if self.progress is not None:
                self.progress(f"{policy} b{batch} x {seq}")
            self._results[key] = res
            # over host_budget (offloaded bytes): does not fit, whatever the device peak
            self._peaks[self._peak_key(policy, batch, seq, gpu)] = (
                None if res is None or res.host_fits is False else res.peak_bytes
            )
        return self._results[key]

    @staticmethod
    def _peak_key(policy: str, batch: int, seq: int, gpu: GPU | None) -> tuple[str, int, int, str]:
        # a fixed policy's peak does not depend on the GPU; 'auto' plans for the GPU
        return (policy, batch, seq, gpu.name if policy == "auto" and gpu is not None else "")

    def peak(self, policy: str, batch: int, seq: int, gpu: GPU) -> int | None:
        key = self._peak_key(policy, batch, seq, gpu)
        if key not in self._peaks:
            self.result(policy, batch, seq, gpu)
        return self._peaks[key]


def _timing(res: PolicyEstimate, gpu: GPU) -> tuple[float | None, float | None]:
    return (res.step_time_s, res.tokens_per_s) if gpu.has_speed else (None, None)


def _search(
    est: _Estimator,
    policy: str,
    gpu: GPU,
    *,
    vary: str,
    fixed: int,
    step: int,
    limit: int,
    limit_name: str,
    accum: int,
    price: float | None,
    first: int = 1,
) -> LargestFit | None:
    """The largest batch (``vary="batch"``, at seq ``fixed``) or sequence (multiples of ``step``
    from ``first * step``, at batch ``fixed``) that fits ``gpu``; None when 'auto' has no plan
    at the smallest."""
    calls0 = est.calls
    limit -= first - 1  # k counts from the first setting tried

    def setting(k: int) -> tuple[int, int]:
        return (k, fixed) if vary == "batch" else (fixed, (k + first - 1) * step)

    cap = Capacity(gpu.memory_bytes, lambda k: est.peak(policy, *setting(k), gpu))
    found = cap(1)
    k = largest_fitting(cap, cap.peak, gpu.memory_bytes, limit) if found else 1
    b, s = setting(k)
    res = est.result(policy, b, s, gpu)
    if res is None:
        return None
    limited = None
    nxt: int | None = None
    if found and k >= limit:
        limited = limit_name
    elif found:
        nxt = est.peak(policy, *setting(k + 1), gpu)
    step_s, tps = _timing(res, gpu)
    base_tps = None
    if vary == "batch" and found:
        one = est.result(policy, 1, fixed, gpu)  # probed first: cached
        base_tps = None if one is None else _timing(one, gpu)[1]
    return LargestFit(
        policy=policy,
        gpu=gpu.name,
        vary=vary,
        batch=b,
        seq=s,
        found=found,
        peak_bytes=res.peak_bytes,
        headroom_bytes=gpu.memory_bytes - res.peak_bytes,
        next_peak_bytes=nxt,
        limited_by=limited,
        tokens_per_step=b * s * accum,
        step_time_s=step_s,
        tokens_per_s=tps,
        speed_cost=res.speed_cost,
        batch1_tokens_per_s=base_tps,
        price_per_hour=price,
        cost_per_mtok=_cost_per_mtok(price, tps) if found else None,
        probes=est.calls - calls0,
    )


def sweep(
    model: Any,
    *,
    seq: int | Sequence[int] | None = None,
    batch: int | Sequence[int] | None = None,
    policies: Sequence[str] | str | None = None,
    gpu: str | GPU | Sequence[str | GPU] | None = None,
    prices: Mapping[str, float] | None = None,
    max_batch: bool = False,
    max_seq: bool = False,
    which_gpu: bool = False,
    seq_step: int = SEQ_STEP,
    batch_limit: int = BATCH_LIMIT,
    progress: Callable[[str], None] | None = None,
    **settings: Any,
) -> SweepReport:
    """Estimate a fine-tune over sequence lengths and batch sizes; find the largest that fits; compare GPUs.

    A loop over ``gradckpt.estimate``: every number is an estimate's, on fake tensors, with the
    same allowance and roofline speed model.

    Args:
        model: a preset name, a ``config.json`` path or a ``transformers`` config (as ``estimate``).
        seq: sequence length(s): an int or a list (default 2048).
        batch: micro-batch size(s): an int or a list (default 1).
        policies: policy names to compare (default ``SWEEP_POLICIES``: ``none`` and ``full``);
            ``"auto"`` is planned for each GPU (for the grid: the first GPU).
        gpu: GPU preset(s) or sizes: a name, a ``GPU``, or a list of them
            (``list(GPU_PRESETS)`` for every preset). The grid reports whether each policy
            fits each of them; the searches run per GPU.
        prices: hourly prices by preset (``{"rtx-4090": 0.35}``); adds a cost per million
            tokens. No prices are built in. Every GPU priced must be
            among ``gpu`` (or, for ``which_gpu`` without ``gpu``, a preset).
        max_batch: per GPU, sequence length and policy, search the largest micro-batch whose
            predicted peak fits the GPU (exponential + bisection, each candidate estimated).
        max_seq: the same for the sequence length (multiples of ``seq_step``), per batch size.
        which_gpu: per grid point, every GPU in ``gpu`` (default: every preset) and policy:
            fits or not, step time, tokens/s and, with ``prices``, cost per million tokens.
            Implied by ``prices`` when there is no search.
        seq_step: granularity of the ``max_seq`` search, in tokens (default 128).
        batch_limit: largest batch the ``max_batch`` search tries (default 4096).
        progress: called with a short description after each estimate (a progress bar's step).
        **settings: the rest of the setup, as ``estimate`` takes it: ``method``, ``precision``,
            ``optimizer``, ``grad_accum``, ``attention``, ``lora_rank``..., ``overhead``, and
            ``gpus``/``shard`` (data parallel: every figure per GPU, ``max_batch`` and
            ``max_seq`` search each GPU's micro-batch).

    Comma-separated strings (``seq="512,1024"``, ``gpu="rtx-4090,a100-80gb"``, ``gpu="all"``,
    ``policies="none,full"``, ``prices="rtx-4090=0.35"``) still work until the next release,
    with a DeprecationWarning.

    Returns:
        A ``SweepReport``: ``points`` (one per batch x seq, each with every policy's
        ``PolicyEstimate``), ``largest`` (``LargestFit``), ``gpu_table`` (``GpuOption``);
        ``to_dict()`` is what ``gradckpt plan ... --json`` prints for a sweep.

    Raises:
        ConfigError: empty lists, values that are not whole numbers >= 1, unknown GPUs (also in
            ``prices``), negative prices, a search without a GPU, and everything ``estimate``
            refuses.

    Example:
        >>> r = gradckpt.sweep("llama-3-8b", method="lora", seq=[512, 1024, 2048, 4096],
        ...                    gpu=["rtx-4090", "a100-80gb"], max_batch=True,
        ...                    prices={"rtx-4090": 0.35})
        >>> {(f.gpu, f.policy): f.batch for f in r.largest}
    """
    t0 = time.perf_counter()
    if "alternatives" in settings:
        raise ConfigError("sweep does not estimate alternatives; call estimate() for those")
    seqs = int_values(seq if seq is not None else TrainingSetup().seq, "seq")
    batches = int_values(batch if batch is not None else TrainingSetup().batch, "batch")
    names = policy_list(policies if policies is not None else list(SWEEP_POLICIES))
    gpus = gpu_list(gpu)
    price_of = gpu_prices(prices, gpus)
    for flag, on in (("max_batch", max_batch), ("max_seq", max_seq)):
        if on and not gpus:
            raise ConfigError(f"{flag} searches what fits a GPU: name one or more (gpu=...)")
    if isinstance(seq_step, bool) or not isinstance(seq_step, int) or seq_step < 1:
        raise ConfigError(f"seq_step must be a whole number of tokens >= 1, got {seq_step!r}")
    if isinstance(batch_limit, bool) or not isinstance(batch_limit, int) or batch_limit < 1:
        raise ConfigError(f"batch_limit must be a whole number >= 1, got {batch_limit!r}")
    # prices alone ask which GPU is cheapest; with a search they price its rows
    which = bool(which_gpu or (price_of and not (max_batch or max_seq)))
    table_gpus = gpus if gpus else list(GPU_PRESETS.values())
    if price_of:
        names_in = [g.name for g in (table_gpus if which else gpus)]
        for name in price_of:
            if name not in names_in:
                raise ConfigError(
                    f"price given for {name!r}, which is not among the GPUs asked "
                    f"({', '.join(names_in) or 'none'}); add it to the GPU list"
                )
    if "auto" in names and not gpus:
        raise ConfigError("policy 'auto' plans for a GPU's memory: name one (gpu=...)")
    # The setup as estimate() will build it, checked before the first estimate.
    fields = TrainingSetup.__dataclass_fields__
    base = settings.get("setup") or TrainingSetup()
    if not isinstance(base, TrainingSetup):
        raise ConfigError(f"setup must be a TrainingSetup, got {type(base).__name__}")
    st = base.with_(**{k: v for k, v in settings.items() if k in fields and v is not None})
    accum = st.grad_accum
    split = sharding(settings.get("gpus"), settings.get("shard"))  # checked before any estimate
    spec = resolve_model(model)
    max_pos = check_positions(spec, seqs[-1], settings.get("max_positions"))
    if max_seq and max_pos is not None and max_pos < seq_step:
        raise ConfigError(f"seq_step {seq_step} is longer than {spec.name}'s {max_pos} positions")

    # The model goes to estimate() as given (a preset's name labels the reports); its config
    # is cached there, so each call rebuilds nothing but the step.
    est = _Estimator(model, settings, progress)
    # The grid's estimates (speed figures, 'fits', the plan of 'auto') are for the first GPU
    # with throughput figures; whether each point fits every GPU is in SweepPoint.fits.
    first = next((g for g in gpus if g.has_speed), gpus[0] if gpus else None)
    speed_gpu = first if first is not None and first.has_speed else GPU_PRESETS[REFERENCE_GPU]
    points: list[SweepPoint] = []
    for b in batches:
        for s in seqs:
            results = []
            for p in names:
                res = est.result(p, b, s, first)
                if res is not None:
                    results.append(res)
            fits = {
                r.policy: {g.name: r.peak_bytes <= g.memory_bytes for g in gpus} for r in results
            }
            points.append(
                SweepPoint(
                    batch=b, seq=s, tokens_per_step=b * s * accum, results=results, fits=fits
                )
            )

    notes: list[str] = []
    if any(len(pt.results) != len(names) for pt in points):
        notes.append(
            f"policy 'auto': the planner found no plan for {speed_gpu.name} at some settings "
            "(left out of those points)"
        )
    # a VLM's sequences hold its images: the sequence search starts past their tokens
    first_seq = 1
    if st.image_size is not None and is_vlm(spec.config):
        first_seq = image_tokens(spec.config, st.image_size, st.images) // seq_step + 1
    searches: list[tuple[str, list[int], int, str]] = []
    if max_batch:
        searches.append(("batch", seqs, batch_limit, "search limit"))
    if max_seq:
        k_max = (max_pos if max_pos is not None else SEQ_LIMIT) // seq_step
        why = (
            "search limit"
            if max_pos is None
            else "max_positions"
            if settings.get("max_positions") is not None
            else "max_position_embeddings"
        )
        searches.append(("seq", batches, k_max, why))
    largest: list[LargestFit] = []
    for vary, fixed_values, limit, why in searches:  # rows: per GPU, then setting, then policy
        for g in gpus:
            for fixed in fixed_values:
                for p in names:
                    f = _search(
                        est,
                        p,
                        g,
                        vary=vary,
                        fixed=fixed,
                        step=seq_step,
                        limit=limit,
                        limit_name=why,
                        accum=accum,
                        price=price_of.get(g.name),
                        first=first_seq if vary == "seq" else 1,
                    )
                    if f is not None:
                        largest.append(f)
                        continue
                    other = "seq" if vary == "batch" else "batch"
                    notes.append(
                        f"policy {p!r}: the planner found no plan for {g.name} at the smallest "
                        f"{vary} ({other} {fixed}); not searched"
                    )

    table: list[GpuOption] = []
    if which:
        for pt in points:
            for g in table_gpus:
                for p in names:
                    res = est.result(p, pt.batch, pt.seq, g)
                    if res is None:
                        continue
                    step_s, tps = _timing(res, g)
                    price = price_of.get(g.name)
                    ok = res.peak_bytes <= g.memory_bytes
                    table.append(
                        GpuOption(
                            gpu=g.name,
                            memory_bytes=g.memory_bytes,
                            policy=p,
                            batch=pt.batch,
                            seq=pt.seq,
                            fits=ok,
                            peak_bytes=res.peak_bytes,
                            headroom_bytes=g.memory_bytes - res.peak_bytes,
                            step_time_s=step_s,
                            tokens_per_s=tps,
                            speed_cost=res.speed_cost,
                            price_per_hour=price,
                            cost_per_mtok=_cost_per_mtok(price, tps) if ok else None,
                        )
                    )

    notes += [
        f"every number is gradckpt.estimate's ({est.calls} estimates): peak on fake tensors + "
        "optimizer states + CUDA allowance; speed from the roofline model on the GPU preset",
        "tokens/s = tokens per step / predicted step time on that GPU (recompute included); "
        "larger batches amortize reading the weights, so tokens/s grows with batch until the "
        "matmuls are compute-bound",
    ]
    if max_seq:
        notes.append(f"sequence lengths searched in multiples of {seq_step} tokens")
    if price_of:
        notes.append(
            "cost per million tokens = hourly price / (3600 x predicted tokens/s); prices are the "
            "ones given, none are built in"
        )
    return SweepReport(
        model=spec.name,
        setup={k: v for k, v in st.to_dict().items() if k not in ("batch", "seq")}
        | ({} if split is None else split.to_dict()),
        policies=names,
        gpus=[{**g.to_dict(), "price_per_hour": price_of.get(g.name)} for g in gpus],
        prices=dict(price_of),
        speed_gpu=speed_gpu.name,
        points=points,
        largest=largest,
        gpu_table=table,
        notes=notes,
        elapsed_s=time.perf_counter() - t0,
    )
