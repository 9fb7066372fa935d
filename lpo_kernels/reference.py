"""The math of LPO, once, in plain PyTorch (the GRPO baseline family: grpo.py).

This file is the specification (../shared/docs/lpo-math.md) in code. Every kernel is
tested against it; it is also the CPU fallback (``backend="torch"``). It runs in fp64
when given fp64 inputs and in fp32 otherwise, in log-space with group maxima
subtracted, so finite inputs give finite outputs. It never synchronises with the device
(``reduction="none"`` with arbitrary group ids is the one exception: the number of
groups sizes its output).

Groups are handled as *slots*: every sequence maps to the dense rank of its group id
(0..U-1, ids in ascending order), and group reductions scatter into ``n_seqs`` slots, an
upper bound of U known without looking at the data.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import ListwiseBatch, check_listwise_inputs, malformed_offsets
from .options import LPOOptions
from .stats import LPOStats


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other float dtype is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- segments
def token_sequence_index(cu_seqlens: Tensor | None, n_tokens: int) -> Tensor | None:
    """Sequence index of each packed token (no host sync); None for padded [B, T] input.
    Computed once per call and passed to ``sequence_sums`` / ``per_token``.

    Malformed offsets (validate=False) never index out of bounds: every kernel reads
    sequence b as tokens [c_b, max(c_b, c_{b+1})) with c = cu_seqlens clamped into [0, N].
    A token no such range holds gets index ``B`` (one past the last sequence: its sums are
    dropped and its per-token values are 0); one that several ranges hold (offsets out of
    order) goes to the last b with c_b <= t, one of those ranges."""
    if cu_seqlens is None:
        return None
    n_seqs = cu_seqlens.shape[0] - 1
    positions = torch.arange(n_tokens, device=cu_seqlens.device)
    if n_seqs == 0:
        return torch.zeros_like(positions)  # every token is outside (index B = 0)
    offsets = cu_seqlens.long().clamp(0, n_tokens)
    starts = offsets[:-1]
    ends = torch.maximum(offsets[1:], starts)
    # the last b with starts[b] <= t is the last b whose suffix minimum is <= t; suffix
    # minima are sorted (and equal the starts when the offsets are well formed)
    suffix_min = torch.flip(torch.cummin(torch.flip(starts, [0]), 0).values, [0])
    seq = torch.searchsorted(suffix_min, positions, right=True) - 1
    held = (seq >= 0) & (positions < ends[seq.clamp(min=0)])
    return torch.where(held, seq, torch.full_like(seq, n_seqs))


def sequence_sums(x: Tensor, seq_index: Tensor | None, n_seqs: int) -> Tensor:
    """Per-sequence sum of a padded [B, T] (``seq_index`` None) or packed [N] tensor."""
    if seq_index is None:
        return x.sum(dim=-1)
    return x.new_zeros(n_seqs + 1).index_add_(0, seq_index, x)[:n_seqs]


def per_token(values: Tensor, seq_index: Tensor | None) -> Tensor:
    """Broadcast a per-sequence vector to the token layout (0 at tokens of no sequence)."""
    if seq_index is None:
        return values[:, None]
    return torch.cat([values, values.new_zeros(1)])[seq_index]


def group_slots(group_ids: Tensor | None, group_size: int | None, n_seqs: int, device) -> Tensor:
    """Dense rank of each sequence's group id, in ascending id order, without a sync.

    With ``group_size=K`` the groups *are* the row blocks (ids are only labels, checked
    for consistency when validating): slot = row // K, so reduction='none' returns the
    groups in row-block order, not ascending-id order."""
    if group_size is not None:
        return torch.arange(n_seqs, device=device) // group_size
    sorted_ids, order = torch.sort(group_ids, stable=True)
    starts_group = torch.ones(n_seqs, dtype=torch.long, device=device)
    starts_group[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    slots = torch.empty(n_seqs, dtype=torch.long, device=device)
    slots[order] = torch.cumsum(starts_group, 0) - 1
    return slots


def segment_sum(x: Tensor, slots: Tensor, n_slots: int) -> Tensor:
    return x.new_zeros(n_slots).index_add_(0, slots, x)


def segment_amax(x: Tensor, slots: Tensor, n_slots: int) -> Tensor:
    init = x.new_full((n_slots,), -math.inf)
    return init.scatter_reduce(0, slots, x, reduce="amax", include_self=True)


# --------------------------------------------------------------------------- the math
def sequence_scores(batch: ListwiseBatch, seq_reduce: str, dtype: torch.dtype):
    """s_k (unclipped log-ratio per response), N_k, and the per-token delta and mask.

    Returns (scores [B], n_tokens [B] (sum of mask), delta, mask, seq_index) with delta
    zeroed at tokens that do not count, so padding values never leak; ``seq_index`` is the
    packed token->sequence index (None when padded), for the gradient pass to reuse."""
    logp = batch.logp.to(dtype)
    old = logp if batch.old_logp is None else batch.old_logp.to(dtype)
    mask = torch.ones_like(logp) if batch.mask is None else batch.mask.to(dtype)
    seq_index = token_sequence_index(batch.cu_seqlens, logp.shape[0])
    if seq_index is not None:  # a token of no sequence (malformed cu_seqlens) never counts
        mask = torch.where(seq_index < batch.n_seqs, mask, torch.zeros_like(mask))
    delta = torch.where(mask != 0, logp - old, torch.zeros_like(logp))
    n_tokens = sequence_sums(mask, seq_index, batch.n_seqs)
    summed = sequence_sums(mask * delta, seq_index, batch.n_seqs)
    if seq_reduce == "mean":
        scores = summed / torch.where(n_tokens > 0, n_tokens, torch.ones_like(n_tokens))
    else:
        scores = summed
    return scores, n_tokens, delta, mask, seq_index


def pow2_scale(absmax: Tensor) -> Tensor:
    """A power of two within a factor 2 of ``absmax`` (at least the dtype's smallest normal
    number): dividing by it is exact, so the target statistics computed on values / scale
    are the unscaled ones bit for bit, while neither a sum of values near the dtype's
    maximum nor a square of deviations ~1e-30 or ~1e19 (fp32) over- or underflows."""
    exponent = torch.frexp(absmax).exponent
    tiny = torch.finfo(absmax.dtype).tiny
    return torch.ldexp(torch.ones_like(absmax), exponent - 1).clamp(min=tiny)


def saturate_logits(phi: Tensor) -> Tensor:
    """A target logit that overflowed (rewards / tau beyond the dtype's range) becomes the
    largest finite one, so the group maximum is finite and nothing turns into inf - inf."""
    limit = torch.finfo(phi.dtype).max
    return phi.clamp(-limit, limit)


def log_prob_floor(dtype: torch.dtype) -> float:
    """Shifted logits x - max below this (-max/4 of the dtype; they overflow to -inf when
    two logits differ by more than the dtype's range) are held there: exp gives 0 just the
    same, and differences of two log-probabilities stay finite (no 0 * inf in D)."""
    return -torch.finfo(dtype).max / 4


def target_logits(values: Tensor, valid: Tensor, slots: Tensor, options: LPOOptions) -> Tensor:
    """phi_k of the spec's target table (divided by tau); 0 for empty responses and for
    every member of a group whose values are all equal (uniform target).

    Group statistics are computed on values / scale, with ``scale`` a power of two near
    the group's largest |value| (``pow2_scale``): exact in the normal range and free of
    overflow (rewards ~3e38) and underflow (deviations ~1e-30 with eps=0)."""
    n = values.shape[0]
    v = torch.where(valid, values, torch.zeros_like(values))
    absmax = segment_amax(v.abs(), slots, n)
    scale = pow2_scale(absmax.clamp(min=0))  # (absmax is -inf for a slot of no member)
    x = v / scale[slots]
    count = segment_sum(valid.to(values.dtype), slots, n)
    mean_x = segment_sum(x, slots, n) / count.clamp(min=1)
    centered_x = torch.where(valid, x - mean_x[slots], torch.zeros_like(x))
    t = options.target
    if t == "grpo":  # (R - mean) / (std + eps) = x_c / (std_x + eps / scale)
        var_x = segment_sum(centered_x * centered_x, slots, n) / (count - 1).clamp(min=1)
        denom = var_x.sqrt() + options.eps / scale
        phi = centered_x / torch.where(denom > 0, denom, torch.ones_like(denom))[slots]
    elif t == "dr_grpo":
        phi = centered_x * scale[slots]
    elif t == "rloo":
        phi = centered_x * scale[slots] * (count / (count - 1).clamp(min=1))[slots]
    elif t == "maxrl":  # (R - mean) / (mean + eps) = x_c / (mean_x + eps / scale)
        denom = mean_x + options.eps / scale
        phi = centered_x / torch.where(denom > 0, denom, torch.ones_like(denom))[slots]
    else:  # "softmax" (rewards) and "advantages": the values themselves
        phi = v
    # Exact test of "all equal": a mean/std computed in floating point is not exactly the
    # value, so (R - mean)/std could be O(1) noise when eps=0.
    vmax = segment_amax(torch.where(valid, values, torch.full_like(values, -math.inf)), slots, n)
    vmin = -segment_amax(torch.where(valid, -values, torch.full_like(values, -math.inf)), slots, n)
    constant = (vmax == vmin)[slots]
    phi = saturate_logits(phi / options.tau)
    return torch.where(valid & ~constant, phi, torch.zeros_like(phi))


def group_log_softmax(x: Tensor, valid: Tensor, slots: Tensor) -> Tensor:
    """log softmax of x within each group over its valid members; -inf elsewhere."""
    n = x.shape[0]
    neg_inf = torch.full_like(x, -math.inf)
    group_max = segment_amax(torch.where(valid, x, neg_inf), slots, n)
    shifted = torch.where(valid, (x - group_max[slots]).clamp(min=log_prob_floor(x.dtype)), neg_inf)
    log_norm = segment_sum(torch.exp(shifted), slots, n).log()
    return torch.where(valid, shifted - log_norm[slots], neg_inf)


def divergence_and_coefficients(log_p: Tensor, log_w: Tensor, valid: Tensor, slots: Tensor,
                                options: LPOOptions):
    """Per-group D(w* || P) (one value per slot) and per-sequence c_k = dD/ds_k.

    Every c is written as P_k (f_k - sum_j P_j f_j) with f = dD/dP, in a form that stays
    finite when P and w* differ by hundreds of nats."""
    n = log_p.shape[0]
    zero = torch.zeros_like(log_p)
    p = torch.exp(log_p)  # 0 for invalid
    w = torch.exp(log_w)
    lp = torch.where(valid, log_p, zero)  # finite stand-ins, multiplied by 0 where invalid
    lw = torch.where(valid, log_w, zero)
    div = options.divergence
    if div == "forward_kl":
        terms = w * (lw - lp)
        coef = p - w
    elif div == "reverse_kl":
        d = lp - lw
        terms = p * d
        coef = p * (d - segment_sum(terms, slots, n)[slots])
    elif div == "alpha":
        a = options.alpha
        base, other, gap, terms = alpha_parts(p, w, lp, lw, valid, a)
        excess = segment_sum(gap, slots, n)[slots]  # sum_j e_j - 1
        coef = -((base - p) + gap - p * excess) / a
    else:  # "js"
        log_m = torch.logaddexp(lp, lw) - math.log(2.0)
        f = 0.5 * (lp - log_m)
        terms = 0.5 * (p * (lp - log_m) + w * (lw - log_m))
        coef = p * (f - segment_sum(p * f, slots, n)[slots])
    divergence = segment_sum(torch.where(valid, terms, zero), slots, n)
    return divergence, torch.where(valid, coef, zero)


EXPM1_SERIES_BELOW = 0.25  # |x| below which gap = base * expm1(x) (Triton: its Taylor series)


def alpha_parts(p: Tensor, w: Tensor, lp: Tensor, lw: Tensor, valid: Tensor, a: float):
    """The alpha divergence in a form exact as alpha -> 0 or 1 (each kernel repeats it).

    With e_k = w_k^a P_k^(1-a), D = (sum e - 1) / (a (a - 1)) and c_k = -(e_k - P_k sum e) / a
    (spec section 2) lose every digit to cancellation near the ends (e ~ P when a ~ 0, e ~ w
    when a ~ 1). Write e_k = base_k (1 + expm1(g d_k)), with base = P, g = a, d = log w -
    log P when a <= 1/2 and base = w, g = 1 - a, d = log P - log w otherwise; then
    gap_k = e_k - base_k is accurate, sum e - 1 = sum gap (sum base = 1), and per member
    D_k = ((other_k - base_k) - gap_k / g) / (1 - g) >= 0 (tends to KL(P||w*) as a -> 0,
    KL(w*||P) as a -> 1). Returns (base, other, gap, D_k)."""
    p_form = a <= 0.5
    g = a if p_form else 1.0 - a  # exact in double, also for a within 1e-10 of 1
    base, other = (p, w) if p_form else (w, p)
    log_base, log_other = (lp, lw) if p_form else (lw, lp)
    x = g * (log_other - log_base)
    # |x| >= 1/4: e / base differs from 1 by > 22%, so e - base loses < 3 bits; e <= 1
    # never overflows (a weighted geometric mean of two probabilities)
    e = torch.exp((1.0 - g) * log_base + g * log_other)
    small = x.abs() < EXPM1_SERIES_BELOW
    gap = torch.where(small, base * torch.expm1(torch.where(small, x, torch.zeros_like(x))), e - base)
    gap = torch.where(valid, gap, torch.zeros_like(gap))
    terms = ((other - base) - gap / g) / (1.0 - g)
    return base, other, gap, terms


def clip_masks(delta: Tensor, coef_tok: Tensor, options: LPOOptions):
    """(clipped_low, clipped_high): tokens whose gradient the clip gate zeroes."""
    low, high = options.log_ratio_bounds
    below, above = delta < low, delta > high
    if options.clip == "clamp":
        return below, above
    if options.clip == "ppo":  # only where the token already moved past the bound in c's push
        return below & (coef_tok > 0), above & (coef_tok < 0)
    none = torch.zeros_like(below)
    return none, none


class ListwiseResult(NamedTuple):
    """What every listwise backend computes in its forward.

    ``loss``: the value (scalar, or [U] per group for ``reduction="none"``).
    ``token_grad``: d loss / d logp, same layout as logp, in the compute dtype; for
    ``reduction="none"`` the gradient of each group's own loss (backward multiplies it
    by that group's ``grad_output``).
    ``token_group``: for ``reduction="none"``, the group slot of each token's sequence
    (broadcastable to the token layout); None otherwise.
    ``grad_scale``: optional 0-dim factor the backward also applies (lets a kernel fold
    a data-dependent 1/G into the backward instead of a second pass over the tokens); the
    gradient is ``grad_output * grad_scale * token_grad``."""

    loss: Tensor
    token_grad: Tensor
    token_group: Tensor | None
    stats: LPOStats
    grad_scale: Tensor | None = None


def listwise_forward(batch: ListwiseBatch, options: LPOOptions) -> ListwiseResult:
    """The listwise step: scores -> group softmax -> target -> divergence -> per-token
    gradient (spec sections 1-3). Coefficients are constants of the backward."""
    dtype = compute_dtype(batch.logp.dtype)
    scores, n_tokens, delta, mask, seq_index = sequence_scores(batch, options.seq_reduce, dtype)
    slots = group_slots(batch.group_ids, batch.group_size, batch.n_seqs, batch.logp.device)
    return listwise_from_scores(batch, options, scores, n_tokens, batch.scores_source.to(dtype),
                                slots, delta, mask, seq_index)


def listwise_from_scores(batch: ListwiseBatch, options: LPOOptions, scores: Tensor,
                         n_tokens: Tensor, values: Tensor, slots: Tensor, delta: Tensor,
                         mask: Tensor, seq_index: Tensor | None) -> ListwiseResult:
    """The listwise step from per-sequence scores, lengths, target values and group slots.

    The first ``batch.n_seqs`` sequences are the batch's own (their tokens get the
    gradient, per ``delta``/``mask``/``seq_index`` from :func:`sequence_scores`); any further ones are the same groups' members seen
    by other calls (``group_stats.py``): they shape P, w* and the loss, and get no gradient
    here. Stats about tokens and sequences count the batch's own only."""
    dtype = scores.dtype
    n, own = scores.shape[0], batch.n_seqs
    valid = n_tokens > 0
    log_p = group_log_softmax(scores, valid, slots)
    log_w = group_log_softmax(target_logits(values, valid, slots, options), valid, slots)
    divergence, coef = divergence_and_coefficients(log_p, log_w, valid, slots, options)

    members = segment_sum(valid.to(dtype), slots, n)
    n_groups = (members > 0).sum()
    per_group = 1.0 / n_groups.clamp(min=1).to(dtype)

    own_coef, own_valid, own_n = coef[:own], valid[:own], n_tokens[:own]
    length = own_n if options.seq_reduce == "mean" else torch.ones_like(own_n)
    seq_scale = torch.where(own_valid, own_coef / torch.where(own_valid, length, torch.ones_like(length)),
                            torch.zeros_like(own_coef))
    coef_tok = per_token(own_coef, seq_index)
    clipped_low, clipped_high = clip_masks(delta, coef_tok, options)
    gate = ~(clipped_low | clipped_high)
    token_grad = per_token(seq_scale, seq_index) * mask * gate.to(dtype)

    token_group = None
    if options.reduction == "mean":
        loss = divergence.sum() * per_group
        token_grad = token_grad * per_group
    elif options.reduction == "sum":
        loss = divergence.sum()
    else:
        if n != own:
            raise ValueError("reduction='none' is not supported with group_stats")
        n_out = n // batch.group_size if batch.group_size is not None else (
            int(slots.max()) + 1 if n else 0)  # the documented sync of reduction="none"
        loss = divergence[:n_out]
        token_group = per_token(slots, seq_index)

    counted = mask != 0
    n_counted = counted.sum()
    tokens = n_counted.clamp(min=1).to(dtype)
    zero = torch.zeros_like(log_p)
    entropy_p = -torch.where(valid, torch.exp(log_p) * log_p, zero).sum()
    entropy_w = -torch.where(valid, torch.exp(log_w) * log_w, zero).sum()
    n_valid = own_valid.sum()
    stats = LPOStats(
        divergence=(divergence.sum() * per_group).detach(),
        listwise_entropy=(entropy_p * per_group).detach(),
        target_entropy=(entropy_w * per_group).detach(),
        clip_fraction=((clipped_low | clipped_high) & counted).sum().to(dtype) / tokens,
        clip_fraction_low=(clipped_low & counted).sum().to(dtype) / tokens,
        clip_fraction_high=(clipped_high & counted).sum().to(dtype) / tokens,
        mean_abs_coef=(own_coef.abs().sum() / n_valid.clamp(min=1).to(dtype)).detach(),
        n_groups=n_groups,
        n_seqs=n_valid,
        n_tokens=n_counted,
        cu_seqlens_errors=(torch.zeros((), dtype=torch.long, device=delta.device)
                           if batch.cu_seqlens is None else
                           malformed_offsets(batch.cu_seqlens, delta.shape[0])),
    )
    return ListwiseResult(loss.detach(), token_grad.detach(), token_group, stats)


