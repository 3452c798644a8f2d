"""What a fake step tells transformers so that it runs as it does on a real batch (memory-wise).

Fake tensors have no values: where transformers looks at a batch's values (packed sequences,
padding), these context managers answer as a real batch of one unpadded sequence per row does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["no_padding_checks", "one_sequence_per_row"]


@contextmanager
def one_sequence_per_row() -> Iterator[None]:
    """Tell transformers the fake batch is not packed, as it finds on a real batch.

    transformers looks for packed sequences in the position ids; on a real batch it sees one
    sequence per row and lets SDPA use ``is_causal`` (no mask), but fake tensors count as
    tracing, where it cannot look, so it would build a (batch, 1, seq, seq) mask that SDPA
    then keeps per layer: memory a real run does not use.
    """
    try:
        import transformers.masking_utils as mu
    except ImportError:  # pragma: no cover - older transformers: no packed-sequence detection
        yield
        return
    orig = getattr(mu, "find_packed_sequence_indices", None)
    if orig is None:  # pragma: no cover
        yield
        return
    mu.find_packed_sequence_indices = lambda position_ids: None  # type: ignore[attr-defined]
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = orig  # type: ignore[attr-defined]


@contextmanager
def no_padding_checks(model: nn.Module) -> Iterator[None]:
    """Answer transformers 4.x's "is there padding?" checks as a real batch without padding does.

    The fake batch is random ids with no attention mask, so on a real run of it every mask
    transformers builds is all ones. transformers 5 never reads the values: its ``is_tracing``
    counts fake tensors. 4.x releases such as 4.46 read them, which fake tensors cannot answer
    (DataDependentOutputException on ``.item()``), in two places:

    - ``warn_if_padding_and_no_attention_mask`` (BERT, RoBERTa, ...) tests
      ``pad_token_id in input_ids[:, [-1, 0]]`` only to warn: skipped.
    - ``_prepare_4d_attention_mask_for_sdpa`` (encoders with SDPA) returns None for an
      all-ones mask (SDPA then runs without one) and a (batch, 1, seq, seq) mask otherwise:
      None here, as on the real batch. The modeling modules import it by name, so it is
      replaced in each module's namespace; transformers 5's modeling code has no such name.
    """
    method, mask_fn = "warn_if_padding_and_no_attention_mask", "_prepare_4d_attention_mask_for_sdpa"
    patched = [m for m in model.modules() if callable(getattr(m, method, None))]
    namespaces = {type(m).__module__ for m in model.modules()}
    swapped: list[tuple[Any, Any]] = []
    for name in namespaces:
        ns = sys.modules.get(name)
        if ns is not None and callable(getattr(ns, mask_fn, None)):
            swapped.append((ns, getattr(ns, mask_fn)))
    for m in patched:
        m.__dict__[method] = lambda *args, **kwargs: None
    for ns, _ in swapped:
        setattr(ns, mask_fn, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop(method, None)
        for ns, orig in swapped:
            setattr(ns, mask_fn, orig)
