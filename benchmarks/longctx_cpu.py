"""Long-context decisions measured on CPU: exact bytes and FLOPs of the chunked loss head and tiles.

A Llama-shaped model with Llama 3's 128,256-word vocabulary (random weights, fp32, 2 blocks,
hidden 128, MLP 2048 wide; embeddings and lm_head frozen as in LoRA) at batch 1 x 4,096 tokens, one forward+backward per configuration
under ``gradckpt.measure`` (live-storage counting: exact bytes, exact FLOPs, no timing):

1. ``full``: every block recomputed, the model's own loss (full logits: 4,096 x 128,256 fp32).
2. ``full`` + ``loss_head="chunked"``: logits 523 tokens at a time (the default: 256 MiB of
   fp32 logits), each chunk checkpointed; then chunks of 32 tokens, so that the blocks' backward
   transient, not the head's, sets the peak.
3. the same + ``tile_tokens=1024``: each block's MLP in 4 tiles, each checkpointed.
4. the same with the norms and attention projections tiled too (``tile_norms``, ``tile_proj``).
5. ``lean`` with the same chunks and tiles (offload is recompute on a CPU-only run, so this is
   4).

Run: PYTHONPATH=src python benchmarks/longctx_cpu.py [--seq 4096] [--out FILE.json]
(about 5-10 minutes on one core; peak memory about 6 GiB, for configuration 1's logits).
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from pathlib import Path

import torch
import transformers

import gradckpt

VOCAB = 128_256


def build(seq: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).float().train()
    # Embeddings and lm_head frozen, as in a LoRA/QLoRA fine-tune: their weight gradients (2 x
    # 63 MiB here) would otherwise sit in every peak and hide the blocks' transient.
    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument(
        "--chunk",
        type=int,
        default=32,
        help="a loss chunk small enough that the blocks set the peak",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*OFFLOAD on a CPU-only run.*")
    model = build(args.seq)
    ids = torch.randint(0, VOCAB, (1, args.seq), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    chunk = {"loss_head": "chunked", "loss_chunk": args.chunk}
    configs = {
        "full": {"policy": "full"},
        "full + chunked loss head (default chunk)": {"policy": "full", "loss_head": "chunked"},
        f"full + chunked loss head ({args.chunk})": {"policy": "full", **chunk},
        f"full + chunked ({args.chunk}) + tiles of {args.tile}": {
            "policy": "full",
            "tile_tokens": args.tile,
            **chunk,
        },
        f"full + chunked ({args.chunk}) + tiles of {args.tile}, norms and projections too": {
            "policy": "full",
            "tile_tokens": args.tile,
            "tile_norms": True,
            "tile_proj": True,
            **chunk,
        },
        f"lean (chunks of {args.chunk}, tiles of {args.tile}: MLP, norms, projections)": {
            "policy": "lean",
            "tile_tokens": args.tile,
            "loss_chunk": args.chunk,
        },
    }
    rows = []
    for label, options in configs.items():
        plan = gradckpt.enable(model, **options)
        model.zero_grad(set_to_none=True)
        s = gradckpt.measure(step, model=model)
        rows.append(
            {
                "config": label,
                "plan": plan.summary(),
                "peak_above_start_bytes": s.peak_bytes - s.baseline_bytes,
                "activation_bytes": s.activation_bytes,
                "forward_flops": s.forward_flops,
                "backward_flops": s.backward_flops,
                "recompute_flops": s.recompute_flops,
                "recompute_bytes": s.recompute_bytes,
            }
        )
        print(label, {k: v for k, v in rows[-1].items() if k != "config"}, flush=True)
    gradckpt.disable(model)
    logits_bytes = args.seq * VOCAB * 4
    lm_head_flops = 2 * args.seq * 128 * VOCAB
    result = {
        "what": "benchmarks/longctx_cpu.py: exact bytes and FLOPs from gradckpt.measure",
        "model": "Llama-shaped, 2 blocks, hidden 128, MLP 2048, vocab 128256, fp32, random weights, "
        "embeddings and lm_head frozen",
        "batch": 1,
        "seq": args.seq,
        "logits_bytes": logits_bytes,
        "lm_head_forward_flops": lm_head_flops,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()}, {platform.system()}",
        "rows": rows,
    }
    print(f"one logits tensor: {logits_bytes / 2**20:.1f} MiB; one lm_head forward: "
          f"{lm_head_flops / 1e9:.2f} GFLOP")  # fmt: skip
    print("| configuration | peak above start MiB | kept for backward MiB | recompute GFLOP |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['config']} | {r['peak_above_start_bytes'] / 2**20:.1f} | "
            f"{r['activation_bytes'] / 2**20:.1f} | {r['recompute_flops'] / 1e9:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
