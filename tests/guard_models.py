"""Models and helpers shared by the guardrail tests (errors, faults, soak, bad input).

A block with attention, BatchNorm, dropout and an MLP that can be made to fail on purpose
(``Block.fail``), a net of such blocks that can fail between blocks (``Net.fail_between``), and
checks that nothing gradckpt or torch's checkpoint pushed is still in effect.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradckpt
from gradckpt import Decision
from gradckpt.runtime.decisions import WRAPPERS
from gradckpt.state import is_recomputing

DIM = 16
CHECKPOINTING = sorted({*WRAPPERS} - {Decision.SAVE}, key=lambda d: d.value)


def policies() -> list[str]:
    """Every registered policy as typed, with every:K as every:2."""
    out = []
    for usage in gradckpt.policy_names(exact=True):
        name, _, arg = usage.partition(":")
        out.append(f"{name}:2" if arg else name)
    return out


def clean_state() -> None:
    """Nothing gradckpt or torch's checkpoint pushed is still in effect."""
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert torch._C._len_torch_dispatch_stack() == 0
    assert torch._C._len_torch_function_stack() == 0
    assert not is_recomputing()


# -- models --------------------------------------------------------------------------------


class Block(nn.Module):
    """Attention, BatchNorm, dropout and an MLP; ``fail`` makes it raise on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.bn = nn.BatchNorm1d(DIM)
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)
        self.drop = nn.Dropout(0.1)
        self.fail: str | None = None  # "forward" or "recompute"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (
            t.view(b, s, 2, DIM // 2).transpose(1, 2) for t in self.qkv(self.norm(x)).chunk(3, -1)
        )
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.1 if self.training else 0.0
        )
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, s, DIM)))
        if self.fail == "forward" or (self.fail == "recompute" and is_recomputing()):
            raise Boom(f"{self.fail} failed")
        h = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return x + self.drop(self.down(F.gelu(self.up(h))))


class Boom(RuntimeError):
    pass


class Net(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, DIM)
        self.layers = nn.ModuleList([Block() for _ in range(n)])
        self.head = nn.Linear(DIM, 50)
        self.fail_between: int | None = None  # raise in the model's own code after this block

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask=mask)
            if self.fail_between == i:
                raise Boom("model code failed between blocks")
        return F.cross_entropy(self.head(h).flatten(0, 1), ids.flatten())


def net(n: int = 4) -> Net:
    torch.manual_seed(0)
    return Net(n).train()


IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(8, 8, dtype=torch.bool).tril()


def grads_after_step(
    model: nn.Module, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(IDS, MASK)
    loss.backward()
    return loss.detach(), {
        n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
    }


def assert_same_step(a: nn.Module, b: nn.Module, seed: int = 0) -> None:
    la, ga = grads_after_step(a, seed)
    lb, gb = grads_after_step(b, seed)
    assert torch.equal(la, lb)
    for n in ga:
        assert (ga[n] is None) == (gb[n] is None) and (
            ga[n] is None or torch.equal(ga[n], gb[n])
        ), n
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def assert_pristine(model: nn.Module, reference: nn.Module) -> None:
    """``model`` is structurally the model it was before enable: no overrides, no hooks."""
    assert gradckpt.applied_plan(model) is None
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert list(model.state_dict()) == list(reference.state_dict())


class LiveStorages(TorchDispatchMode):
    """Every storage an op creates, per device type, until Python or autograd frees it.

    The same bookkeeping as gradckpt.measure.StepTracker (a weak reference per storage), without
    its FLOP counting and phases: half the overhead, for the 1800 steps of the slow soak.
    Tensors that only autograd holds (saved for backward) are counted too: a leaked graph shows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = {}
        self._live: dict[int, tuple[int, str]] = {}
        self._refs: dict[int, Any] = {}

    @property
    def storages(self) -> int:
        return len(self._live)

    def _free(self, key: int) -> None:
        self._refs.pop(key, None)
        n, dev = self._live.pop(key, (0, "cpu"))
        self.bytes[dev] = self.bytes.get(dev, 0) - n

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        n, dev = int(st.nbytes()), t.device.type
        self._live[key] = (n, dev)
        self.bytes[dev] = self.bytes.get(dev, 0) + n
        self._refs[key] = weakref.ref(st, lambda _r, k=key: self._free(k))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if type(t) is torch.Tensor or type(t) is nn.Parameter:
                self._track(t)
        return out
