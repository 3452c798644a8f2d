"""Supervised fine-tuning with TRL + LoRA, fitted to a memory budget by gradckpt.

Runs on CPU in well under a minute, offline: .venv/bin/python examples/hf_sft_lora.py
The model is a small Llama built from a config (random weights) and the tokenizer a word-level
one built here, so nothing is downloaded; with a real checkpoint only steps 1-2 change.

The recipe: SFTConfig(gradient_checkpointing=False), so transformers does not checkpoint, plus
GradCkptCallback(budget=...), which installs gradckpt's plan when training starts and logs the
plan and peak memory. Here the plan is made at train start from one profiled step on an example
batch (`example=`); without one, the first training step runs under policy "full" while it is
profiled, and the plan that fits the budget replaces it from the second step on.
"""

from __future__ import annotations

import random
import tempfile
import warnings

import datasets
import peft
import torch
import transformers
import trl
from tokenizers import Tokenizer, models, pre_tokenizers

import gradckpt
from gradckpt.integrations.hf import GradCkptCallback

transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()
warnings.filterwarnings("ignore", category=FutureWarning)

# 1. A tokenizer and a tiny corpus (sentences of 60-120 words from a 38-word vocabulary).
SENTENCE_WORDS = (
    "the a one two cat dog bird fox sat ran flew jumped on under over near mat log tree hill "
    "big small red blue green old young quick slow and then but so because it they we saw"
)
WORDS = SENTENCE_WORDS.split()
vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
)
rng = random.Random(0)
texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))) for _ in range(64)]

# 2. A small Llama with LoRA adapters on the attention and MLP projections.
config = transformers.LlamaConfig(
    vocab_size=len(vocab),
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)
torch.manual_seed(0)
model = peft.get_peft_model(
    transformers.LlamaForCausalLM(config),
    peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
)

# 3. Pick a budget: halfway between the peaks of no checkpointing and full checkpointing,
#    measured on one batch of the training shape (8 sequences of 128 tokens). On a GPU you would
#    simply write the memory you have, e.g. budget="22GiB".
batch = tokenizer(
    texts[:8], padding="max_length", max_length=128, truncation=True, return_tensors="pt"
)
batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
peaks = {}
for policy in ("none", "full"):
    gradckpt.enable(model, policy=policy)
    peaks[policy] = gradckpt.measure(lambda: model(**batch).loss.backward(), model=model).peak_bytes
    model.zero_grad(set_to_none=True)
gradckpt.disable(model)
budget = (peaks["none"] + peaks["full"]) // 2
print(
    f"3. peak per step: none {gradckpt.format_bytes(peaks['none'])}, "
    f"full {gradckpt.format_bytes(peaks['full'])} -> budget {gradckpt.format_bytes(budget)}"
)

# 4. Train with TRL: transformers' own checkpointing off, gradckpt's plan from the callback.
callback = GradCkptCallback(budget=budget, example=batch)
trainer = trl.SFTTrainer(
    model=model,
    args=trl.SFTConfig(
        output_dir=tempfile.mkdtemp(),
        gradient_checkpointing=False,
        max_length=128,
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    ),
    train_dataset=datasets.Dataset.from_dict({"text": texts}),
    processing_class=tokenizer,
    callbacks=[callback],
)
trainer.remove_callback(transformers.PrinterCallback)  # the table below shows the logs
trainer.train()

print("\n4. step  loss    plan                        host max RSS")
for entry in trainer.state.log_history:
    if "loss" in entry:
        plan = entry.get("gradckpt/plan", "")
        rss = gradckpt.format_bytes(entry["gradckpt/host_max_rss_bytes"])
        print(f"   {entry['step']:>4}  {entry['loss']:.3f}  {plan:<26}  {rss}")
print("   " + callback.plan.table().replace("\n", "\n   "))

# 5. Does the plan fit? Measure one step of the example batch under it.
gradckpt.enable(model, plan=callback.plan)
peak = gradckpt.measure(lambda: model(**batch).loss.backward(), model=model).peak_bytes
model.zero_grad(set_to_none=True)
gradckpt.disable(model)
predicted = callback.plan.notes.get("predicted_peak_bytes", 0)
print(
    f"\n5. peak with the plan: measured {gradckpt.format_bytes(peak)}, predicted "
    f"{gradckpt.format_bytes(predicted)}, budget {gradckpt.format_bytes(budget)}"
)

# 6. The callback removed gradckpt when training ended: the model is as it was.
print(
    f"6. gradckpt still applied after training: {gradckpt.applied_plan(trainer.model) is not None}"
)
