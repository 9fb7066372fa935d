"""Groups split across calls (micro-batches, data-parallel ranks).

LPO's coefficient c_k needs every response of its group: the group softmax of the scores
s_j, the target built from the rewards r_j (mean, std, count) and, for reverse KL / alpha
/ JS, sums of P_j-weighted terms over the group. When a group's responses are spread over
several calls, each call needs the *other* responses' ``(group id, score, reward or
advantage, n_tokens)``.

Design: per-sequence records, combined by concatenation (all-gather across ranks,
``combine_group_stats`` across micro-batches). Why not per-group sums that can be
all-reduced: the grpo/maxrl/rloo targets need the group's mean and std of rewards *and*
its own log-sum-exp of target logits built from them, reverse KL needs sum P_j log w*_j,
alpha needs sum w*^a P^(1-a) — a chain of dependent reductions (several all-reduce
rounds, with group ids that are arbitrary integers and must be mapped to slots). A record
per sequence is 4 numbers, B << tokens, so one all-gather of a few KiB is exact for every
target and divergence, and the math stays the reference building blocks, unchanged.

Semantics of ``group_stats=others``: ``others`` holds the records of the responses *not*
in this call. The call returns the whole-batch loss value (the same number in every
call), the whole-batch group statistics, and the gradient of the whole-batch loss with
respect to *this call's* log-probs, so summing the gradients of all calls (gradient
accumulation) gives exactly the whole-batch gradient. Under DDP, which averages
gradients over ranks, multiply the loss by the world size. Token statistics
(clip fractions, n_tokens, n_seqs, mean_abs_coef) are over this call's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .inputs import ListwiseBatch, check_listwise_inputs
from .options import LPOOptions
from .reference import (ListwiseResult, compute_dtype, group_slots, listwise_from_scores,
                        sequence_scores)


@dataclass(frozen=True)
class LPOGroupStats:
    """Per-sequence records of one call: what other calls need to finish its groups.

    ``group_ids`` [S] int64, ``scores`` [S] (s_k, unclipped log-ratio per response),
    ``values`` [S] (rewards, or advantages for target='advantages'), ``n_tokens`` [S]
    (counted tokens; 0 = empty response, left out of its group). All on one device."""

    group_ids: Tensor
    scores: Tensor
    values: Tensor
    n_tokens: Tensor

    def __len__(self) -> int:
        return self.group_ids.shape[0]

    def to(self, device=None, dtype=None) -> "LPOGroupStats":
        def cast(x, floating):
            return x.to(device=device, dtype=dtype if floating and dtype is not None else x.dtype)
        return LPOGroupStats(cast(self.group_ids, False), cast(self.scores, True),
                             cast(self.values, True), cast(self.n_tokens, True))


def combine_group_stats(parts: Sequence[LPOGroupStats]) -> LPOGroupStats:
    """Concatenate the records of several calls (e.g. every micro-batch but this one)."""
    parts = list(parts)
    if not parts:
        raise ValueError("combine_group_stats needs at least one LPOGroupStats")
    for i, p in enumerate(parts):
        if not isinstance(p, LPOGroupStats):
            raise TypeError(f"parts[{i}] must be an LPOGroupStats, got {type(p).__name__}")
    dtype = torch.promote_types(parts[0].scores.dtype, parts[0].values.dtype)
    return LPOGroupStats(
        torch.cat([p.group_ids.long() for p in parts]),
        torch.cat([p.scores.to(dtype) for p in parts]),
        torch.cat([p.values.to(dtype) for p in parts]),
        torch.cat([p.n_tokens.to(dtype) for p in parts]))


def _own_group_ids(batch: ListwiseBatch) -> Tensor:
    if batch.group_ids is None:
        raise ValueError("group_ids is required with split groups (group_stats): ids must "
                         "mean the same prompt in every call")
    return batch.group_ids.long()


def _batch_records(batch: ListwiseBatch, seq_reduce: str) -> LPOGroupStats:
    dtype = compute_dtype(batch.logp.dtype)
    scores, n_tokens, _, _ = sequence_scores(batch, seq_reduce, dtype)
    return LPOGroupStats(_own_group_ids(batch), scores.detach(),
                         batch.scores_source.to(dtype), n_tokens.detach())


@torch.no_grad()
def lpo_group_stats(logp, old_logp, mask, group_ids, rewards=None, advantages=None, *,
                    cu_seqlens=None, target="grpo", seq_reduce="mean",
                    validate=None) -> LPOGroupStats:
    """The records of this call's sequences (no grad), from per-token log-probs in the
    layout of :func:`lpo_kernels.lpo_loss` (padded ``[B, T]`` or packed ``[N]`` with
    ``cu_seqlens``). For hidden states use
    :func:`lpo_kernels.fused_linear.fused_linear_lpo_group_stats`."""
    options = LPOOptions(target=target, seq_reduce=seq_reduce)
    batch = check_listwise_inputs(logp, old_logp, mask, group_ids, rewards, advantages,
                                  options=options, cu_seqlens=cu_seqlens, validate=validate)
    return _batch_records(batch, seq_reduce)


def check_group_stats(group_stats, device) -> LPOGroupStats:
    if not isinstance(group_stats, LPOGroupStats):
        raise TypeError(f"group_stats must be an LPOGroupStats (see lpo_group_stats), got "
                        f"{type(group_stats).__name__}")
    n = len(group_stats)
    for name in ("scores", "values", "n_tokens"):
        x = getattr(group_stats, name)
        if x.shape != (n,):
            raise ValueError(f"group_stats.{name} must have shape [{n}], got {tuple(x.shape)}")
    return group_stats.to(device=device)


def listwise_forward_with_group_stats(batch: ListwiseBatch, options: LPOOptions,
                                      others: LPOGroupStats) -> ListwiseResult:
    """``reference.listwise_forward`` for a call whose groups continue in ``others``.

    The same building blocks on the union of this call's sequences (first) and the other
    calls' records; only this call's tokens get a gradient (see the module docstring)."""
    if options.reduction == "none":
        raise ValueError("reduction='none' is not supported with group_stats")
    dtype = compute_dtype(batch.logp.dtype)
    scores, n_tokens, delta, mask = sequence_scores(batch, options.seq_reduce, dtype)
    ids = torch.cat([_own_group_ids(batch), others.group_ids.long()])
    scores = torch.cat([scores, others.scores.to(dtype)])
    values = torch.cat([batch.scores_source.to(dtype), others.values.to(dtype)])
    n_tokens = torch.cat([n_tokens, others.n_tokens.to(dtype)])
    slots = group_slots(ids, None, ids.shape[0], ids.device)
    return listwise_from_scores(batch, options, scores, n_tokens, values, slots, delta, mask)


def lpo_loss_with_group_stats(logp, old_logp, mask, group_ids, rewards=None, advantages=None, *,
                              group_stats: LPOGroupStats, cu_seqlens=None, validate=None,
                              **lpo_options):
    """``lpo_loss`` on per-token log-probs for a call whose groups continue in
    ``group_stats`` (the other calls' records). Returns ``(loss, stats)``."""
    from .functional import AttachTokenGrad

    options = LPOOptions(**lpo_options)
    batch = check_listwise_inputs(logp, old_logp, mask, group_ids, rewards, advantages,
                                  options=options, cu_seqlens=cu_seqlens, validate=validate)
    others = check_group_stats(group_stats, logp.device)
    with torch.no_grad():
        result = listwise_forward_with_group_stats(batch, options, others)
    if not (torch.is_grad_enabled() and logp.requires_grad):
        return result.loss, result.stats
    return AttachTokenGrad.apply(logp, result.loss, result.token_grad, None, None), result.stats


__all__ = ["LPOGroupStats", "lpo_group_stats", "combine_group_stats",
           "listwise_forward_with_group_stats", "lpo_loss_with_group_stats"]
