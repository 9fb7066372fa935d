"""The listwise step of LPO in Triton: per-token log-probs -> sequence scores -> group
softmax -> target -> divergence -> per-token gradient, plus the loss and every stat.

Implements ``reference.listwise_forward``'s contract (``ListwiseResult``); the math is
the spec (../../shared/docs/lpo-math.md, sections 1-3) and ``reference.py`` is the test
oracle. Everything is computed in fp32 (fp64 for fp64 inputs), in log-space with group
maxima subtracted.

Two paths, both free of host synchronisation (``reduction="none"`` with arbitrary group
ids excepted, exactly like the reference):

* fast path (``group_size=K`` given, K <= ``MAX_FUSED_GROUP``): ``_listwise_groups_kernel``
  runs one program per group. It streams the group's K rows once to form the scores,
  does the group softmax / target / divergence / coefficients in registers, streams
  again to write ``token_grad``, and writes one row of per-group partials.
  ``_finalize_kernel`` (one program) reduces the partials into the loss and the stats.
  2 launches forward. For ``reduction="mean"`` the data-dependent 1/G is returned as
  ``grad_scale`` instead of a second pass over the tokens.
* general path (arbitrary ids, unequal groups, groups larger than MAX_FUSED_GROUP): a
  stable ``torch.sort`` of the ids and a ``searchsorted`` segment them on the device;
  ``_sequence_sums_kernel`` forms every sequence's sums, ``_segmented_groups_kernel``
  (one program per sorted position; the one where a group starts owns it) does the group
  math over chunks of members, ``_sequence_grad_kernel`` writes the token gradient and the
  clip counts, and the same ``_finalize_kernel`` reduces. 4 Triton launches + the sort.

The per-member formulas (target logits, log-softmax, divergence terms, coefficients) are
written once as ``@triton.jit`` helpers that take the group statistics as arguments; the
two paths differ only in how they gather those statistics.

Backward (``functional.AttachTokenGrad``) only multiplies ``token_grad`` by
``grad_output`` (and ``grad_scale``); ``scale_token_grad`` (end of file) does that, and the
cast to logp's dtype, in one launch.

Under ``torch.compile`` the kernels are called through ``torch.library.triton_op``
custom ops (when this torch has them), so a call traces without a graph break; eager
calls launch the kernels directly (no dispatcher overhead).
"""

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ..inputs import ListwiseBatch, malformed_offsets
from ..options import LPOOptions
from ..stats import LPOStats

MAX_FUSED_GROUP = 128  # larger groups go to the general path (one group must fit registers)
POISON_OUTPUTS = False  # tests set True: outputs start as NaN, so unwritten elements show
_N_PARTIALS = 11  # columns of the partials matrix (see _finalize_kernel)


