"""What ``benchmarks.gpu_check`` trains: real model configs with random weights, the step, the predictions.

A workload is one model (a ``gradckpt.estimate`` preset's config, or a tiny config for the CPU
smoke run), a training method and the sequence lengths to run it at. Everything that decides
memory is taken from the same places the estimator takes it from, so measurement and prediction
describe one setup: the config object (``gradckpt.estimate.resolve_model``), the LoRA/freezing
code (``gradckpt.estimate.training.apply_method``, which runs peft's ``get_peft_model``), bf16
weights under bf16 autocast, fused AdamW with its states in the weights' dtype, SDPA attention,
batch 1, labels = inputs, the model's output dropped before backward (as Trainer does).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "GPU_WORKLOADS",
    "SMOKE_WORKLOADS",
    "Workload",
    "build_model",
    "gpu_spec",
    "make_step",
    "missing_packages",
    "owned_bytes",
    "policies_to_run",
    "predict",
    "predict_auto",
]


@dataclass(frozen=True)
class Workload:
    """One model and method, run at each of ``seqs``.

    Attributes:
        name: what tables call it (``"llama-3.1-8b-lora"``).
        model: a ``gradckpt.estimate`` preset name, or a callable returning a transformers config.
        method: ``"full"`` or ``"lora"`` (``TrainingSetup.method``).
        seqs: sequence lengths, shortest first (a time guard drops the longest first).
        batch: micro-batch size.
        share: fraction of the measuring time this workload may use (its guard).
        needs: importable packages it needs beyond transformers (``("peft",)``).
    """

    name: str
    model: str | Callable[[], Any]
    method: str
    seqs: tuple[int, ...]
    batch: int = 1
    share: float = 1.0
    needs: tuple[str, ...] = ()


def _tiny(kind: str) -> Callable[[], Any]:
    """A two-block config of a real family, small enough for a CPU step in milliseconds."""

    def make() -> Any:
        import transformers

        common = dict(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            use_cache=False,
        )
        if kind == "qwen2":
            return transformers.Qwen2Config(**common, tie_word_embeddings=True)
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)

    make.__name__ = f"tiny_{kind}"
    return make


#: The GPU run: the issue's three models. Shares add up to 1; the 8B LoRA gets the most (a step
#: at 4096 tokens is ~0.3 s on an H100 against ~0.05 s for the 1B). ~9 configurations x (2
#: memory steps + 1 warm-up + 4 timed rounds) per sequence length keeps each within its share.
GPU_WORKLOADS: tuple[Workload, ...] = (
    Workload("qwen2.5-0.5b", "qwen2.5-0.5b", "full", (1024, 4096, 8192), share=0.25),
    Workload("llama-3.2-1b", "llama-3.2-1b", "full", (1024, 4096, 8192), share=0.3),
    Workload(
        "llama-3.1-8b-lora", "llama-3.1-8b", "lora", (1024, 4096), share=0.45, needs=("peft",)
    ),
)

#: The CPU smoke run: the same code paths on two-block configs of the same families.
SMOKE_WORKLOADS: tuple[Workload, ...] = (
    Workload("tiny-qwen2", _tiny("qwen2"), "full", (256,), share=0.5),
    Workload("tiny-llama-lora", _tiny("llama"), "lora", (256,), share=0.5, needs=("peft",)),
)


def missing_packages(workload: Workload) -> list[str]:
    """Packages ``workload`` needs (transformers and its ``needs``) that cannot be imported here."""
    return [p for p in ("transformers", *workload.needs) if importlib.util.find_spec(p) is None]


def config_of(workload: Workload) -> Any:
    """The transformers config both the real model and the estimate are built from."""
    if callable(workload.model):
        return workload.model()
    from gradckpt.estimate import resolve_model

    return resolve_model(workload.model).config


def setup_of(workload: Workload, seq: int) -> Any:
    """The ``TrainingSetup`` the estimator is given for ``workload`` at ``seq``."""
    from gradckpt.estimate import TrainingSetup

    return TrainingSetup(
        method=workload.method,
        batch=workload.batch,
        seq=seq,
        precision="bf16",
        optimizer="adamw",
        attention="sdpa",
    )


def build_model(workload: Workload, device: torch.device) -> nn.Module:
    """The workload's model with random weights, on ``device``, in bf16, trainable as its method says.

    Built directly on the device (an 8B model is 16 GB in bf16: no detour through host memory).
    """
    import transformers

    from gradckpt.estimate.training import apply_method

    cfg = config_of(workload)
    cfg.use_cache = False
    setup = setup_of(workload, workload.seqs[0])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(setup.weight_dtype)  # dtype= / torch_dtype= differ across versions
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=device, dtype=setup.weight_dtype)
    model, _notes = apply_method(model, setup)
    return model.train()


def make_step(
    model: nn.Module, batch: int, seq: int, device: torch.device
) -> tuple[Callable[[], None], dict[str, torch.Tensor], torch.optim.Optimizer]:
    """One optimizer step of ``model`` on a random batch: ``(step, batch, optimizer)``.

    bf16 autocast around the forward (as ``Trainer(bf16=True)``), the output dropped before
    backward, fused AdamW over the trainable parameters,
    gradients set to None after the step. AdamW creates its states at its first step: run one
    step before measuring (the kit's warm-up does).
    """
    vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator, union-attr]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    data = {"input_ids": ids, "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel, no per-step temporaries (what the estimator assumes); CPU has it since torch 2.4
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, data, opt


def policies_to_run() -> list[str]:
    """Every registered policy, ``every:K`` as ``every:2``, ``none`` first (new ones join by themselves)."""
    import gradckpt

    names = []
    for p in gradckpt.policy_names():
        name, sep, _arg = p.partition(":")
        names.append(f"{name}:2" if sep else name)
    return ["none", *(n for n in names if n != "none")]


#: NVIDIA datasheet figures for cards the estimator has no preset for: (TFLOPS dense bf16,
#: GB/s). H200 SXM: same Hopper die as H100 (989 TFLOPS dense bf16), HBM3e at 4.8 TB/s.
_EXTRA_SPEEDS = {"h200": (989.0, 4800.0, "NVIDIA H200 SXM datasheet")}


def gpu_spec(device: torch.device) -> Any:
    """The ``gradckpt.estimate.GPU`` the roofline predictions use for this device.

    A preset when the device name matches one (``H100`` -> ``h100``), datasheet figures for an
    H200; otherwise the estimator's reference GPU (the report says which was used).
    """
    from gradckpt.estimate import GPU, GPU_PRESETS, REFERENCE_GPU, get_gpu

    if device.type != "cuda":
        return get_gpu(REFERENCE_GPU)
    name = torch.cuda.get_device_name(device).lower()
    memory = torch.cuda.get_device_properties(device).total_memory
    for key, (tflops, gbs, source) in _EXTRA_SPEEDS.items():
        if key in name:
            return GPU(key, memory, tflops, gbs, source)
    # the longest preset name found in the device name ("a100-80gb" needs "a100" and 80 GB)
    best = None
    for key, g in GPU_PRESETS.items():
        family = key.split("-")[0].replace("rtx", "").strip()
        if family and family in name.replace(" ", "").replace("-", ""):
            close = abs(g.memory_bytes - memory) / memory < 0.1
            if close and (best is None or len(key) > len(best)):
                best = key
    return get_gpu(best or REFERENCE_GPU)


def _allocated(pe: Any) -> int:
    """Predicted peak of allocated bytes: the estimate's peak less its CUDA allowance."""
    return int(pe.peak_bytes - pe.breakdown.get("cuda_overhead", 0))


def _reserved(pe: Any) -> int:
    """Predicted peak reserved by the caching allocator: allocated plus the estimator's slack.

    The estimate's allowance is the CUDA context (which torch's reserved figure leaves out)
    plus ``ALLOCATOR_SLACK`` of the tensors; a report that predicts reserved bytes itself
    (a ``reserved_bytes`` field) is used as is.
    """
    from gradckpt.estimate.estimator import ALLOCATOR_SLACK

    own = getattr(pe, "reserved_bytes", None)
    if isinstance(own, int):
        return own
    return int(_allocated(pe) * (1 + ALLOCATOR_SLACK))


def _row(pe: Any) -> dict[str, Any]:
    return {
        "plan": pe.plan,
        "allocated_bytes": _allocated(pe),
        "reserved_bytes": _reserved(pe),
        "peak_bytes": int(pe.peak_bytes),
        "speed_cost": float(pe.speed_cost),
        "step_time_s": float(pe.step_time_s),
    }


def predict(workload: Workload, seq: int, policies: Sequence[str], gpu: Any) -> dict[str, Any]:
    """``gradckpt.estimate``'s predictions for every policy of ``policies`` at ``seq`` on ``gpu``.

    Returns:
        ``{"policies": {policy: row}, "notes": [...], "speed_gpu": name, "elapsed_s": float}``;
        a row has ``allocated_bytes``, ``reserved_bytes``, ``peak_bytes``, ``speed_cost``,
        ``step_time_s`` and ``plan``.
    """
    import time

    import gradckpt

    t0 = time.perf_counter()
    report = gradckpt.estimate(
        config_of(workload),
        setup=setup_of(workload, seq),
        policies=list(policies),
        gpu=gpu,
        alternatives=False,
    )
    return {
        "policies": {r.policy: _row(r) for r in report.results},
        "notes": list(report.notes),
        "speed_gpu": report.speed_gpu,
        "elapsed_s": time.perf_counter() - t0,
    }


def predict_auto(workload: Workload, seq: int, budget: int, gpu: Any) -> dict[str, Any]:
    """The estimator's ``auto`` at ``budget`` bytes: the plan its planner picks, and its costs.

    Estimated with no CUDA allowance on a GPU of exactly ``budget`` bytes (``gpu``'s speed
    figures), so the estimator's planner plans for the same bytes ``gradckpt.plan(model,
    budget, ...)`` is given on the device.

    Returns:
        ``{"auto": row}`` (a row as in ``predict``), or ``{"auto_error": why}``.
    """
    import gradckpt
    from gradckpt.errors import GradCkptError
    from gradckpt.estimate import GPU

    room = GPU(f"budget {budget}", budget, gpu.bf16_tflops, gpu.bandwidth_gbs, "gpu_check")
    try:
        auto = gradckpt.estimate(
            config_of(workload),
            setup=setup_of(workload, seq),
            policies=["auto"],
            gpu=room,
            overhead=0,
            alternatives=False,
        )
    except GradCkptError as e:
        return {"auto_error": str(e)}
    return {"auto": _row(auto.results[0])}


def fits(predicted_bytes: int | None, device: torch.device) -> bool:
    """Whether a predicted peak leaves 5% of the device's free memory (CPU: always)."""
    if device.type != "cuda" or predicted_bytes is None:
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return predicted_bytes <= 0.95 * (free + torch.cuda.memory_reserved(device))


def owned_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the model's parameters, buffers and optimizer states (each storage once)."""
    seen: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def relative_error(measured: int | None, predicted: int | None) -> float | None:
    """(predicted - measured) / measured: positive when the estimate is above the measurement."""
    if not measured or predicted is None:
        return None
    return (predicted - measured) / measured
