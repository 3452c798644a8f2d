"""``gradckpt plan``: will this fine-tune fit, and what will checkpointing cost? (no GPU, no weights)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConfigError
from ..estimate import estimate
from ..estimate.gpu_count import gpus_needed
from ..estimate.sharding import SHARD_MODES
from ..estimate.sweep import sweep
from ..estimate.training import (
    ADAPTER_DTYPES,
    ATTENTION,
    HF_LOSSES,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
)
from ..plot import png_path
from ._args import gpu_names, int_list, lora_targets, parse_prices, policy_names
from ._progress import progress_bar
from .render import (
    plot_sweep,
    presets_data,
    render_estimate,
    render_gpu_count,
    render_presets,
    render_sweep,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="estimate peak memory and checkpointing cost of a fine-tune (no GPU, no weights)",
        description=(
            "Run the model's real transformers code on fake tensors and predict the peak memory "
            "of one training step for each checkpointing policy, broken down, with the speed cost "
            "of recomputation on a GPU and whether it fits."
        ),
    )
    p.add_argument("model", nargs="?", help="a preset (see --list-models) or a path to config.json")
    p.add_argument(
        "--method", default="full", choices=METHODS, help="what is trained (default: full)"
    )
    p.add_argument(
        "--batch",
        type=int_list,
        default=[1],
        help="micro-batch size, or a comma list to sweep, e.g. 1,2,4,8 (default: 1)",
    )
    p.add_argument(
        "--seq",
        type=int_list,
        default=[2048],
        help="sequence length in tokens, or a comma list to sweep, e.g. 512,1024,2048 "
        "(default: 2048)",
    )
    p.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)"
    )
    p.add_argument(
        "--precision",
        default="bf16",
        choices=PRECISIONS,
        help="bf16 weights/grads/states, mixed (fp32 master weights), fp32, or bf16-true (bf16 "
        "weights, no autocast: a model loaded in bf16 and run as is); bf16 and mixed run "
        "under bf16 autocast like Trainer(bf16=True) (default: bf16)",
    )
    p.add_argument(
        "--optimizer", default="adamw", choices=OPTIMIZERS, help="optimizer (default: adamw)"
    )
    p.add_argument(
        "--attention", default="sdpa", choices=ATTENTION, help="attention kernel (default: sdpa)"
    )
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (default: 32)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: 0.0)")
    p.add_argument(
        "--lora-targets",
        default="all-linear",
        help="modules to adapt: all-linear or a comma list such as q_proj,v_proj (default: all-linear)",
    )
    p.add_argument(
        "--adapter-dtype",
        default="fp32",
        choices=ADAPTER_DTYPES,
        help="LoRA adapter weights: fp32 (peft's default, autocast_adapter_dtype) or in the "
        "base weights' dtype (lit-gpt, torchtune) (default: fp32)",
    )
    p.add_argument(
        "--no-kbit-prep",
        action="store_true",
        help="QLoRA without peft's prepare_model_for_kbit_training (which the default runs: "
        "fp32 embeddings, norms and lm_head)",
    )
    p.add_argument(
        "--bnb-before-0.44",
        dest="nf4_keeps_input",
        action="store_true",
        help="QLoRA as bitsandbytes up to 0.43 ran it: each 4-bit layer keeps its input until "
        "backward (0.44 stopped)",
    )
    p.add_argument(
        "--no-double-quant",
        dest="nf4_double_quant",
        action="store_false",
        help="QLoRA without bitsandbytes' double quantization (fp32 absmax per 64 weights)",
    )
    p.add_argument(
        "--loss",
        "--hf-loss",
        dest="hf_loss",
        default="transformers",
        choices=HF_LOSSES,
        help="the causal-LM loss: the installed transformers' own; shift-copy as "
        "transformers before 4.49 computed it (an extra fp32 copy of the shifted logits); "
        "chunked: gradckpt's chunked loss head under every policy; liger: a model patched by "
        "Liger-Kernel's fused linear cross-entropy, estimated as the chunked head "
        "(default: transformers)",
    )
    p.add_argument(
        "--policy",
        default=None,
        help="comma-separated policies to compare, e.g. none,full,every:2,sqrt,auto (default: "
        "none,full, plus auto, the planner's cheapest plan that fits, when --gpu is given)",
    )
    p.add_argument(
        "--gpu",
        help="GPU preset (see --list-gpus) or a memory size such as 24GB; a comma list "
        "(rtx-4090,a100-80gb) or 'all' to compare GPUs",
    )
    p.add_argument(
        "--gpus",
        metavar="N|auto",
        help="data-parallel GPUs: every figure is then per GPU, each running --batch sequences; "
        "'auto': the fewest of 1, 2, 4, 8, 16... on which each policy fits --gpu",
    )
    p.add_argument(
        "--shard",
        metavar="MODE",
        help=f"how weights, gradients and optimizer states are split over --gpus: "
        f"{', '.join(SHARD_MODES)} (default: ddp; zero* as DeepSpeed's stages)",
    )
    p.add_argument(
        "--overhead",
        help="CUDA allowance as a size (default: 512MiB of CUDA context + what the caching "
        "allocator holds beyond the live tensors, from a replay of the step's allocations)",
    )
    p.add_argument(
        "--host-budget",
        metavar="SIZE",
        help="host RAM offloaded tensors may use (e.g. 128GiB): a policy needing more does not "
        "fit (default: not checked; host memory is shown either way)",
    )
    p.add_argument(
        "--max-positions",
        type=int,
        metavar="N",
        help="the fine-tune extends the context to N positions (RoPE scaling): sequences up to "
        "N are estimated past the config's max_position_embeddings",
    )
    p.add_argument(
        "--image-size",
        metavar="PX|HxW",
        help="vision-language models (required for them): the images' size in pixels, e.g. 448 "
        "or 1024x768; what the model's processor makes of it (resized, tiled, patches) sets the "
        "image tokens and the vision tower's work",
    )
    p.add_argument(
        "--images",
        type=int,
        metavar="N",
        help="vision-language models: images per sequence (default 1)",
    )
    p.add_argument(
        "--no-alternatives",
        action="store_true",
        help="do not estimate alternatives when nothing fits",
    )
    p.add_argument(
        "--full-depth",
        action="store_true",
        help="run every block instead of replaying a few (slower)",
    )
    g = p.add_argument_group(
        "sweeps and searches",
        "the trade-off in numbers: how the peak scales, the largest setting that fits, which GPU",
    )
    g.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw peak memory vs sequence length (or batch), one line per policy, with each "
        "--gpu's capacity as a horizontal line",
    )
    g.add_argument(
        "--max-batch",
        action="store_true",
        help="per GPU, sequence length and policy: the largest micro-batch that fits, with "
        "tokens per step and predicted tokens/s",
    )
    g.add_argument(
        "--max-seq",
        action="store_true",
        help="per GPU, batch and policy: the longest sequence (multiple of --seq-step) that fits",
    )
    g.add_argument(
        "--seq-step",
        type=int,
        default=128,
        help="granularity of the --max-seq search in tokens (default: 128)",
    )
    g.add_argument(
        "--which-gpu",
        action="store_true",
        help="for the setup, every GPU in --gpu (default: every preset) and policy: fits or not, "
        "step time, tokens/s",
    )
    g.add_argument(
        "--price",
        metavar="GPU=PRICE,...",
        help="hourly prices, e.g. rtx-4090=0.35,a100-80gb=1.6: adds the cost per million tokens "
        "(no prices are built in); alone, implies --which-gpu",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--list-models", action="store_true", help="list the model presets and exit")
    p.add_argument("--list-gpus", action="store_true", help="list the GPU presets and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.list_models or args.list_gpus:
        return _lists(args)
    if not args.model:
        raise ConfigError("name a model: gradckpt plan MODEL (see gradckpt plan --list-models)")
    gpus = gpu_names(args.gpu) if args.gpu is not None else []
    policies = policy_names(args.policy) if args.policy is not None else None
    if args.gpus is not None and args.gpus.strip().lower() == "auto":
        return _gpu_count(args, gpus, policies)
    if _is_sweep(args, gpus):
        return _sweep(args, gpus, policies)
    report = estimate(
        args.model,
        batch=args.batch[0],
        seq=args.seq[0],
        policies=policies,
        gpu=gpus[0] if gpus else None,
        alternatives=not args.no_alternatives,
        **_settings(args),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render_estimate(report)
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The training setup and estimator options, as ``estimate`` and ``sweep`` take them."""
    alpha = int(args.lora_alpha) if float(args.lora_alpha).is_integer() else args.lora_alpha
    return {
        "method": args.method,
        "grad_accum": args.grad_accum,
        "precision": args.precision,
        "optimizer": args.optimizer,
        "attention": args.attention,
        "lora_rank": args.lora_rank,
        "lora_alpha": alpha,
        "lora_dropout": args.lora_dropout,
        "lora_targets": lora_targets(args.lora_targets),
        "adapter_dtype": args.adapter_dtype,
        "kbit_prep": not args.no_kbit_prep,
        "nf4_keeps_input": args.nf4_keeps_input,
        "nf4_double_quant": args.nf4_double_quant,
        "hf_loss": args.hf_loss,
        "overhead": args.overhead,
        "full_depth": args.full_depth,
        **_data_parallel(args),
        "host_budget": args.host_budget,
        "max_positions": args.max_positions,
        "image_size": args.image_size,
        "images": args.images,
    }