# =========================================================================== kernels
@triton.jit
def _row_extents(rows, row_ok, cu_ptr, T, n_seqs, n_tokens, PACKED: tl.constexpr):
    """First token offset and length of each row (sequence), the longest length, and the
    number of malformed offsets each row owns (row b: offset b+1; row 0 also offset 0;
    ``inputs.malformed_offsets`` counts the same). Packed offsets are clamped: row b reads
    tokens [c_b, max(c_b, c_{b+1})) with c = clamp(cu_seqlens, 0, N), so malformed
    cu_seqlens (validate=False) never reach outside the N tokens."""
    if PACKED:
        n_tokens = tl.cast(n_tokens, tl.int64)
        first = tl.load(cu_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        last = tl.load(cu_ptr + rows + 1, mask=row_ok, other=0).to(tl.int64)
        starts = tl.minimum(tl.maximum(first, 0), n_tokens)
        lengths = tl.where(row_ok, tl.minimum(tl.maximum(last, starts), n_tokens) - starts, 0)
        bad = ((last < 0) | (last > n_tokens) | (last < first)
               | ((rows == n_seqs - 1) & (last != n_tokens)))
        bad_offsets = bad.to(tl.int32) + ((rows == 0) & (first != 0)).to(tl.int32)
        bad_offsets = tl.where(row_ok, bad_offsets, 0)
    else:
        starts = rows.to(tl.int64) * T
        lengths = tl.where(row_ok, T, 0).to(tl.int64)
        bad_offsets = tl.where(row_ok, 0, 0).to(tl.int32)
    return starts, lengths, tl.max(lengths, axis=0), bad_offsets


@triton.jit
def _zero_outside_sequences(grad_ptr, cu_ptr, n_seqs, n_tokens, BLOCK: tl.constexpr):
    """token_grad = 0 before the first clamped offset and from the last one on: the only
    tokens no row's range can hold (nothing to do for well-formed cu_seqlens)."""
    n_tokens = tl.cast(n_tokens, tl.int64)
    head = tl.minimum(tl.maximum(tl.load(cu_ptr).to(tl.int64), 0), n_tokens)
    tail = tl.minimum(tl.maximum(tl.load(cu_ptr + n_seqs).to(tl.int64), 0), n_tokens)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    zeros = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
    for t0 in range(0, head, BLOCK):
        tl.store(grad_ptr + t0 + offs, zeros, mask=t0 + offs < head)
    for t0 in range(tail, n_tokens, BLOCK):
        tl.store(grad_ptr + t0 + offs, zeros, mask=t0 + offs < n_tokens)


@triton.jit
def _load_delta(logp_ptr, old_ptr, mask_ptr, offs, inside, DTYPE: tl.constexpr,
                HAS_OLD: tl.constexpr, HAS_MASK: tl.constexpr):
    """delta = logp - old_logp (0 where the token does not count) and the mask weight,
    upcast right after the load (bf16 arithmetic is never done in bf16)."""
    logp = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(DTYPE)
    if HAS_OLD:
        old = tl.load(old_ptr + offs, mask=inside, other=0.0).to(DTYPE)
    else:
        old = logp
    if HAS_MASK:
        weight = tl.load(mask_ptr + offs, mask=inside, other=0).to(DTYPE)
    else:
        weight = tl.where(inside, 1.0, 0.0).to(DTYPE)
    weight = tl.where(inside, weight, 0.0)
    delta = tl.where(weight != 0, logp - old, 0.0)
    return delta, weight


@triton.jit
def _row_token_sums(logp_ptr, old_ptr, mask_ptr, starts, lengths, max_len,
                    DTYPE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_MASK: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per row: sum_t m*delta and N = sum_t m."""
    summed = tl.zeros([BLOCK_ROWS], dtype=DTYPE)
    n_tok = tl.zeros([BLOCK_ROWS], dtype=DTYPE)
    cols = tl.arange(0, BLOCK_T)
    for t0 in range(0, max_len, BLOCK_T):
        t = t0 + cols
        inside = t[None, :] < lengths[:, None]
        offs = starts[:, None] + t[None, :]
        delta, weight = _load_delta(logp_ptr, old_ptr, mask_ptr, offs, inside, DTYPE,
                                    HAS_OLD, HAS_MASK)
        summed += tl.sum(weight * delta, axis=1)
        n_tok += tl.sum(weight, axis=1)
    return summed, n_tok


@triton.jit
def _write_token_grad(grad_ptr, logp_ptr, old_ptr, mask_ptr, starts, lengths, max_len,
                      seq_scale, coef, low, high, DTYPE: tl.constexpr, HAS_OLD: tl.constexpr,
                      HAS_MASK: tl.constexpr, CLIP: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                      BLOCK_T: tl.constexpr):
    """token_grad = seq_scale * m * clipgate; returns per-row counts of counted tokens
    and of counted tokens clipped low / high / either."""
    n_counted = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    n_low = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    n_high = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    n_any = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    cols = tl.arange(0, BLOCK_T)
    for t0 in range(0, max_len, BLOCK_T):
        t = t0 + cols
        inside = t[None, :] < lengths[:, None]
        offs = starts[:, None] + t[None, :]
        delta, weight = _load_delta(logp_ptr, old_ptr, mask_ptr, offs, inside, DTYPE,
                                    HAS_OLD, HAS_MASK)
        # the clamp's gate: 0 outside [log(1-eps_low), log(1+eps_high)]; "ppo" only where
        # the token already moved past the bound in the direction c pushes.
        if CLIP == "clamp":
            clipped_low = delta < low
            clipped_high = delta > high
        elif CLIP == "ppo":
            clipped_low = (delta < low) & (coef[:, None] > 0)
            clipped_high = (delta > high) & (coef[:, None] < 0)
        else:
            clipped_low = delta != delta  # all False, with the tile's shape
            clipped_high = clipped_low
        clipped = clipped_low | clipped_high
        grad = tl.where(clipped, 0.0, seq_scale[:, None] * weight)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside)
        counted = weight != 0
        n_counted += tl.sum(counted.to(tl.int32), axis=1)
        n_low += tl.sum((clipped_low & counted).to(tl.int32), axis=1)
        n_high += tl.sum((clipped_high & counted).to(tl.int32), axis=1)
        n_any += tl.sum((clipped & counted).to(tl.int32), axis=1)
    return n_counted, n_low, n_high, n_any


# --- the group math, per member. A group statistic (max, sum) is an argument, so the
# fast path (whole group in registers: tl.max / tl.sum) and the general path (groups of
# any size, statistics accumulated over chunks of members) share every formula.
@triton.jit
def _log_softmax_member(x, valid, group_max, sum_exp):
    """log softmax of x within its group: x - max - log(sum exp(x - max)); -inf where
    not valid. ``group_max`` may be -inf (no valid member); ``sum_exp`` is >= 1 whenever
    a member is valid (the max contributes exp(0))."""
    group_max = tl.where(group_max == float("-inf"), 0.0, group_max)
    log_norm = tl.log(tl.maximum(sum_exp, 1.0))
    shifted = tl.maximum(x - group_max, _log_prob_floor(x))  # reference.log_prob_floor
    return tl.where(valid, shifted - log_norm, float("-inf"))


@triton.jit
def _shifted_exp(x, valid, group_max):
    """exp(x - group max) of valid members, 0 elsewhere (the summand of sum_exp)."""
    group_max = tl.where(group_max == float("-inf"), 0.0, group_max)
    return tl.where(valid, tl.exp(tl.where(valid, x - group_max, 0.0)), 0.0)


@triton.jit
def _pow2_scale(absmax):
    """reference.pow2_scale: the power of two <= absmax (its exponent bits), at least the
    smallest normal number; dividing by it is exact."""
    if absmax.dtype == tl.float64:
        bits = absmax.to(tl.int64, bitcast=True) & 0x7FF0000000000000
        return tl.maximum(bits.to(tl.float64, bitcast=True), 2.2250738585072014e-308)
    else:
        bits = absmax.to(tl.int32, bitcast=True) & 0x7F800000
        return tl.maximum(bits.to(tl.float32, bitcast=True), 1.1754943508222875e-38)


@triton.jit
def _saturate_logits(phi):
    """reference.saturate_logits: an overflowed target logit becomes the largest finite one."""
    if phi.dtype == tl.float64:
        limit = tl.full([], 1.7976931348623157e308, tl.float64)
    else:
        limit = tl.full([], 3.4028234663852886e38, tl.float32)
    return tl.minimum(tl.maximum(phi, -limit), limit)


@triton.jit
def _log_prob_floor(x):
    """reference.log_prob_floor: -max/4 of x's dtype."""
    if x.dtype == tl.float64:
        return tl.full([], -4.4942328371557893e307, tl.float64)
    else:
        return tl.full([], -8.507058665963221e37, tl.float32)


@triton.jit
def _target_logits_member(values, valid, count, scale, mean, sum_sq, varies, eps, tau,
                          TARGET: tl.constexpr):
    """phi_k of the spec's target table, / tau, from the group's count, value scale (a
    power of two, ``_pow2_scale``), mean and sum of squared deviations of values / scale
    (reference.target_logits: no overflow or underflow at any reward scale); 0 for
    invalid members and constant groups (``varies`` is the exact max != min test: a float
    mean/std is not exactly the value when eps=0)."""
    centered = tl.where(valid, values / scale - mean, 0.0)
    if TARGET == "grpo":
        denom = tl.sqrt(sum_sq / tl.maximum(count - 1.0, 1.0)) + eps / scale
        phi = centered / tl.where(denom > 0, denom, 1.0)
    elif TARGET == "dr_grpo":
        phi = centered * scale
    elif TARGET == "rloo":
        phi = centered * scale * (count / tl.maximum(count - 1.0, 1.0))
    elif TARGET == "maxrl":
        denom = mean + eps / scale
        phi = centered / tl.where(denom > 0, denom, 1.0)
    else:  # "softmax" (rewards) and "advantages": the values themselves
        phi = tl.where(valid, values, 0.0)
    return tl.where(valid, tl.where(varies, _saturate_logits(phi / tau), 0.0), 0.0)


@triton.jit
def _probabilities(log_p, log_w, valid):
    """P, w* and finite stand-ins of their logs (multiplied by 0 where invalid)."""
    return (tl.exp(log_p), tl.exp(log_w), tl.where(valid, log_p, 0.0),
            tl.where(valid, log_w, 0.0))


@triton.jit
def _expm1_series(x):
    """expm1(x) for |x| < reference.EXPM1_SERIES_BELOW (1/4) to fp64 precision (0.25**12 /
    13! < 1e-17): Taylor in Horner form (tl has no expm1, and exp(x) - 1 cancels)."""
    r = x * 0.0 + 1.0
    for i in tl.static_range(12):
        r = 1.0 + x * r / (13 - i)
    return x * r


@triton.jit
def _alpha_parts(p, w, lp, lw, valid, alpha, alpha_g):
    """reference.alpha_parts (the alpha divergence, exact as alpha -> 0 or 1): returns
    (base, gap = e - base, this member's term of D). ``alpha_g`` = min(alpha, 1 - alpha),
    computed in double on the host."""
    p_form = alpha <= 0.5
    base = tl.where(p_form, p, w)
    other = tl.where(p_form, w, p)
    log_base = tl.where(p_form, lp, lw)
    log_other = tl.where(p_form, lw, lp)
    x = alpha_g * (log_other - log_base)
    e = tl.exp((1.0 - alpha_g) * log_base + alpha_g * log_other)
    small = tl.abs(x) < 0.25
    gap = tl.where(small, base * _expm1_series(tl.where(small, x, 0.0)), e - base)
    gap = tl.where(valid, gap, 0.0)
    terms = ((other - base) - gap / alpha_g) / (1.0 - alpha_g)
    return base, gap, terms


@triton.jit
def _coupling_member(p, w, lp, lw, valid, alpha, alpha_g, DIVERGENCE: tl.constexpr):
    """x_k whose group sum S enters c_k = P_k (f_k - sum_j P_j f_j) (0 for forward KL;
    for alpha, e_k - base_k, whose sum is sum_j e_j - 1)."""
    if DIVERGENCE == "reverse_kl":
        x = p * (lp - lw)
    elif DIVERGENCE == "alpha":
        base, x, terms = _alpha_parts(p, w, lp, lw, valid, alpha, alpha_g)
    elif DIVERGENCE == "js":
        hi = tl.maximum(lp, lw)
        log_m = hi + tl.log(tl.exp(lp - hi) + tl.exp(lw - hi)) - 0.6931471805599453
        x = p * 0.5 * (lp - log_m)
    else:
        x = p * 0.0
    return tl.where(valid, x, 0.0)


@triton.jit
def _divergence_member(p, w, lp, lw, valid, coupling, alpha, alpha_g, DIVERGENCE: tl.constexpr):
    """(this member's term of D(w* || P), c_k = dD/ds_k), in the reference's
    overflow-free forms; ``coupling`` is the group sum of _coupling_member."""
    if DIVERGENCE == "forward_kl":
        terms = w * (lw - lp)
        coef = p - w
    elif DIVERGENCE == "reverse_kl":
        d = lp - lw
        terms = p * d
        coef = p * (d - coupling)
    elif DIVERGENCE == "alpha":
        base, gap, terms = _alpha_parts(p, w, lp, lw, valid, alpha, alpha_g)
        coef = -((base - p) + gap - p * coupling) / alpha
    else:  # "js"
        hi = tl.maximum(lp, lw)
        log_m = hi + tl.log(tl.exp(lp - hi) + tl.exp(lw - hi)) - 0.6931471805599453
        terms = 0.5 * (p * (lp - log_m) + w * (lw - log_m))
        coef = p * (0.5 * (lp - log_m) - coupling)
    return tl.where(valid, terms, 0.0), tl.where(valid, coef, 0.0)


@triton.jit
def _listwise_groups_kernel(
    logp_ptr, old_ptr, mask_ptr, values_ptr, cu_ptr, grad_ptr, group_loss_ptr, partials_ptr,
    T, K, n_seqs, n_tokens, low, high, alpha, alpha_g, tau, eps,
    PACKED: tl.constexpr, HAS_OLD: tl.constexpr, HAS_MASK: tl.constexpr,
    TARGET: tl.constexpr, DIVERGENCE: tl.constexpr, SEQ_REDUCE: tl.constexpr,
    CLIP: tl.constexpr, N_PARTIALS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Fast path: program g owns group g = rows g*K .. g*K+K-1, end to end."""
    DTYPE = grad_ptr.dtype.element_ty  # the compute dtype (fp32, or fp64 for fp64 inputs)
    # Scalars arrive as fp32 from eager launches but may arrive as fp64 under inductor:
    # pin them to the compute dtype so loop-carried values keep one type.
    low, high = tl.cast(low, DTYPE), tl.cast(high, DTYPE)
    alpha, alpha_g = tl.cast(alpha, DTYPE), tl.cast(alpha_g, DTYPE)
    tau, eps = tl.cast(tau, DTYPE), tl.cast(eps, DTYPE)
    group = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    row_ok = k < K
    rows = group.to(tl.int64) * K + k
    starts, lengths, max_len, bad_offsets = _row_extents(rows, row_ok, cu_ptr, T, n_seqs,
                                                         n_tokens, PACKED)

    # pass 1: sequence scores
    summed, n_tok = _row_token_sums(logp_ptr, old_ptr, mask_ptr, starts, lengths, max_len,
                                    DTYPE, HAS_OLD, HAS_MASK, BLOCK_K, BLOCK_T)
    valid = row_ok & (n_tok > 0)  # empty responses leave the simplex
    if SEQ_REDUCE == "mean":
        length = tl.where(valid, n_tok, 1.0)
    else:
        length = tl.where(valid, 1.0, 1.0).to(DTYPE)
    scores = summed / length

    # the group, in registers
    values = tl.load(values_ptr + rows, mask=row_ok, other=0.0).to(DTYPE)
    count = tl.sum(valid.to(DTYPE), axis=0)
    scale = _pow2_scale(tl.max(tl.where(valid, tl.abs(values), 0.0), axis=0))
    x = tl.where(valid, values / scale, 0.0)
    mean = tl.sum(x, axis=0) / tl.maximum(count, 1.0)
    sum_sq = tl.sum(tl.where(valid, (x - mean) * (x - mean), 0.0), axis=0)
    varies = (tl.max(tl.where(valid, values, float("-inf")), axis=0)
              != tl.min(tl.where(valid, values, float("inf")), axis=0))
    phi = _target_logits_member(values, valid, count, scale, mean, sum_sq, varies, eps, tau,
                                TARGET)
    score_max = tl.max(tl.where(valid, scores, float("-inf")), axis=0)
    log_p = _log_softmax_member(scores, valid, score_max,
                                tl.sum(_shifted_exp(scores, valid, score_max), axis=0))
    phi_max = tl.max(tl.where(valid, phi, float("-inf")), axis=0)
    log_w = _log_softmax_member(phi, valid, phi_max,
                                tl.sum(_shifted_exp(phi, valid, phi_max), axis=0))
    p, w, lp, lw = _probabilities(log_p, log_w, valid)
    coupling = tl.sum(_coupling_member(p, w, lp, lw, valid, alpha, alpha_g, DIVERGENCE), axis=0)
    terms, coef = _divergence_member(p, w, lp, lw, valid, coupling, alpha, alpha_g, DIVERGENCE)
    divergence = tl.sum(terms, axis=0)
    seq_scale = tl.where(valid, coef / length, 0.0)

    # pass 2: token gradient (1/G for reduction="mean" is folded into grad_scale)
    n_counted, n_low, n_high, n_any = _write_token_grad(
        grad_ptr, logp_ptr, old_ptr, mask_ptr, starts, lengths, max_len, seq_scale, coef,
        low, high, DTYPE, HAS_OLD, HAS_MASK, CLIP, BLOCK_K, BLOCK_T)
    if PACKED:
        if group == 0:
            _zero_outside_sequences(grad_ptr, cu_ptr, n_seqs, n_tokens, BLOCK_T)

    tl.store(group_loss_ptr + group, divergence)
    entropy_p = -tl.sum(p * lp, axis=0)
    entropy_w = -tl.sum(w * lw, axis=0)
    n_valid = tl.sum(valid.to(tl.float64), axis=0)
    row = partials_ptr + group.to(tl.int64) * N_PARTIALS
    tl.store(row + 0, divergence.to(tl.float64))
    tl.store(row + 1, entropy_p.to(tl.float64))
    tl.store(row + 2, entropy_w.to(tl.float64))
    tl.store(row + 3, tl.sum(tl.abs(coef), axis=0).to(tl.float64))
    tl.store(row + 4, n_valid)
    tl.store(row + 5, tl.where(n_valid > 0, 1.0, 0.0).to(tl.float64))
    _store_token_counts(row, n_counted, n_low, n_high, n_any, bad_offsets)


@triton.jit
def _store_token_counts(row, n_counted, n_low, n_high, n_any, bad_offsets):
    """Columns 6..10 of a partials row."""
    tl.store(row + 6, tl.sum(n_counted, axis=0).to(tl.float64))
    tl.store(row + 7, tl.sum(n_low, axis=0).to(tl.float64))
    tl.store(row + 8, tl.sum(n_high, axis=0).to(tl.float64))
    tl.store(row + 9, tl.sum(n_any, axis=0).to(tl.float64))
    tl.store(row + 10, tl.sum(bad_offsets, axis=0).to(tl.float64))


@triton.jit
def _load_members(pos, end, order_ptr, summed_ptr, n_tok_ptr, values_ptr,
                  DTYPE: tl.constexpr, SEQ_REDUCE: tl.constexpr):
    """A chunk of a group's members (sorted positions ``pos`` < ``end``): sequence index,
    valid (non-empty), score s_k, length divisor and the value the target is built from."""
    in_group = pos < end
    seq = tl.load(order_ptr + pos, mask=in_group, other=0)
    summed = tl.load(summed_ptr + seq, mask=in_group, other=0.0)
    n_tok = tl.load(n_tok_ptr + seq, mask=in_group, other=0.0)
    values = tl.load(values_ptr + seq, mask=in_group, other=0.0).to(DTYPE)
    valid = in_group & (n_tok > 0)
    if SEQ_REDUCE == "mean":
        length = tl.where(valid, n_tok, 1.0)
    else:
        length = tl.where(valid, 1.0, 1.0).to(DTYPE)
    return seq, valid, summed / length, length, values


@triton.jit
def _segmented_groups_kernel(
    sorted_ids_ptr, order_ptr, ends_ptr, summed_ptr, n_tok_ptr, values_ptr, seq_scale_ptr,
    coef_ptr, group_loss_ptr, partials_ptr, alpha, alpha_g, tau, eps,
    TARGET: tl.constexpr, DIVERGENCE: tl.constexpr,
    SEQ_REDUCE: tl.constexpr, N_PARTIALS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """General path: program i owns the group whose members sit at sorted positions
    i .. ends[i]-1 if a group starts at i (else it writes a zero partials row). Groups of
    any size: members are visited in chunks of BLOCK_K, a pass per group statistic the
    per-member formulas need (passes re-read the per-sequence scalars, not the tokens)."""
    DTYPE = summed_ptr.dtype.element_ty  # the compute dtype (fp32, or fp64 for fp64 inputs)
    alpha, alpha_g = tl.cast(alpha, DTYPE), tl.cast(alpha_g, DTYPE)
    tau, eps = tl.cast(tau, DTYPE), tl.cast(eps, DTYPE)
    start = tl.program_id(0).to(tl.int64)
    previous = tl.load(sorted_ids_ptr + tl.maximum(start - 1, 0))
    is_start = tl.where(start > 0, previous != tl.load(sorted_ids_ptr + start), start == 0)
    end = tl.where(is_start, tl.load(ends_ptr + start), start)  # empty range if no group
    k = tl.arange(0, BLOCK_K)

    # pass A: count, max/min of the values, max score
    count_acc = tl.zeros([BLOCK_K], dtype=DTYPE)
    value_max = tl.full([BLOCK_K], float("-inf"), dtype=DTYPE)
    value_min = tl.full([BLOCK_K], float("inf"), dtype=DTYPE)
    score_max = tl.full([BLOCK_K], float("-inf"), dtype=DTYPE)
    for c in range(start, end, BLOCK_K):
        seq, valid, scores, length, values = _load_members(
            c + k, end, order_ptr, summed_ptr, n_tok_ptr, values_ptr, DTYPE, SEQ_REDUCE)
        count_acc += valid.to(DTYPE)
        value_max = tl.maximum(value_max, tl.where(valid, values, float("-inf")))
        value_min = tl.minimum(value_min, tl.where(valid, values, float("inf")))
        score_max = tl.maximum(score_max, tl.where(valid, scores, float("-inf")))
    count = tl.sum(count_acc, axis=0)
    v_max, v_min = tl.max(value_max, axis=0), tl.min(value_min, axis=0)
    varies = v_max != v_min
    # values / scale (a power of two near the largest |value|) neither over- nor underflow
    scale = _pow2_scale(tl.where(count > 0, tl.maximum(tl.abs(v_max), tl.abs(v_min)), 0.0))
    s_max = tl.max(score_max, axis=0)

    # pass B: mean of values / scale, softmax normaliser of the scores
    value_acc = tl.zeros([BLOCK_K], dtype=DTYPE)
    exp_acc = tl.zeros([BLOCK_K], dtype=DTYPE)
    for c in range(start, end, BLOCK_K):
        seq, valid, scores, length, values = _load_members(
            c + k, end, order_ptr, summed_ptr, n_tok_ptr, values_ptr, DTYPE, SEQ_REDUCE)
        value_acc += tl.where(valid, values / scale, 0.0)
        exp_acc += _shifted_exp(scores, valid, s_max)
    mean = tl.sum(value_acc, axis=0) / tl.maximum(count, 1.0)
    s_sum_exp = tl.sum(exp_acc, axis=0)

    # pass B2: squared deviations of values / scale (only the grpo target reads them)
    sq_acc = tl.zeros([BLOCK_K], dtype=DTYPE)
    if TARGET == "grpo":
        for c in range(start, end, BLOCK_K):
            seq, valid, scores, length, values = _load_members(
                c + k, end, order_ptr, summed_ptr, n_tok_ptr, values_ptr, DTYPE, SEQ_REDUCE)
            x = tl.where(valid, values / scale - mean, 0.0)
            sq_acc += x * x
    sum_sq = tl.sum(sq_acc, axis=0)

    # pass C: max target logit; pass D: its softmax normaliser
    phi_acc = tl.full([BLOCK_K], float("-inf"), dtype=DTYPE)
    for c in range(start, end, BLOCK_K):
        seq, valid, scores, length, values = _load_members(
            c + k, end, order_ptr, summed_ptr, n_tok_ptr, values_ptr, DTYPE, SEQ_REDUCE)
        phi = _target_logits_member(values, valid, count, scale, mean, sum_sq, varies, eps, tau,
                                    TARGET)
        phi_acc = tl.maximum(phi_acc, tl.where(valid, phi, float("-inf")))
    phi_max = tl.max(phi_acc, axis=0)
    exp_acc = tl.zeros([BLOCK_K], dtype=DTYPE)
    for c in range(start, end, BLOCK_K):
        seq, valid, scores, length, values = _load_members(
            c + k, end, order_ptr, summed_ptr, n_tok_ptr, values_ptr, DTYPE, SEQ_REDUCE)
        phi = _target_logits_member(values, valid, count, scale, mean, sum_sq, varies, eps, tau,
                                    TARGET)
        exp_acc += _shifted_exp(phi, valid, phi_max)
    phi_sum_exp = tl.sum(exp_acc, axis=0)

    # pass E: the divergence's coupling sum and the entropies
    coupling_acc = tl.zeros([BLOCK_K], dtype=DTYPE)
    entropy_p_acc = tl.zeros([BLOCK_K], dtype=DTYPE)
    entropy_w_acc = tl.zeros([BLOCK_K], dtype=DTYPE)
    for c in range(start, end, BLOCK_K):
        seq, valid, scores, length, values = _load_members(
            c + k, end, order_ptr, summed_ptr, n_tok_ptr, values_ptr, DTYPE, SEQ_REDUCE)
        phi = _target_logits_member(values, valid, count, scale, mean, sum_sq, varies, eps, tau,
                                    TARGET)
        p, w, lp, lw = _probabilities(_log_softmax_member(scores, valid, s_max, s_sum_exp),
                                      _log_softmax_member(phi, valid, phi_max, phi_sum_exp), valid)
        coupling_acc += _coupling_member(p, w, lp, lw, valid, alpha, alpha_g, DIVERGENCE)
        entropy_p_acc -= p * lp
        entropy_w_acc -= w * lw
    coupling = tl.sum(coupling_acc, axis=0)

    # pass F: divergence, coefficients -> per-sequence gradient scale
    terms_acc = tl.zeros([BLOCK_K], dtype=DTYPE)
    abs_coef_acc = tl.zeros([BLOCK_K], dtype=DTYPE)
    for c in range(start, end, BLOCK_K):
        seq, valid, scores, length, values = _load_members(
            c + k, end, order_ptr, summed_ptr, n_tok_ptr, values_ptr, DTYPE, SEQ_REDUCE)
        phi = _target_logits_member(values, valid, count, scale, mean, sum_sq, varies, eps, tau,
                                    TARGET)
        p, w, lp, lw = _probabilities(_log_softmax_member(scores, valid, s_max, s_sum_exp),
                                      _log_softmax_member(phi, valid, phi_max, phi_sum_exp), valid)
        terms, coef = _divergence_member(p, w, lp, lw, valid, coupling, alpha, alpha_g,
                                         DIVERGENCE)
        terms_acc += terms
        abs_coef_acc += tl.abs(coef)
        in_group = (c + k) < end
        tl.store(seq_scale_ptr + seq, tl.where(valid, coef / length, 0.0), mask=in_group)
        tl.store(coef_ptr + seq, coef, mask=in_group)

    divergence = tl.sum(terms_acc, axis=0)
    tl.store(group_loss_ptr + start, divergence)
    row = partials_ptr + start * N_PARTIALS
    tl.store(row + 0, divergence.to(tl.float64))
    tl.store(row + 1, tl.sum(entropy_p_acc, axis=0).to(tl.float64))
    tl.store(row + 2, tl.sum(entropy_w_acc, axis=0).to(tl.float64))
    tl.store(row + 3, tl.sum(abs_coef_acc, axis=0).to(tl.float64))
    tl.store(row + 4, count.to(tl.float64))
    tl.store(row + 5, tl.where(count > 0, 1.0, 0.0).to(tl.float64))
    zero = tl.zeros([BLOCK_K], dtype=tl.int32)
    _store_token_counts(row, zero, zero, zero, zero, zero)


@triton.jit
def _sequence_sums_kernel(
    logp_ptr, old_ptr, mask_ptr, cu_ptr, summed_ptr, n_tok_ptr, n_seqs, T, n_tokens,
    PACKED: tl.constexpr, HAS_OLD: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """General path, pass 1: sum_t m*delta and N per sequence, BLOCK_S sequences a program."""
    DTYPE = summed_ptr.dtype.element_ty  # the compute dtype (fp32, or fp64 for fp64 inputs)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < n_seqs
    starts, lengths, max_len, _ = _row_extents(rows, row_ok, cu_ptr, T, n_seqs, n_tokens,
                                               PACKED)
    summed, n_tok = _row_token_sums(logp_ptr, old_ptr, mask_ptr, starts, lengths, max_len,
                                    DTYPE, HAS_OLD, HAS_MASK, BLOCK_S, BLOCK_T)
    tl.store(summed_ptr + rows, summed, mask=row_ok)
    tl.store(n_tok_ptr + rows, n_tok, mask=row_ok)


@triton.jit
def _sequence_grad_kernel(
    logp_ptr, old_ptr, mask_ptr, cu_ptr, seq_scale_ptr, coef_ptr, grad_ptr, partials_ptr,
    n_seqs, T, n_tokens, low, high,
    PACKED: tl.constexpr, HAS_OLD: tl.constexpr, HAS_MASK: tl.constexpr,
    CLIP: tl.constexpr, N_PARTIALS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """General path, pass 2: token gradient and the clip counts (partials columns 6..9)."""
    DTYPE = grad_ptr.dtype.element_ty  # the compute dtype (fp32, or fp64 for fp64 inputs)
    low, high = tl.cast(low, DTYPE), tl.cast(high, DTYPE)
    block = tl.program_id(0)
    rows = block.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < n_seqs
    starts, lengths, max_len, bad_offsets = _row_extents(rows, row_ok, cu_ptr, T, n_seqs,
                                                         n_tokens, PACKED)
    seq_scale = tl.load(seq_scale_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    n_counted, n_low, n_high, n_any = _write_token_grad(
        grad_ptr, logp_ptr, old_ptr, mask_ptr, starts, lengths, max_len, seq_scale, coef,
        low, high, DTYPE, HAS_OLD, HAS_MASK, CLIP, BLOCK_S, BLOCK_T)
    if PACKED:
        if block == 0:
            _zero_outside_sequences(grad_ptr, cu_ptr, n_seqs, n_tokens, BLOCK_T)
    row = partials_ptr + (n_seqs + block.to(tl.int64)) * N_PARTIALS  # after the group rows
    for column in tl.static_range(6):  # the group columns belong to the group kernel
        tl.store(row + column, 0.0)
    _store_token_counts(row, n_counted, n_low, n_high, n_any, bad_offsets)


@triton.jit
def _finalize_kernel(partials_ptr, n_rows, float_out_ptr, int_out_ptr,
                     REDUCTION: tl.constexpr, N_PARTIALS: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: column sums of the partials (fp64, fixed order: deterministic) ->
    float_out = [loss, grad_scale, divergence, listwise_entropy, target_entropy,
    clip_fraction, clip_fraction_low, clip_fraction_high, mean_abs_coef],
    int_out = [n_groups, n_seqs, n_tokens, malformed cu_seqlens offsets]."""
    cols = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    for r0 in range(0, n_rows, BLOCK_R):
        r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        tile = tl.load(partials_ptr + r[:, None] * N_PARTIALS + cols[None, :],
                       mask=(r[:, None] < n_rows) & (cols[None, :] < N_PARTIALS), other=0.0)
        acc += tl.sum(tile, axis=0)
    divergence = tl.sum(tl.where(cols == 0, acc, 0.0), axis=0)
    entropy_p = tl.sum(tl.where(cols == 1, acc, 0.0), axis=0)
    entropy_w = tl.sum(tl.where(cols == 2, acc, 0.0), axis=0)
    abs_coef = tl.sum(tl.where(cols == 3, acc, 0.0), axis=0)
    n_valid = tl.sum(tl.where(cols == 4, acc, 0.0), axis=0)
    n_groups = tl.sum(tl.where(cols == 5, acc, 0.0), axis=0)
    n_tokens = tl.sum(tl.where(cols == 6, acc, 0.0), axis=0)
    n_low = tl.sum(tl.where(cols == 7, acc, 0.0), axis=0)
    n_high = tl.sum(tl.where(cols == 8, acc, 0.0), axis=0)
    n_any = tl.sum(tl.where(cols == 9, acc, 0.0), axis=0)
    bad_offsets = tl.sum(tl.where(cols == 10, acc, 0.0), axis=0)

    per_group = 1.0 / tl.maximum(n_groups, 1.0)  # no group left: loss 0, gradient 0
    tokens = tl.maximum(n_tokens, 1.0)
    if REDUCTION == "mean":
        loss = divergence * per_group
        grad_scale = per_group
    else:
        loss = divergence
        grad_scale = per_group * 0.0 + 1.0
    out_ty = float_out_ptr.dtype.element_ty
    tl.store(float_out_ptr + 0, loss.to(out_ty))
    tl.store(float_out_ptr + 1, grad_scale.to(out_ty))
    tl.store(float_out_ptr + 2, (divergence * per_group).to(out_ty))
    tl.store(float_out_ptr + 3, (entropy_p * per_group).to(out_ty))
    tl.store(float_out_ptr + 4, (entropy_w * per_group).to(out_ty))
    tl.store(float_out_ptr + 5, (n_any / tokens).to(out_ty))
    tl.store(float_out_ptr + 6, (n_low / tokens).to(out_ty))
    tl.store(float_out_ptr + 7, (n_high / tokens).to(out_ty))
    tl.store(float_out_ptr + 8, (abs_coef / tl.maximum(n_valid, 1.0)).to(out_ty))
    tl.store(int_out_ptr + 0, n_groups.to(tl.int64))
    tl.store(int_out_ptr + 1, n_valid.to(tl.int64))
    tl.store(int_out_ptr + 2, n_tokens.to(tl.int64))
    tl.store(int_out_ptr + 3, bad_offsets.to(tl.int64))


# =========================================================================== launchers
def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        fill = float("nan") if dtype.is_floating_point else -(2**31)
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=256)  # launch parameters: host time per call (issue 14)
def _token_blocks(rows: int, T: int, packed: bool) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_T): about 2048 elements a tile, never wider than the rows."""
    block_rows = triton.next_power_of_2(max(rows, 1))
    width = max(16, 2048 // block_rows)
    if not packed:
        width = min(width, triton.next_power_of_2(max(T, 1)))
    return block_rows, min(width, 1024)


@functools.lru_cache(maxsize=64)
def _warps(tile: int) -> int:
    return 4 if tile >= 1024 else 2 if tile >= 256 else 1


def _layout(logp: Tensor, cu_seqlens: Optional[Tensor]):
    packed = cu_seqlens is not None
    T = 0 if packed else logp.shape[-1]
    cu = cu_seqlens if packed else logp  # unused pointer when not packed
    return packed, T, cu


def _finalize(partials: Tensor, reduction: str, dtype: torch.dtype, kernel) -> tuple[Tensor, Tensor]:
    float_out = _new((9,), dtype, partials.device)
    int_out = _new((4,), torch.int64, partials.device)
    kernel(_finalize_kernel)[(1,)](
        partials, partials.shape[0], float_out, int_out, REDUCTION=reduction,
        N_PARTIALS=_N_PARTIALS, BLOCK_R=128, BLOCK_C=16, num_warps=4)
    return float_out, int_out


def _fused_groups_impl(logp: Tensor, old_logp: Optional[Tensor], mask: Optional[Tensor],
                       values: Tensor, cu_seqlens: Optional[Tensor], group_size: int,
                       target: str, divergence: str, alpha: float, tau: float, eps: float,
                       seq_reduce: str, clip: str, low: float, high: float, reduction: str
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fast path: (token_grad, per-group divergence, float_out, int_out). 2 launches."""
    kernel = _kernel_wrapper(logp)
    dtype = reference.compute_dtype(logp.dtype)
    packed, T, cu = _layout(logp, cu_seqlens)
    n_seqs = cu_seqlens.shape[0] - 1 if packed else logp.shape[0]
    n_groups = n_seqs // group_size
    token_grad = _new(logp.shape, dtype, logp.device)
    group_loss = _new((n_groups,), dtype, logp.device)
    partials = _new((n_groups, _N_PARTIALS), torch.float64, logp.device)
    if n_groups > 0:
        block_k, block_t = _token_blocks(group_size, T, packed)
        kernel(_listwise_groups_kernel)[(n_groups,)](
            logp, old_logp if old_logp is not None else logp,
            mask if mask is not None else logp, values, cu, token_grad, group_loss, partials,
            T, group_size, n_seqs, logp.shape[0], low, high, alpha, min(alpha, 1.0 - alpha), tau, eps,
            PACKED=packed, HAS_OLD=old_logp is not None,
            HAS_MASK=mask is not None, TARGET=target, DIVERGENCE=divergence,
            SEQ_REDUCE=seq_reduce, CLIP=clip, N_PARTIALS=_N_PARTIALS,
            BLOCK_K=block_k, BLOCK_T=block_t, num_warps=_warps(block_k * block_t))
    float_out, int_out = _finalize(partials, reduction, dtype, kernel)
    _no_sequences(token_grad, int_out, cu_seqlens, n_seqs)
    return token_grad, group_loss, float_out, int_out


def _no_sequences(token_grad: Tensor, int_out: Tensor, cu_seqlens: Optional[Tensor], n_seqs: int):
    """Packed tokens but cu_seqlens == [c] (no sequence, no launch): zero gradient, and
    the malformed-offsets count a kernel would have written (decided from shapes)."""
    if cu_seqlens is not None and n_seqs == 0:
        token_grad.zero_()
        int_out[3] = malformed_offsets(cu_seqlens, token_grad.shape[0])


def _general_impl(logp: Tensor, old_logp: Optional[Tensor], mask: Optional[Tensor],
                  values: Tensor, cu_seqlens: Optional[Tensor], group_ids: Tensor,
                  target: str, divergence: str, alpha: float, tau: float, eps: float,
                  seq_reduce: str, clip: str, low: float, high: float, reduction: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """General path: (token_grad, divergence per sorted position (0 where no group
    starts), the sorted ids, float_out, int_out).
    Device-side segmentation: a stable sort of the ids and a searchsorted, then 4 launches
    (sequence sums, group kernel, token gradient, finalize)."""
    kernel = _kernel_wrapper(logp)
    dtype = reference.compute_dtype(logp.dtype)
    packed, T, cu = _layout(logp, cu_seqlens)
    n_seqs = group_ids.shape[0]
    device = logp.device
    sorted_ids, order = torch.sort(group_ids, stable=True)
    ends = torch.searchsorted(sorted_ids, sorted_ids, right=True)  # one past each id's run

    # five per-sequence vectors from one allocation (one dispatch instead of five)
    summed, n_tok, seq_scale, coef, group_loss = _new((5, n_seqs), dtype, device).unbind()
    token_grad = _new(logp.shape, dtype, device)
    block_s, block_t = _sequence_blocks(n_seqs, T, packed)
    n_blocks = triton.cdiv(n_seqs, block_s)
    # rows 0..n-1: one per sorted position (group columns); then one per sequence block
    # of the gradient kernel (token-count columns); each kernel zeroes the other columns
    partials = _new((n_seqs + n_blocks, _N_PARTIALS), torch.float64, device)
    has_old, has_mask = old_logp is not None, mask is not None
    old_arg = old_logp if has_old else logp
    mask_arg = mask if has_mask else logp
    if n_seqs > 0:
        kernel(_sequence_sums_kernel)[(n_blocks,)](
            logp, old_arg, mask_arg, cu, summed, n_tok, n_seqs, T, logp.shape[0],
            PACKED=packed, HAS_OLD=has_old, HAS_MASK=has_mask,
            BLOCK_S=block_s, BLOCK_T=block_t, num_warps=_warps(block_s * block_t))
        kernel(_segmented_groups_kernel)[(n_seqs,)](
            sorted_ids, order, ends, summed, n_tok, values, seq_scale, coef, group_loss,
            partials, alpha, min(alpha, 1.0 - alpha), tau, eps,
            TARGET=target, DIVERGENCE=divergence,
            SEQ_REDUCE=seq_reduce, N_PARTIALS=_N_PARTIALS, BLOCK_K=16, num_warps=1)
        kernel(_sequence_grad_kernel)[(n_blocks,)](
            logp, old_arg, mask_arg, cu, seq_scale, coef, token_grad, partials,
            n_seqs, T, logp.shape[0], low, high,
            PACKED=packed, HAS_OLD=has_old, HAS_MASK=has_mask,
            CLIP=clip, N_PARTIALS=_N_PARTIALS, BLOCK_S=block_s, BLOCK_T=block_t,
            num_warps=_warps(block_s * block_t))
    float_out, int_out = _finalize(partials, reduction, dtype, kernel)
    _no_sequences(token_grad, int_out, cu_seqlens, n_seqs)
    return token_grad, group_loss, sorted_ids, float_out, int_out


@functools.lru_cache(maxsize=256)
def _sequence_blocks(n_seqs: int, T: int, packed: bool) -> tuple[int, int]:
    block_t = min(1024, triton.next_power_of_2(max(T, 1))) if not packed else 256
    block_s = max(1, min(triton.next_power_of_2(max(n_seqs, 1)), 2048 // block_t, 64))
    return block_s, block_t


# --------------------------------------------------------------------- torch.compile
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel_wrapper(example: Tensor):
    """``wrap_triton`` makes a launch traceable inside a triton_op while torch.compile
    traces (dynamo, or AOT autograd's fake/functional tensors); identity for eager launches
    on real tensors, which must not go through it: in eager mode it dispatches a
    higher-order op per launch (~0.5 ms of host time a call on an H200 host)."""
    wrap = getattr(torch.library, "wrap_triton", None)
    eager = not _compiling() and type(example) in (torch.Tensor, torch.nn.Parameter)
    if wrap is None or _INTERPRETING or eager:
        return lambda k: k
    return wrap


def _register_ops():
    """triton_op custom ops (torch >= 2.6), so torch.compile traces a call without a
    graph break; None where this torch lacks them (or under the interpreter)."""
    triton_op = getattr(torch.library, "triton_op", None)
    if triton_op is None or _INTERPRETING:
        return None
    try:
        return {
            "fused_groups": triton_op("lpo_kernels::listwise_fused_groups", mutates_args=())(
                _fused_groups_impl),
            "general": triton_op("lpo_kernels::listwise_general", mutates_args=())(
                _general_impl),
        }
    except Exception:  # pragma: no cover - an older torch with a partial API
        return None


_OPS = _register_ops()
_IMPLS = {"fused_groups": _fused_groups_impl, "general": _general_impl}


_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # looked up once


def _compiling() -> bool:
    return bool(_IS_COMPILING and _IS_COMPILING())


def _op(name: str):
    """The custom op while torch.compile traces; the plain launcher in eager mode."""
    if _OPS is not None and _compiling():
        return _OPS[name]
    return _IMPLS[name]


# =========================================================================== entry point
def _stats(float_out: Tensor, int_out: Tensor) -> LPOStats:
    """0-dim views into the finalize kernel's outputs: no extra launches (two ``unbind``
    calls make them, not one indexing op per field)."""
    f, i = float_out.unbind(), int_out.unbind()
    return LPOStats(
        divergence=f[2], listwise_entropy=f[3], target_entropy=f[4], clip_fraction=f[5],
        clip_fraction_low=f[6], clip_fraction_high=f[7], mean_abs_coef=f[8],
        n_groups=i[0], n_seqs=i[1], n_tokens=i[2], cu_seqlens_errors=i[3])


def _contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    # is_contiguous() is a plain attribute read; contiguous() goes through the dispatcher
    return x if x is None or x.is_contiguous() else x.contiguous()


@functools.lru_cache(maxsize=64)
def _option_args(options: LPOOptions) -> tuple:
    """The kernels' option arguments, built once per (frozen, hashable) options object."""
    low, high = options.log_ratio_bounds
    return (options.target, options.divergence, options.alpha, options.tau, options.eps,
            options.seq_reduce, options.clip, low, high, options.reduction)


def listwise_forward_triton(batch: ListwiseBatch, options: LPOOptions) -> reference.ListwiseResult:
    """``reference.listwise_forward`` in Triton (same ListwiseResult). token_grad is fp32
    (fp64 for fp64 logp); stats are views of one small buffer. Fast path when
    ``batch.group_size`` is set (and <= MAX_FUSED_GROUP), general path otherwise."""
    logp, old, mask = _contiguous(batch.logp), _contiguous(batch.old_logp), _contiguous(batch.mask)
    cu = _contiguous(batch.cu_seqlens)
    values = _contiguous(batch.scores_source)
    args = _option_args(options)
    n, k = batch.n_seqs, batch.group_size
    if k is not None and k <= MAX_FUSED_GROUP:
        token_grad, group_loss, float_out, int_out = _op("fused_groups")(
            logp, old, mask, values, cu, k, *args)
        per_group_loss = lambda: group_loss  # noqa: E731 - one divergence per group, in order
    else:
        ids = batch.group_ids
        if k is not None:  # row blocks of k (ids are only labels), too large to fuse
            ids = torch.arange(n, device=logp.device) // k
        token_grad, group_loss, sorted_ids, float_out, int_out = _op("general")(
            logp, old, mask, values, cu, ids.contiguous(), *args)
        # groups start at every k-th sorted position when all have k members; otherwise
        # selecting the starts is reduction="none"'s documented sync (it sizes the output)
        per_group_loss = (lambda: group_loss[::k]) if k is not None else (
            lambda: group_loss[torch.cat([sorted_ids[:1] == sorted_ids[:1],
                                          sorted_ids[1:] != sorted_ids[:-1]])])

    token_group, grad_scale = None, None
    if options.reduction == "mean":
        loss, grad_scale = float_out[0], float_out[1]
    elif options.reduction == "sum":
        loss = float_out[0]
    else:
        loss = per_group_loss()
        slots = reference.group_slots(batch.group_ids, k, n, logp.device)
        seq_index = reference.token_sequence_index(batch.cu_seqlens, token_grad.shape[0])
        token_group = reference.per_token(slots, seq_index)
    return reference.ListwiseResult(loss, token_grad, token_group, _stats(float_out, int_out),
                                    grad_scale)


# =========================================================================== backward
@triton.jit
def _scale_token_grad_kernel(grad_loss_ptr, grad_scale_ptr, token_grad_ptr, out_ptr, n,
                             HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    grad = tl.load(token_grad_ptr + offs, mask=inside, other=0.0)  # fp32 or fp64
    scale = tl.load(grad_loss_ptr).to(grad.dtype)
    if HAS_SCALE:
        scale = scale * tl.load(grad_scale_ptr).to(grad.dtype)
    out = scale * grad
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


def scale_token_grad(grad_loss: Tensor, token_grad: Tensor, grad_scale: Optional[Tensor],
                     out_dtype: torch.dtype) -> Tensor:
    """The backward of a scalar loss: ``(grad_loss * grad_scale * token_grad).to(out_dtype)``
    in one launch (eager torch needs two or three). ``grad_loss``/``grad_scale``: 0-dim."""
    if _compiling() or grad_loss.dim() != 0:
        scale = grad_loss if grad_scale is None else grad_loss * grad_scale
        return (scale * token_grad).to(out_dtype)
    token_grad = token_grad.contiguous()
    out = torch.empty(token_grad.shape, dtype=out_dtype, device=token_grad.device)
    n = token_grad.numel()
    if n:
        block = 4096
        _scale_token_grad_kernel[(triton.cdiv(n, block),)](
            grad_loss, grad_scale if grad_scale is not None else grad_loss, token_grad, out, n,
            HAS_SCALE=grad_scale is not None, BLOCK=block, num_warps=8)
    return out
