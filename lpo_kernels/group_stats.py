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

from .inputs import ListwiseBatch, check_finite, check_listwise_inputs, resolve_validate
from .options import SEQ_REDUCES, LPOOptions
from .reference import (ListwiseResult, compute_dtype, group_slots, listwise_from_scores,
                        sequence_scores)


VALUE_KINDS = ("rewards", "advantages")


@dataclass(frozen=True)
class LPOGroupStats:
    """Per-sequence records of one call: what other calls need to finish its groups.

    ``group_ids`` [S] integer, ``scores`` [S] (s_k, unclipped log-ratio per response),
    ``values`` [S] (rewards, or advantages for target='advantages'), ``n_tokens`` [S]
    (counted tokens, >= 0; 0 = empty response, left out of its group). All on one device.

    ``seq_reduce`` ('mean' | 'sum') and ``values_kind`` ('rewards' | 'advantages') say what
    built the records (:func:`lpo_group_stats` sets both; None = unknown, for records
    built by hand): combining or using records built another way is a ``ValueError``,
    not a silent mix of mean and summed scores, or of rewards and advantages."""

    group_ids: Tensor
    scores: Tensor
    values: Tensor
    n_tokens: Tensor
    seq_reduce: str | None = None
    values_kind: str | None = None

    def __post_init__(self):  # shapes and dtypes only: no host sync
        for name in ("group_ids", "scores", "values", "n_tokens"):
            x = getattr(self, name)
            if not isinstance(x, Tensor):
                raise TypeError(f"LPOGroupStats.{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 1:
                raise ValueError(f"LPOGroupStats.{name} must be 1-D (one entry per sequence), "
                                 f"got shape {tuple(x.shape)}")
            if x.shape != self.group_ids.shape:
                raise ValueError(f"LPOGroupStats.{name} has {x.shape[0]} entries, group_ids "
                                 f"{self.group_ids.shape[0]}")
        if self.group_ids.is_floating_point() or self.group_ids.is_complex() or self.group_ids.dtype == torch.bool:
            raise TypeError(f"LPOGroupStats.group_ids must be an integer tensor (float ids would "
                            f"be truncated), got {self.group_ids.dtype}")
        for name in ("scores", "values"):
            if not getattr(self, name).is_floating_point():
                raise TypeError(f"LPOGroupStats.{name} must be floating point, got {getattr(self, name).dtype}")
        if self.seq_reduce not in (None, *SEQ_REDUCES):
            raise ValueError(f"LPOGroupStats.seq_reduce must be one of {SEQ_REDUCES} or None, got {self.seq_reduce!r}")
        if self.values_kind not in (None, *VALUE_KINDS):
            raise ValueError(f"LPOGroupStats.values_kind must be one of {VALUE_KINDS} or None, "
                             f"got {self.values_kind!r}")

    def __len__(self) -> int:
        return self.group_ids.shape[0]

    def __getitem__(self, index) -> "LPOGroupStats":
        """The records at ``index`` (a slice, an index tensor or a bool mask), same kinds."""
        return LPOGroupStats(self.group_ids[index], self.scores[index], self.values[index],
                             self.n_tokens[index], self.seq_reduce, self.values_kind)

    def to(self, device=None, dtype=None) -> "LPOGroupStats":
        def cast(x, floating):
            return x.to(device=device, dtype=dtype if floating and dtype is not None else x.dtype)
        return LPOGroupStats(cast(self.group_ids, False), cast(self.scores, True),
                             cast(self.values, True), cast(self.n_tokens, True),
                             self.seq_reduce, self.values_kind)


def _agreed(parts, field: str) -> str | None:
    """The one non-None value of ``field`` among the parts (ValueError if they differ)."""
    kinds = {getattr(p, field) for p in parts} - {None}
    if len(kinds) > 1:
        raise ValueError(f"group_stats records built with different {field}: {sorted(kinds)}")
    return kinds.pop() if kinds else None


def combine_group_stats(parts: Sequence[LPOGroupStats]) -> LPOGroupStats:
    """Concatenate the records of several calls (e.g. every micro-batch but this one)."""
    if isinstance(parts, (LPOGroupStats, Tensor, str)) or not hasattr(parts, "__iter__"):
        raise TypeError(f"parts must be a sequence of LPOGroupStats, got {type(parts).__name__}")
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
        torch.cat([p.n_tokens.to(dtype) for p in parts]),
        _agreed(parts, "seq_reduce"), _agreed(parts, "values_kind"))