def _data_parallel(args: argparse.Namespace) -> dict[str, Any]:
    """``--gpus N`` / ``--shard MODE`` as ``estimate`` takes them (the library checks the values)."""
    out: dict[str, Any] = {}
    if args.gpus is not None and args.gpus.strip().lower() != "auto":
        text = args.gpus.strip()
        if not text.lstrip("+-").isdigit():
            raise ConfigError(f"--gpus takes a whole number of GPUs or 'auto', got {args.gpus!r}")
        out["gpus"] = int(text)
    if args.shard is not None:
        out["shard"] = args.shard
    return out


def _gpu_count(args: argparse.Namespace, gpus: list[str], policies: list[str] | None) -> int:
    """``--gpus auto``: how many GPUs each policy needs, for one setting on one GPU."""
    if len(gpus) != 1:
        raise ConfigError("--gpus auto counts GPUs of one kind: name exactly one with --gpu")
    if _is_sweep(args, gpus):
        raise ConfigError(
            "--gpus auto answers for one setting: give one --seq and one --batch, without "
            "--max-batch, --max-seq, --which-gpu, --price or --plot"
        )
    with progress_bar("GPU counts", None, enabled=not args.json) as step:
        report = gpus_needed(
            args.model,
            progress=step,
            gpu=gpus[0],
            shard=args.shard or "fsdp2",
            policies=policies,
            batch=args.batch[0],
            seq=args.seq[0],
            **{k: v for k, v in _settings(args).items() if k not in ("gpus", "shard")},
        )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render_gpu_count(report)
    return 0


