"""Logit scaling and soft-capping of the fused loss head (Gemma-2 style).

The head's logits are ``z = f(h W^T + b) / T`` with

    f(u) = softcap * tanh(logit_scale * u / softcap)      (softcap set)
    f(u) = logit_scale * u                                (softcap None)

the order of TRL 1.16's fused LM head (``trl/kernels/chunked_logprob.py``: scale, cap,
then temperature) and of transformers' models (Gemma-2/3 cap the ``lm_head`` output;
MuseGlimmer scales by ``output_multiplier`` before the cap; Cohere/Granite scale only).

Without a cap the scale is folded into the row kernels' ``inv_temperature`` (``s / T``):
exact, free, and the logits-gradient ``(onehot - p) * g * s / T`` is already the chain rule.
With a cap the chunk's logits buffer is overwritten by ``f(u)`` right after its GEMM (one
rounding to the buffer's dtype, the math in fp32/fp64); the row kernels then see ``f(u)``
as their logits. For the gradient, ``f'(u) = logit_scale * (1 - (f(u)/softcap)^2)`` is read
from that same buffer before the row kernel overwrites it with ``d/d f(u)``; both steps run
over blocks of at most ``SLICE_COLUMNS`` columns and ``SLICE_ELEMENTS`` elements, so the
only temporaries are a few fp32 blocks, whatever the chunk's (or ``vocab_blocks.py``'s
all-token tile's) row count: no second ``chunk x V`` buffer.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .options import _check_real
from .reference import compute_dtype

SLICE_COLUMNS = 4096  # vocabulary columns per temporary (tests shrink it to cover slicing)
SLICE_ELEMENTS = 1 << 23  # elements per temporary (32 MiB in fp32): rows are sliced too; larger
# blocks mean fewer launches (a few ops per block), smaller ones fewer bytes held


def check_logit_transform(softcap, logit_scale) -> tuple[float | None, float]:
    """Validated ``(softcap, logit_scale)`` as Python floats (``softcap`` None = no cap)."""
    checked = []
    for name, value in (("softcap", softcap), ("logit_scale", logit_scale)):
        if value is not None or name != "softcap":
            value = _check_real(name, value)  # a finite Python number
            if value <= 0:
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        checked.append(value)
    return checked[0], checked[1]


def _blocks(rows: int, vocab: int):
    """(row slice, first column, end column) blocks covering a [rows, vocab] buffer."""
    for v0 in range(0, vocab, SLICE_COLUMNS):
        v1 = min(v0 + SLICE_COLUMNS, vocab)
        step = max(1, SLICE_ELEMENTS // (v1 - v0))
        for r0 in range(0, rows, step):
            yield slice(r0, min(r0 + step, rows)), v0, v1


def softcap_inplace(logits: Tensor, softcap: float, logit_scale: float) -> None:
    """``logits <- softcap * tanh(logit_scale * logits / softcap)`` (math in fp32/fp64)."""
    for rows, v0, v1 in _blocks(*logits.shape):
        part = logits[rows, v0:v1]
        u = part.to(compute_dtype(part.dtype))
        part.copy_(torch.tanh(u * (logit_scale / softcap)) * softcap)


def softcap_grad_inplace(grad_inplace: Callable, capped: Tensor, targets: Tensor, lse: Tensor,
                         grad_logp: Tensor, inv_temperature: float, softcap: float,
                         logit_scale: float) -> None:
    """``capped`` holds ``f(u)`` of a chunk; overwrite it with ``d loss / d u``:
    the row kernel's ``d/d f(u)`` times ``f'(u) = logit_scale * (1 - (f(u)/softcap)^2)``."""
    for rows, v0, v1 in _blocks(*capped.shape):
        part = capped[rows, v0:v1]
        work = part.to(compute_dtype(part.dtype))  # the slice itself for fp32/fp64 buffers
        chain = (1.0 - (work / softcap).square()).mul_(logit_scale)  # before work is overwritten
        if work.data_ptr() != part.data_ptr():
            work = work.contiguous()
        # Column slice: the one-hot term lands only in the slice that holds the target
        # (targets outside [0, v1 - v0) after the shift get none, as the row kernels specify).
        grad_inplace(work, targets[rows] - v0, lse[rows], grad_logp[rows], inv_temperature)
        # an exact-zero gradient stays 0 over NaN logits (rows without gradient, as the row
        # kernels write them), instead of 0 * NaN
        work.mul_(chain.masked_fill_(work == 0, 0.0))
        if work.data_ptr() != part.data_ptr():
            part.copy_(work)


def transform_logits_reference(logits: Tensor, softcap: float | None, logit_scale: float) -> Tensor:
    """Out-of-place ``f(u)`` for the naive reference head (full logits)."""
    logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


__all__ = ["check_logit_transform", "softcap_inplace", "softcap_grad_inplace",
           "transform_logits_reference", "SLICE_COLUMNS", "SLICE_ELEMENTS"]
