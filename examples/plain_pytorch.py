"""gradckpt on a plain PyTorch model: find the blocks, compare policies, train, undo.

Runs on CPU in a few seconds: .venv/bin/python examples/plain_pytorch.py
"""

from __future__ import annotations

import torch
from torch import nn

import gradckpt

torch.manual_seed(0)
VOCAB, DIM, HEADS, LAYERS, BATCH, SEQ = 512, 128, 4, 8, 8, 128


class Block(nn.Module):
    """A pre-norm transformer block (attention + MLP), as in GPT-2 or Llama."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, dropout=0.1, batch_first=True)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(
            nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM), nn.Dropout(0.1)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, mask=mask)  # keyword arguments are fine: the checkpoint is non-reentrant
        logits = self.head(self.norm(x))
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


model = TinyGPT().train()
ids = torch.randint(0, VOCAB, (BATCH, SEQ))

# 1. The blocks gradckpt found (the repeated modules holding most parameters).
blocks = gradckpt.find_blocks(model)
print(f"1. {len(blocks)} blocks: {blocks[0][0]} ... {blocks[-1][0]}")


# 2. What each policy costs on one training step, measured (not estimated). "activations" is
#    what is held for backward when forward ends; "peak" adds weights, gradients and what a
#    block's backward (with its recompute) needs at once. sqrt keeps the least but recomputes a
#    whole segment of blocks at a time, so on a model this small its peak can exceed full's.
def step() -> None:
    torch.manual_seed(0)  # the same dropout masks in every run
    model(ids).backward()


print("\n2. policy      peak       activations  recompute FLOPs")
for policy in ["none", "full", "every:2", "sqrt"]:
    gradckpt.enable(model, policy=policy)
    stats = gradckpt.measure(step, model=model)
    model.zero_grad(set_to_none=True)
    print(
        f"   {policy:<9} {gradckpt.format_bytes(stats.peak_bytes):>10}"
        f" {gradckpt.format_bytes(stats.activation_bytes):>12}"
        f" {stats.recompute_flops / stats.forward_flops:>10.0%} of forward"
    )
gradckpt.disable(model)

# 3. Gradients are exactly those of the model without checkpointing.
step()
expected = {n: p.grad.clone() for n, p in model.named_parameters()}
model.zero_grad(set_to_none=True)
plan = gradckpt.enable(model, policy="sqrt")
step()
same = all(torch.equal(p.grad, expected[n]) for n, p in model.named_parameters())
print(f"\n3. {plan.summary()}: gradients bit-identical to no checkpointing: {same}")

# 4. Train a few steps as usual.
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
for i in range(5):
    loss = model(ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(f"4. step {i}: loss {loss.item():.3f}")

# 5. Undo: the model is exactly what it was (no wrapper modules, same state_dict keys).
keys = list(model.state_dict())
gradckpt.disable(model)
print(f"\n5. disabled; state_dict keys unchanged: {keys == list(model.state_dict())}")
if not same:
    raise SystemExit("gradients differ")
