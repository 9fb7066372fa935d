"""The gradient pass of the two-pass head (``mode="low_memory"`` and the log-probs'
backward), by blocks of the vocabulary.

Once every token's log-sum-exp and d loss / d logp are known (pass 1 and the listwise
step), the logits-gradient of a block of vocabulary rows needs nothing else. So this pass
walks the vocabulary rather than the tokens. For each block ``W[v0:v1]`` (Vb rows):

    tile          = h W[v0:v1]^T        N x Vb, one reused buffer
    tile         <- d loss / d logits   row kernel: global lse, targets shifted into the block
    grad_W[v0:v1] = tile^T h            one GEMM over all N tokens
    grad_h       += tile W[v0:v1]       into an fp32 N x H accumulator

Each grad-weight row comes out of a single GEMM: fp32 accumulation inside it and one
rounding to the weight's dtype, the numerics of plain PyTorch's one grad-weight GEMM.
There is no fp32 V x H accumulator (2.3 GiB at V = 151936, H = 4096). Token order, the
previous design, had the opposite trade: grad-hidden from one GEMM per chunk, but
grad-weight summed over every chunk. Here the summed side is grad-hidden, in an fp32
accumulator of 4·N·H bytes (0.25 GiB at N = 16384, H = 4096). It is cast to the hidden
dtype once, in the backward, after the ``grad_output`` scale.

Sizes: the tile holds ``tile_elements`` (``chunk_tokens x V``, the token-order buffer's
memory), so ``Vb = tile_elements / N``, in multiples of 128 rows. When that falls under
``MIN_BLOCK_ROWS`` (N above ``chunk_tokens·V/256``, about 600k tokens at the defaults and
V = 151936), the tokens are split as well. A block's grad-weight is then summed over the
token pieces in an fp32 ``Vb x H`` temporary, still with one rounding. FLOPs are
6·N·H·V, as in token order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .head_chunk import (Head, add_product, chunk_logits, logit_storage_scale, logits_grad, slice_targets,
                         write_product, zero_rows_without_gradient)
from .reference import compute_dtype

MIN_BLOCK_ROWS = 256  # narrowest vocabulary block before the tokens are split too
_ROW_ALIGN = 128


class BlockGrads(NamedTuple):
    """The head's gradients from this pass; None where not needed. ``hidden`` is the
    accumulator (fp32 for bf16/fp16 input); ``weight``/``bias`` are in the weight's dtype."""

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


def block_sizes(n_tokens: int, vocab: int, tile_elements: int) -> tuple[int, int]:
    """(vocabulary rows per block, tokens per piece) for a tile of ``tile_elements``."""
    rows = min(vocab, max(MIN_BLOCK_ROWS, tile_elements // max(n_tokens, 1)))
    if rows < vocab:
        rows = max(_ROW_ALIGN, rows // _ROW_ALIGN * _ROW_ALIGN)
    return rows, max(1, min(n_tokens, tile_elements // rows))


def vocab_blocked_grads(head: Head, needs, targets: Tensor, lse: Tensor, token_grad: Tensor,
                        tile_elements: int, grad_inplace) -> BlockGrads:
    """The head's gradients for per-token ``token_grad`` (d loss / d logp) and ``lse``.

    ``needs``: (hidden, weight, bias) need a gradient. ``targets``: the tokens' ids in
    ``head.weight``'s rows (a tensor-parallel shard's local ids, -1 where none).
    ``grad_inplace``: the backend's plain row kernel (``ops/loss_head.row_kernels``)."""
    hidden, weight, bias = head.hidden, head.weight, head.bias
    n, vocab = hidden.shape[0], weight.shape[0]
    hidden_req, weight_req, bias_req = needs
    bias_req = bias_req and bias is not None
    acc_dtype = compute_dtype(hidden.dtype)
    grad_h = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device) if hidden_req else None
    if n == 0 or not (hidden_req or weight_req or bias_req):
        return BlockGrads(grad_h, torch.zeros_like(weight) if weight_req else None,
                          torch.zeros_like(bias) if bias_req else None)
    # every row of grad_w / grad_b is written below: no memset of V x H
    grad_w = torch.empty_like(weight) if weight_req else None
    grad_b = torch.empty_like(bias) if bias_req else None
    s = logit_storage_scale(hidden.dtype, head.softcap)  # d/du = s * d/d(stored)
    h_w = zero_rows_without_gradient(hidden, token_grad) if weight_req else None
    rows, piece = block_sizes(n, vocab, tile_elements)
    tile_store = torch.empty(piece * rows, dtype=hidden.dtype, device=hidden.device)
    split = piece < n
    # tokens split: a block's grad-weight is summed over the pieces in fp32 (fp32/fp64
    # weights: in place in grad_w itself)
    w_acc = (torch.empty(rows, hidden.shape[1], dtype=acc_dtype, device=hidden.device)
             if split and weight_req and acc_dtype != weight.dtype else None)
    for v0 in range(0, vocab, rows):
        v1 = min(v0 + rows, vocab)
        block = head._replace(weight=weight[v0:v1], bias=None if bias is None else bias[v0:v1])
        local = slice_targets(targets, v0, v1 - v0)
        w_sum = None
        if split and weight_req:
            w_sum = grad_w[v0:v1] if w_acc is None else w_acc[:v1 - v0]
            w_sum.zero_()
        b_acc = (torch.zeros(v1 - v0, dtype=acc_dtype, device=hidden.device) if bias_req else None)
        for t0 in range(0, n, piece):
            t1 = min(t0 + piece, n)
            tokens = slice(t0, t1)
            tile = chunk_logits(tile_store[:(t1 - t0) * (v1 - v0)].view(t1 - t0, v1 - v0), block,
                                tokens, t1 - t0)
            logits_grad(grad_inplace, tile, block, local[tokens], lse[tokens], token_grad[tokens])
            if grad_h is not None:
                add_product(grad_h[tokens], tile, block.weight, s)
            if w_sum is not None:
                add_product(w_sum, tile.t(), h_w[tokens], s)
            elif weight_req:
                write_product(grad_w[v0:v1], tile.t(), h_w, s)
            if b_acc is not None:
                b_acc.add_(tile.sum(0, dtype=acc_dtype), alpha=s)
        if w_acc is not None:
            grad_w[v0:v1].copy_(w_acc[:v1 - v0])
        if b_acc is not None:
            grad_b[v0:v1].copy_(b_acc)
    return BlockGrads(grad_h, grad_w, grad_b)


__all__ = ["vocab_blocked_grads", "block_sizes", "BlockGrads", "MIN_BLOCK_ROWS"]
