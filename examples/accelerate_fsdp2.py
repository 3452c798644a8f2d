"""A Trainer script with GradCkptCallback under `accelerate launch` and accelerate's FSDP2 plugin.

Run on 2 CPU processes (gloo), in about a minute:

    accelerate launch --cpu --num_processes 2 --use_fsdp --fsdp_version 2 \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
        --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \
        examples/accelerate_fsdp2.py --policy full --out losses.json

or as one process (`python examples/accelerate_fsdp2.py --policy none`) to compare. The same
script runs on GPUs with the same command minus `--cpu`.

What happens, in the order DESIGN.md asks for (checkpointing first, then sharding): accelerate
wraps the model with FSDP2's `fully_shard` when the Trainer prepares it, the callback installs
gradckpt's plan at train start on the model the Trainer trains, and each decoder layer's
forward is checkpointed inside the FSDP unit, so FSDP2's all-gather hooks run outside the
recomputed region (they gather the parameters again for the recompute in backward).
`--policy none,full` trains twice in the same processes; rank 0 writes the logged losses to
`--out` (JSON): `tests/test_accelerate.py` checks that `full` equals `none` bit for bit, and one
process within rounding (the two ranks' mean loss is summed in another order).

On a CPU-only machine accelerate 1.15 ignores the FSDP plugin (it enables FSDP only for
GPU-family devices), so the CPU run is DDP over gloo; the JSON's `wrapped_by` says which
wrapper the Trainer used. FSDP2 itself is tested on CPU with `parallelize`
(`tests/test_distributed.py`, `examples/fsdp2.py`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

GLOBAL_BATCH, SEQ, STEPS, VOCAB = 4, 16, 3, 128


def build_model() -> torch.nn.Module:
    """A small Llama from a config (random weights, nothing downloaded)."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def main() -> None:
    import datasets
    import transformers

    from gradckpt.integrations.hf import GradCkptCallback

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--policy",
        default="full",
        help="gradckpt policies to train with, one run each, comma-separated; 'none': no callback",
    )
    p.add_argument("--out", type=Path, help="write rank 0's logged losses here (JSON)")
    p.add_argument("--workdir", type=Path, default=Path("accelerate-fsdp2-run"))
    args = p.parse_args()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH * STEPS, SEQ), generator=g).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    runs = {}
    for policy in args.policy.split(","):
        targs = transformers.TrainingArguments(
            output_dir=str(args.workdir),
            max_steps=STEPS,
            per_device_train_batch_size=GLOBAL_BATCH // world,  # the same global batch on 1 or 2
            learning_rate=1e-2,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            # On a CPU-only machine: gloo processes. accelerate 1.15 enables its FSDP plugin only
            # for GPU-family devices (AcceleratorState: MULTI_GPU, MULTI_NPU... not MULTI_CPU),
            # so there the Trainer wraps the model in DDP instead (the run reports which).
            use_cpu=not torch.cuda.is_available(),
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
            gradient_checkpointing=False,
        )
        callbacks = [] if policy == "none" else [GradCkptCallback(policy=policy)]
        trainer = transformers.Trainer(
            model=build_model(), args=targs, train_dataset=ds, callbacks=callbacks
        )
        trainer.train()
        history = trainer.state.log_history
        runs[policy] = {
            "losses": [h["loss"] for h in history if "loss" in h],
            "plans": [h["gradckpt/plan"] for h in history if "gradckpt/plan" in h],
            "wrapped_by": type(trainer.model_wrapped).__name__,
        }
    if int(os.environ.get("RANK", "0")) == 0:
        result = {"world": world, "runs": runs}
        print(json.dumps(result))
        if args.out is not None:
            args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
