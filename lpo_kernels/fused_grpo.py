"""The GRPO family from hidden states: TRL's ``_compute_loss`` (``grpo.grpo_forward``) on
the log-probs of the fused loss head, never a ``[tokens x vocab]`` tensor.

A GRPO token's gradient depends only on its own row (its token, or the row's mean
log-ratio for GSPO, the off-policy mask, VESPO's weight) and on batch-wide normalisers
known from the mask (``grpo.GRPOScope``). So one pass over chunks of whole rows suffices
(holding only the rows' ``mask != 0`` tokens: ``padding_free.row_chunks``, 6·N_real·H·V):
GEMM, row stats, the chunk's share of the loss (``grpo_forward`` with the batch's scope),
in-place logits gradient, grad GEMMs (6·N·H·V). ``top_entropy_quantile < 1`` needs every
token's entropy before any gradient (the quantile is batch-wide): a first no-grad pass
computes it (8·N·H·V). ``entropy_coef != 0`` (TRL's entropy bonus) differentiates the token
entropy too: d H / d z = -p (log p + H), formed in plain PyTorch on the chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused_linear import (HeadOutputs, _attach, _check_chunk_tokens, _check_head, _needs_grad,
                           _vocab_shard_checked)
from .head_chunk import (Grads, check_grad_weight_fp32, chunk_logits, logits_grad, new_buffer,
                         weight_accumulates_fp32)
from .grpo import (GRPOStats, batch_scope, check_grpo_tensors, check_grpo_values, grpo_forward,
                   grpo_options, high_entropy_mask)
from . import padding_free  # padded input: the GEMMs over the real (mask != 0) tokens only
from . import tensor_parallel  # tp_group=: the vocabulary-parallel hooks
from .reference import compute_dtype


_ENTROPY_GRAD_ROWS = 1024  # rows per block of the entropy-gradient step (bounds its fp32 temporaries)


def _logits_grad_with_entropy_inplace(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor,
                                      grad_logp: Tensor, grad_entropy: Tensor,
                                      inv_temperature: float) -> None:
    """logits <- d(g_lp * logp + g_H * H)/d logits
    = inv_T * (g_lp * onehot - p * (g_lp + g_H * (log p + H))); 0 * log 0 counts as 0.
    Rows with g_lp = g_H = 0 get exact zeros, even over NaN logits (the row kernels'
    contract). Plain PyTorch (every backend), in row blocks with two fp32 temporaries."""
    dtype = compute_dtype(logits.dtype)
    vocab = logits.shape[1]
    for r0 in range(0, logits.shape[0], _ENTROPY_GRAD_ROWS):
        rows = slice(r0, min(r0 + _ENTROPY_GRAD_ROWS, logits.shape[0]))
        g_lp = grad_logp[rows].to(dtype)[:, None]
        grad = logits[rows].to(dtype).mul_(inv_temperature).sub_(lse[rows].to(dtype)[:, None])  # log p
        probs = torch.exp(grad)
        grad.add_(entropy[rows].to(dtype)[:, None]).masked_fill_(probs == 0, 0.0)  # log p + H
        grad.mul_(grad_entropy[rows].to(dtype)[:, None]).add_(g_lp).mul_(probs).neg_()
        t = targets[rows]
        in_range = (t >= 0) & (t < vocab)
        safe = torch.where(in_range, t, torch.zeros_like(t)).long()
        grad.scatter_add_(1, safe[:, None], torch.where(in_range[:, None], g_lp, 0.0))
        quiet = (grad_logp[rows] == 0) & (grad_entropy[rows] == 0)
        logits[rows].copy_(grad.mul_(inv_temperature).masked_fill_(quiet[:, None], 0.0))


def fused_linear_grpo_loss(hidden, weight, target_ids, mask, advantages, *, bias=None,
                           temperature=1.0, old_logp=None, ref_logp=None, sampling_logp=None,
                           importance_sampling_ratio=None, num_items_in_batch=None,
                           chunk_tokens=None, backend="auto", grad_weight_fp32="auto",
                           return_logp=False, return_entropy=False, validate=None, softcap=None,
                           logit_scale=1.0, tp_group=None, vocab_start=None, **options):
    """The GRPO loss family (``grpo.grpo_loss``, TRL 1.16's conventions and option names)
    from padded hidden states ``[B, T, H]`` and the LM head ``weight [V, H]`` (+ ``bias``),
    ``logp = log_softmax(f(h W^T + b) / temperature)[target_ids]`` with ``f`` TRL's logit
    scale and soft-cap (``softcap``/``logit_scale``, as :func:`fused_linear_lpo_loss`).

    Token tensors (``mask``, ``old_logp``, ``ref_logp``, ``sampling_logp``) are ``[B, T]``;
    ``advantages`` ``[B]`` or ``[B, T]``; ``importance_sampling_ratio`` ``[B, T]`` or ``[B, 1]``
    (TRL's vLLM correction, :func:`lpo_kernels.grpo.vllm_importance_sampling_ratio`);
    ``num_items_in_batch``: the generation batch's token count (dapo/cispo/vespo).
    ``**options``: :class:`lpo_kernels.grpo.GRPOOptions` (default ``loss_type="dapo"``); the
    token entropy that ``top_entropy_quantile`` and ``entropy_coef`` need is computed here
    (and differentiated for ``entropy_coef``). Returns ``(loss, stats)``, or ``(loss, stats,
    HeadOutputs(logp, entropy))`` when ``return_logp`` / ``return_entropy`` is set (detached;
    0 at tokens with ``mask == 0`` or a target outside the vocabulary such as -100, as TRL
    writes). ``tp_group``/``vocab_start``: vocabulary-parallel head
    (``lpo_kernels/tensor_parallel.py``)."""
    opts = grpo_options(**options)
    head = _check_head(hidden, weight, target_ids, bias, temperature, False, backend, softcap,
                       logit_scale)
    shape = head.token_shape
    n_rows, seq_len = shape
    check_grpo_tensors(shape, opts, device=hidden.device, old_logp=old_logp, mask=mask,
                       advantages=advantages, ref_logp=ref_logp, sampling_logp=sampling_logp,
                       importance_sampling_ratio=importance_sampling_ratio,
                       num_items_in_batch=num_items_in_batch, ref_name="hidden token")
    check_grpo_values(shape, mask, validate, hidden.device, old_logp=old_logp, advantages=advantages,
                      ref_logp=ref_logp, sampling_logp=sampling_logp,
                      importance_sampling_ratio=importance_sampling_ratio)
    shard = _vocab_shard_checked(head, mask, validate, tp_group, vocab_start)  # None: one process
    chunk_tokens = _check_chunk_tokens(chunk_tokens, "fast")
    grad_weight_fp32 = check_grad_weight_fp32(grad_weight_fp32)
    # chunks of whole rows holding only their real tokens: (rows a:b, their flat token
    # positions, the same relative to row a); with a mask, one host read of the B row counts
    chunks = padding_free.row_chunks(mask, shape, chunk_tokens)
    row_stats, grad_inplace = tensor_parallel.row_kernels(head.backend, shard)
    to_local = (lambda t: t) if shard is None else shard.local_targets
    needs = _needs_grad(hidden, weight, bias)
    want_entropy = return_entropy or opts.needs_entropy
    dtype = head.logp_dtype
    # tokens with a real label that the loss counts; elsewhere logp/entropy are 0 (TRL)
    written = tensor_parallel.labelled_tokens(head.targets, head.weight.shape[0], shard)
    if mask is not None:
        written = written & (mask.reshape(-1) != 0)
    logp = torch.zeros(shape, dtype=dtype, device=hidden.device)
    entropy = torch.zeros(shape, dtype=dtype, device=hidden.device) if want_entropy else None

    def rows_of(x, a, b):
        return None if x is None else x[a:b]

    def store(out, values, tokens):
        out.view(-1)[tokens] = torch.where(written[tokens], values.to(dtype), 0.0)

    with torch.no_grad():
        buffer = new_buffer(head, max((padding_free.n_tokens_of(c[3]) for c in chunks), default=1))
        entropy_mask = None
        if opts.top_entropy_quantile < 1.0:  # pass 1: the quantile needs every entropy first
            for a, b, tokens, local in chunks:
                logits = chunk_logits(buffer, head, tokens, padding_free.n_tokens_of(local))
                _, _, ent = row_stats(logits, head.targets[tokens], head.inv_temperature, True)
                store(entropy, ent, tokens)
            entropy_mask = high_entropy_mask(entropy, mask, opts.top_entropy_quantile)
        scope = batch_scope(mask, shape, opts, num_items_in_batch, entropy_mask, dtype=dtype,
                            device=hidden.device)
        grads = Grads(head, *needs, grad_weight_fp32=weight_accumulates_fp32(grad_weight_fp32, len(chunks)))
        if grads.hidden is not None and mask is not None:
            grads.hidden.zero_()  # padding tokens are in no chunk: their gradient is 0
        entropy_grad = opts.entropy_coef != 0.0
        # pass 1 already stored every entropy: recompute it only for the entropy gradient
        entropy_here = want_entropy and (entropy_mask is None or entropy_grad)
        for a, b, tokens, local in chunks:
            logits = chunk_logits(buffer, head, tokens, padding_free.n_tokens_of(local))
            targets = head.targets[tokens]
            lse, lp, ent = row_stats(logits, targets, head.inv_temperature, entropy_here)
            store(logp, lp, tokens)
            if ent is not None:
                store(entropy, ent, tokens)
            if not any(needs):
                continue
            with torch.enable_grad():
                lp_leaf = logp[a:b].clone().requires_grad_()
                ent_leaf = None if entropy is None else entropy[a:b].clone().requires_grad_(entropy_grad)
                chunk_loss, _ = grpo_forward(
                    lp_leaf, rows_of(old_logp, a, b), rows_of(mask, a, b), advantages[a:b],
                    rows_of(ref_logp, a, b), opts, entropy=ent_leaf,
                    sampling_logp=rows_of(sampling_logp, a, b),
                    importance_sampling_ratio=rows_of(importance_sampling_ratio, a, b),
                    entropy_mask=rows_of(entropy_mask, a, b), scope=scope)
                leaves = [lp_leaf] + ([ent_leaf] if entropy_grad else [])
                token_grads = torch.autograd.grad(chunk_loss, leaves, allow_unused=True)
            g_lp, g_h = (torch.zeros_like(lp_leaf) if g is None else g
                         for g in (list(token_grads) + [None])[:2])
            # tokens without a real label or outside the mask: logp and entropy are the
            # constant 0 there (TRL), so they get no gradient
            counted = written[tokens]
            g_lp_chunk = torch.where(counted, g_lp.reshape(-1)[local], 0.0)
            if entropy_grad:  # the row kernel's contract, blocks of rows and columns included:
                # the per-row factors travel together as the "grad_logp" argument [n, 3]
                def grad_kernel(work, t, lse_rows, per_row, inv_t):
                    _logits_grad_with_entropy_inplace(work, to_local(t), lse_rows, per_row[:, 1], per_row[:, 0],
                                                      per_row[:, 2], inv_t)
                g_h_chunk = torch.where(counted, g_h.reshape(-1)[local], 0.0)
                row_factors = torch.stack([g_lp_chunk, ent.to(g_lp_chunk.dtype), g_h_chunk], 1)
                row_grad = g_lp_chunk.abs() + g_h_chunk.abs()  # 0 exactly where the row's gradient is
            else:
                grad_kernel, row_factors, row_grad = grad_inplace, g_lp_chunk, g_lp_chunk
            logits_grad(grad_kernel, logits, head, targets, lse, row_factors)
            # rows without gradient (outside ``counted``, clipped, ...) keep their hidden states
            # out of grad-weight (a NaN there cannot leak through 0 * NaN)
            grads.add_chunk(logits, head, tokens, row_grad)
        del buffer
        loss, stats = grpo_forward(logp, old_logp, mask, advantages, ref_logp, opts,
                                   entropy=entropy, sampling_logp=sampling_logp,
                                   importance_sampling_ratio=importance_sampling_ratio,
                                   entropy_mask=entropy_mask, scope=scope)
    scale = torch.ones((), dtype=loss.dtype, device=hidden.device)
    hidden = tensor_parallel.copy_to_vocab_parallel(hidden, shard)  # all-reduce in backward
    loss = _attach(loss.detach(), scale, grads, hidden, weight, bias)
    if return_logp or return_entropy:
        return loss, stats, HeadOutputs(logp if return_logp else None,
                                        entropy if return_entropy else None)
    return loss, stats


__all__ = ["fused_linear_grpo_loss", "GRPOStats"]
