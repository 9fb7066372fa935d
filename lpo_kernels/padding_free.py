"""Padding-free loss head: on padded ``[B, T]`` input with a mask, the head's GEMMs run
over the real (``mask != 0``) tokens only, so the work is 6·N_real·H·V (``fast``) or
8·N_real·H·V (``low_memory``, and ``fused_linear_logprobs`` forward + backward) instead of
counting every padded position. Outputs stay in the caller's padded layout: log-probs and
entropy are 0 at padding, gradients there are exactly 0 (padding hidden states are never
read, so a NaN there reaches nothing).

Design. One host read per call: the B per-row counts of real tokens (``mask != 0``), which
size the compacted GEMMs (a GEMM's shape must be known on the host; ``nonzero`` would be
the same sync). The fast mode's whole-group plan reuses that host copy of the offsets
(``host_offsets``), so with ``group_size`` this is the call's only read; with ``group_ids``
the plan reads the B group slots as well (as it does for packed input). From them, on the device: the flat positions of the real tokens
(``nonzero_static`` with the known size: no second sync), row-major, so each row's real
tokens stay contiguous and in order, and the compacted layout is a packed layout with
``cu_seqlens`` = the cumulative counts. Then:

- LPO (:func:`fused_linear_lpo_loss`): the padded call becomes the packed call on the
  gathered tokens (``hidden``, ``target_ids``, ``mask`` weights, ``old_logp``,
  ``token_grad_weights``), so everything the packed path does holds unchanged: whole-group
  chunks in ``fast`` (on the compacted layout), the listwise math, ``group_stats``,
  ``tp_group``, soft-cap. Dropping a masked token is exact: the listwise math reads a token
  only through its mask weight.
- log-probs (:func:`fused_linear_logprobs` with ``mask=``): the same gather, then a scatter
  into zeros.
- GRPO: :func:`row_chunks` plans chunks of whole rows by their real-token counts; the
  loss head gathers each chunk's real tokens (no compact copy of ``hidden``).

Memory: LPO and log-probs gather the real hidden states once (N_real x H in the hidden
dtype, and the same for their gradient before it is scattered back): O(N·H) like the
gradient itself, never a [tokens x vocab] tensor. Input without padding (every mask entry
non-zero), packed input and ``mask=None`` take the unchanged path.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor


class Compaction(NamedTuple):
    """Where the real tokens of a padded ``[B, T]`` batch sit."""

    index: Tensor          # [N_real] flat padded positions of the real tokens (row-major)
    cu_seqlens: Tensor     # [B + 1] row offsets in the compacted layout (device, int64)
    token_shape: tuple     # (B, T)

    @property
    def n_real(self) -> int:
        return self.index.numel()


def compaction(mask: Tensor, token_shape: tuple) -> Compaction | None:
    """The compaction of a padded batch, or None when it has no padding to drop."""
    n_rows, seq_len = token_shape
    real = (mask != 0).reshape(n_rows, seq_len)
    counts = real.sum(1)
    offsets = [0, *itertools.accumulate(counts.tolist())]  # the one host read (B ints)
    n_real = offsets[-1]
    if n_real == n_rows * seq_len:
        return None
    index = torch.nonzero_static(real.reshape(-1), size=n_real).reshape(-1)
    cu_seqlens = torch.zeros(n_rows + 1, dtype=torch.long, device=mask.device)
    torch.cumsum(counts, 0, out=cu_seqlens[1:])
    cu_seqlens._lpo_host_offsets = offsets  # the fast plan reads these, not the device copy
    return Compaction(index, cu_seqlens, (n_rows, seq_len))


def host_offsets(cu_seqlens: Tensor) -> list:
    """``cu_seqlens`` as a list: the host copy :func:`compaction` made with it (no read),
    else one read of the device tensor."""
    known = getattr(cu_seqlens, "_lpo_host_offsets", None)
    return list(known) if known is not None else cu_seqlens.tolist()


def gather(x: Tensor | None, comp: Compaction) -> Tensor | None:
    """A ``[B, T, ...]`` tensor (or one that broadcasts to ``[B, T]``) at the real tokens."""
    if x is None:
        return None
    if x.dim() < 2 or tuple(x.shape[:2]) != comp.token_shape:
        x = torch.broadcast_to(x, comp.token_shape)
    return x.reshape(comp.token_shape[0] * comp.token_shape[1], *x.shape[2:])[comp.index]


def gather_hidden(hidden: Tensor, comp: Compaction) -> Tensor:
    """``[B, T, H]`` -> ``[N_real, H]``; differentiable (backward scatters into zeros)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, comp.index)