def _is_sweep(args: argparse.Namespace, gpus: list[str]) -> bool:
    """Anything beyond one setting on at most one GPU goes through ``sweep``."""
    return bool(
        len(args.seq) > 1
        or len(args.batch) > 1
        or args.plot
        or args.max_batch
        or args.max_seq
        or args.which_gpu
        or args.price is not None
        or len(gpus) > 1
    )


def _sweep(args: argparse.Namespace, gpus: list[str], policies: list[str] | None) -> int:
    searching = args.max_batch or args.max_seq
    several_points = len(args.seq) > 1 or len(args.batch) > 1
    if args.plot:
        try:  # checked before the sweep runs, not after
            png_path(args.plot)
        except ConfigError as e:
            raise ConfigError(f"--plot: {e}") from None
        if not several_points:
            raise ConfigError(
                "--plot draws a sweep: give several --seq values (e.g. 512,1024,2048,4096) "
                "or several --batch values"
            )
    with progress_bar("estimates", None, enabled=not args.json) as step:
        report = sweep(
            args.model,
            seq=args.seq,
            batch=args.batch,
            policies=policies,
            gpu=gpus or None,
            prices=parse_prices(args.price) if args.price is not None else None,
            max_batch=args.max_batch,
            max_seq=args.max_seq,
            # one setting on several GPUs compares them (prices alone imply it: sweep's rule)
            which_gpu=args.which_gpu or not (several_points or searching),
            seq_step=args.seq_step,
            progress=step,
            **_settings(args),
        )
    plot_path = plot_sweep(report, args.plot) if args.plot else None
    if args.json:
        data = report.to_dict()
        data["plot"] = None if plot_path is None else str(plot_path)
        print(json.dumps(data, indent=2))
    else:
        render_sweep(report, grid=several_points)
        if plot_path is not None:
            print(f"plot: {plot_path}")
    return 0


def _lists(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(presets_data(args.list_models, args.list_gpus), indent=2))
    else:
        render_presets(args.list_models, args.list_gpus)
    return 0