# --------------------------------------------------------------------------- loss head
def naive_linear_logprobs(hidden: Tensor, weight: Tensor, target_ids: Tensor, *,
                          bias: Tensor | None = None, temperature: float = 1.0,
                          return_entropy: bool = False, softcap: float | None = None,
                          logit_scale: float = 1.0):
    """The naive loss head: full logits (fp32 for half inputs) -> log-softmax -> gather.

    ``logp[t] = log_softmax(f(W h_t + b) / T)[target_ids[t]]`` with ``f`` the logit scale and
    soft-cap (``logit_transform.py``; identity by default); entropy on the tempered logits.
    Materialises [tokens x vocab]: the path every fused kernel is compared to."""
    from .logit_transform import transform_logits_reference

    logits = F.linear(hidden, weight, bias)
    logits = transform_logits_reference(logits.to(compute_dtype(logits.dtype)), softcap, logit_scale)
    logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    probs = log_probs.exp()  # 0 * log 0 = 0 at logits of -inf (banned tokens)
    entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)
    return logp, entropy


def naive_linear_lpo_loss(hidden, weight, target_ids, mask, group_ids, rewards=None,
                          advantages=None, *, bias=None, temperature=1.0, old_logp=None,
                          cu_seqlens=None, group_size=None, validate=None, softcap=None,
                          logit_scale=1.0, **lpo_options):
    """Naive eager LPO from hidden states: the naive head, then ``listwise_forward``.

    Plain autograd, no custom Function (and no import of ``functional``, which imports
    this module): the loss is the reference value plus ``sum(token_grad * (logp -
    logp.detach()))``, a term that is exactly 0 and whose gradient is the reference's."""
    logp = naive_linear_logprobs(hidden, weight, target_ids, bias=bias, temperature=temperature,
                                 softcap=softcap, logit_scale=logit_scale)
    options = LPOOptions(**lpo_options)
    batch = check_listwise_inputs(logp, old_logp, mask, group_ids, rewards, advantages,
                                  options=options, cu_seqlens=cu_seqlens,
                                  group_size=group_size, validate=validate)
    with torch.no_grad():
        result = listwise_forward(batch, options)
    token_grad = result.token_grad if result.grad_scale is None else result.token_grad * result.grad_scale
    carrier = token_grad * (logp - logp.detach())  # value 0, gradient token_grad
    if result.token_group is None:
        return result.loss + carrier.sum(), result.stats
    per_group = torch.zeros_like(result.loss).index_add_(
        0, result.token_group.expand_as(carrier).reshape(-1), carrier.reshape(-1))
    return result.loss + per_group, result.stats


def __getattr__(name):  # the GRPO family moved to grpo.py; old imports keep working
    if name in ("grpo_forward", "naive_linear_grpo_loss"):
        from . import grpo

        return getattr(grpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