def _own_group_ids(batch: ListwiseBatch) -> Tensor:
    if batch.group_ids is None:
        raise ValueError("group_ids is required with split groups (group_stats): ids must "
                         "mean the same prompt in every call")
    return batch.group_ids.long()


def _batch_records(batch: ListwiseBatch, seq_reduce: str) -> LPOGroupStats:
    dtype = compute_dtype(batch.logp.dtype)
    scores, n_tokens, *_ = sequence_scores(batch, seq_reduce, dtype)
    return LPOGroupStats(_own_group_ids(batch), scores.detach(),
                         batch.scores_source.to(dtype), n_tokens.detach(), seq_reduce,
                         "advantages" if batch.advantages is not None else "rewards")


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


def check_group_stats(group_stats, device, options: LPOOptions | None = None,
                      validate: bool | None = None) -> LPOGroupStats:
    """Type, shape (at construction), kind (against ``options``) and, under ``validate``,
    value checks of the other calls' records; returns them on ``device``."""
    if not isinstance(group_stats, LPOGroupStats):
        raise TypeError(f"group_stats must be an LPOGroupStats (see lpo_group_stats), got "
                        f"{type(group_stats).__name__}")
    if options is not None:
        _check_records_match(group_stats, options)
    records = group_stats.to(device=device)
    if resolve_validate(validate, records.n_tokens.device):
        check_finite("group_stats.n_tokens", records.n_tokens.to(torch.float64))
        if bool((records.n_tokens < 0).any()):
            raise ValueError("group_stats.n_tokens must be >= 0")
        counted = records.n_tokens > 0  # empty responses' scores never enter the math
        check_finite("group_stats.scores", records.scores, counted)
        check_finite("group_stats.values", records.values, counted)
    return records


def _check_records_match(records: LPOGroupStats, options: LPOOptions) -> None:
    if records.seq_reduce is not None and records.seq_reduce != options.seq_reduce:
        raise ValueError(f"group_stats were built with seq_reduce={records.seq_reduce!r}, this call "
                         f"uses seq_reduce={options.seq_reduce!r}: their scores do not mix")
    kind = "advantages" if options.needs_advantages else "rewards"
    if records.values_kind is not None and records.values_kind != kind:
        raise ValueError(f"group_stats carry {records.values_kind} but target={options.target!r} "
                         f"needs {kind}: build them with the same target")


def listwise_forward_with_group_stats(batch: ListwiseBatch, options: LPOOptions,
                                      others: LPOGroupStats) -> ListwiseResult:
    """``reference.listwise_forward`` for a call whose groups continue in ``others``.

    The same building blocks on the union of this call's sequences (first) and the other
    calls' records; only this call's tokens get a gradient (see the module docstring)."""
    if options.reduction == "none":
        raise ValueError("reduction='none' is not supported with group_stats")
    _check_records_match(others, options)
    dtype = compute_dtype(batch.logp.dtype)
    scores, n_tokens, delta, mask, seq_index = sequence_scores(batch, options.seq_reduce, dtype)
    ids = torch.cat([_own_group_ids(batch), others.group_ids.long()])
    scores = torch.cat([scores, others.scores.to(dtype)])
    values = torch.cat([batch.scores_source.to(dtype), others.values.to(dtype)])
    n_tokens = torch.cat([n_tokens, others.n_tokens.to(dtype)])
    slots = group_slots(ids, None, ids.shape[0], ids.device)
    return listwise_from_scores(batch, options, scores, n_tokens, values, slots, delta, mask, seq_index)


def lpo_loss_with_group_stats(logp, old_logp, mask, group_ids, rewards=None, advantages=None, *,
                              group_stats: LPOGroupStats, cu_seqlens=None, validate=None,
                              **lpo_options):
    """``lpo_loss`` on per-token log-probs for a call whose groups continue in
    ``group_stats`` (the other calls' records). Returns ``(loss, stats)``."""
    from .functional import AttachTokenGrad

    options = LPOOptions(**lpo_options)
    batch = check_listwise_inputs(logp, old_logp, mask, group_ids, rewards, advantages,
                                  options=options, cu_seqlens=cu_seqlens, validate=validate)
    others = check_group_stats(group_stats, logp.device, options, validate)
    with torch.no_grad():
        result = listwise_forward_with_group_stats(batch, options, others)
    if not (torch.is_grad_enabled() and logp.requires_grad):
        return result.loss, result.stats
    return AttachTokenGrad.apply(logp, result.loss, result.token_grad, None, None), result.stats


__all__ = ["LPOGroupStats", "lpo_group_stats", "combine_group_stats",
           "listwise_forward_with_group_stats", "lpo_loss_with_group_stats"]