def scatter(values: Tensor | None, comp: Compaction) -> Tensor | None:
    """``[N_real]`` -> ``[B, T]`` with 0 at padding; differentiable w.r.t. ``values``."""
    if values is None:
        return None
    n = comp.token_shape[0] * comp.token_shape[1]
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_copy(0, comp.index, values).view(comp.token_shape)


def eligible(hidden, mask, cu_seqlens=None, exact=(), broadcast=()) -> bool:
    """Padded ``[B, T, H]`` input with a ``[B, T]`` mask whose other token tensors have the
    token shape (``exact``) or broadcast to it (``broadcast``); else the unchanged path
    runs and raises its own errors."""
    if cu_seqlens is not None or not isinstance(hidden, Tensor) or hidden.dim() != 3:
        return False
    shape = tuple(hidden.shape[:2])
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape or mask.device != hidden.device:
        return False
    for x, strict in [(x, True) for x in exact] + [(x, False) for x in broadcast]:
        if x is None:
            continue
        if not isinstance(x, Tensor) or x.device != hidden.device:
            return False
        if strict and tuple(x.shape) != shape:
            return False
        try:
            if torch.broadcast_shapes(tuple(x.shape), shape) != shape:
                return False
        except RuntimeError:
            return False
    return True


def row_chunks(mask: Tensor | None, token_shape: tuple, chunk_tokens: int) -> list:
    """Chunks of whole rows for the GRPO head, ``(a, b, tokens, local)`` per chunk: rows
    ``a:b``, the flat padded positions of their real tokens (a slice when nothing is
    dropped) and those positions relative to row ``a`` (for the rows' ``[b-a, T]`` view).
    Rows are packed while their real tokens fit ``chunk_tokens`` (a row longer than that
    is a chunk of its own). Without a mask: fixed rows per chunk from shapes (no read)."""
    n_rows, seq_len = token_shape
    if seq_len == 0 or n_rows == 0:
        return []
    if mask is None:
        step = max(1, chunk_tokens // seq_len)
        return [(a, min(a + step, n_rows), slice(a * seq_len, min(a + step, n_rows) * seq_len),
                 slice(0, (min(a + step, n_rows) - a) * seq_len)) for a in range(0, n_rows, step)]
    real = (mask != 0).reshape(n_rows, seq_len)
    counts = real.sum(1).tolist()  # the one host read (B ints)
    bounds, a, size = [], 0, 0
    for row, count in enumerate(counts):
        if row > a and size + count > chunk_tokens:
            bounds.append((a, row, size))
            a, size = row, 0
        size += count
    bounds.append((a, n_rows, size))
    plan = []
    for a, b, size in bounds:
        if size == (b - a) * seq_len:
            plan.append((a, b, slice(a * seq_len, b * seq_len), slice(0, size)))
        elif size:
            local = torch.nonzero_static(real[a:b].reshape(-1), size=size).reshape(-1)
            plan.append((a, b, local + a * seq_len, local))
    return plan


def n_tokens_of(index) -> int:
    """Length of a chunk's token index (a slice or an index tensor)."""
    return index.stop - index.start if isinstance(index, slice) else index.numel()
