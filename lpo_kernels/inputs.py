"""Checking and normalising the tensors of a listwise call, once, for every backend.

Shape, dtype and device checks are free (no host sync) and always run. Value checks
(finite rewards, well-formed ``cu_seqlens``, ``group_ids`` consistent with
``group_size``) read tensor values and therefore synchronise with the device: they run
when ``validate=True``; ``validate=None`` (the default) runs them for CPU tensors only,
so a CUDA training step never stalls on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .options import LPOOptions


class InputDTypeError(TypeError, ValueError):
    """A tensor of the wrong dtype or a non-tensor argument: both a TypeError and a
    ValueError, so callers may catch either."""


def check_tensor(name: str, x, *, floating: bool | None = None, dim=None) -> Tensor:
    if not isinstance(x, Tensor):
        raise InputDTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating is True and not x.is_floating_point():
        raise InputDTypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if floating is False and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise InputDTypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.is_complex():
        raise InputDTypeError(f"{name} must be real, got {x.dtype}")
    if dim is not None and x.dim() not in ((dim,) if isinstance(dim, int) else dim):
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def check_same_device(ref_name: str, ref: Tensor, **others) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def check_targets_in_vocab(targets: Tensor, mask: Tensor | None, vocab: int, where: str = "") -> None:
    """Counted tokens (``mask != 0``; all without a mask) have a target in [0, vocab).
    A host sync: callers run it under ``validate``."""
    counted = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.reshape(-1) != 0
    if bool((counted & ((targets < 0) | (targets >= vocab))).any()):
        raise ValueError(f"target_ids of counted tokens must lie in [0, {vocab}){where}")


def malformed_offsets(cu_seqlens: Tensor, n_tokens: int) -> Tensor:
    """How many offsets break ``0 = cu[0] <= cu[1] <= ... <= cu[B] = N`` (0-dim int64, no
    host sync): offset i counts once if it lies outside [0, N], is below offset i-1, or is
    the first (last) and not 0 (N). Every listwise kernel counts the same way
    (``LPOStats.cu_seqlens_errors``)."""
    cu = cu_seqlens.long()
    index = torch.arange(cu.shape[0], device=cu.device)
    bad = (cu < 0) | (cu > n_tokens) | ((index == 0) & (cu != 0))
    bad = bad | ((index == cu.shape[0] - 1) & (cu != n_tokens))
    bad[1:] |= cu[1:] < cu[:-1]
    return bad.sum()


def malformed_offsets_error(n_bad: int, n_tokens: int | str = "N") -> ValueError:
    return ValueError(f"cu_seqlens is malformed: {n_bad} offset(s) break 0 = cu_seqlens[0] "
                      f"<= cu_seqlens[1] <= ... <= cu_seqlens[-1] = {n_tokens} (the number of tokens)")


def resolve_validate(validate: bool | None, device: torch.device) -> bool:
    return device.type == "cpu" if validate is None else bool(validate)


class NonFiniteInputError(ValueError):
    """An input tensor holds NaN or infinity where its values are used."""


def check_finite(name: str, x: Tensor | None, where: Tensor | None = None, *,
                 allow_neg_inf: bool = False) -> None:
    """Raises :class:`NonFiniteInputError` naming ``x`` if it holds NaN or +-inf where
    ``where`` (broadcastable; e.g. the counted tokens) is true. ``allow_neg_inf``: -inf is
    a legal value (a bias that bans tokens). Reads values, i.e. a host sync: call it
    behind ``validate``."""
    if x is None or not x.is_floating_point():
        return
    bad = (torch.isnan(x) | (x == float("inf"))) if allow_neg_inf else ~torch.isfinite(x)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        what = "finite or -inf" if allow_neg_inf else "finite"
        where_text = "" if where is None else " at counted tokens"
        raise NonFiniteInputError(f"{name} must be {what}{where_text} (found NaN or inf)")


def check_finite_tokens(mask: Tensor | None, **tensors) -> None:
    """``mask`` is finite and each named tensor is finite, at the counted tokens
    (``mask != 0``) where it has the mask's shape (padding values never enter the math),
    everywhere otherwise (per-sequence values such as advantages or rewards). A host sync:
    callers run it under ``validate``."""
    check_finite("mask", mask)
    counted = None if mask is None else mask != 0
    for name, x in tensors.items():
        if isinstance(x, Tensor):
            at = counted if counted is not None and x.shape == counted.shape else None
            check_finite(name, x, at)


@dataclass(frozen=True)
class ListwiseBatch:
    """The checked inputs of one listwise call.

    Token tensors are padded ``[B, T]`` (``cu_seqlens is None``) or packed ``[N]``.
    ``mask`` may be None (every token counts). ``group_ids`` may be None when
    ``group_size`` is given (groups are consecutive rows of ``group_size``)."""

    logp: Tensor
    old_logp: Tensor | None
    mask: Tensor | None
    group_ids: Tensor | None
    rewards: Tensor | None
    advantages: Tensor | None
    cu_seqlens: Tensor | None
    group_size: int | None
    n_seqs: int

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def scores_source(self) -> Tensor:
        """Per-sequence values the target is built from (rewards or advantages)."""
        return self.advantages if self.advantages is not None else self.rewards


def check_listwise_inputs(
    logp, old_logp, mask, group_ids, rewards, advantages, *, options: LPOOptions,
    cu_seqlens=None, group_size=None, validate: bool | None = None,
) -> ListwiseBatch:
    packed = cu_seqlens is not None
    check_tensor("logp", logp, floating=True, dim=1 if packed else 2)
    if packed:
        check_tensor("cu_seqlens", cu_seqlens, floating=False, dim=1)
        if cu_seqlens.numel() < 1:
            raise ValueError("cu_seqlens must hold at least one offset (0)")
        n_seqs = cu_seqlens.numel() - 1
    else:
        n_seqs = logp.shape[0]
    if old_logp is not None:
        check_tensor("old_logp", old_logp, floating=True)
        if old_logp.shape != logp.shape:
            raise ValueError(f"old_logp shape {tuple(old_logp.shape)} != logp shape {tuple(logp.shape)}")
    if mask is not None:
        check_tensor("mask", mask)
        if mask.shape != logp.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != logp shape {tuple(logp.shape)}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if n_seqs % group_size:
            raise ValueError(f"group_size={group_size} does not divide the number of sequences {n_seqs}")
    if group_ids is None:
        if group_size is None:
            raise ValueError("group_ids is required unless group_size is given")
    else:
        check_tensor("group_ids", group_ids, floating=False, dim=1)
        if group_ids.shape[0] != n_seqs:
            raise ValueError(f"group_ids has {group_ids.shape[0]} entries, expected one per sequence ({n_seqs})")
    if options.needs_advantages:
        if advantages is None:
            raise ValueError("target='advantages' needs advantages=")
        per_seq_name, per_seq = "advantages", advantages
    else:
        if rewards is None:
            raise ValueError(f"target={options.target!r} needs rewards=")
        per_seq_name, per_seq = "rewards", rewards
    check_tensor(per_seq_name, per_seq, dim=1)
    if per_seq.shape[0] != n_seqs:
        raise ValueError(f"{per_seq_name} has {per_seq.shape[0]} entries, expected one per sequence ({n_seqs})")
    if not per_seq.is_floating_point():
        per_seq = per_seq.to(torch.float32)
    check_same_device("logp", logp, old_logp=old_logp, mask=mask, group_ids=group_ids,
                      cu_seqlens=cu_seqlens, **{per_seq_name: per_seq})

    if resolve_validate(validate, logp.device):
        check_finite_tokens(mask, logp=logp, old_logp=old_logp, **{per_seq_name: per_seq})
        if mask is not None and bool((mask < 0).any()):
            # Weights that cancel (1, -1) would empty a response that still counts tokens.
            raise ValueError("mask must be >= 0 (it weights tokens: N_k = sum of the mask)")
        if options.target == "maxrl" and bool((per_seq < 0).any()):
            raise ValueError("rewards must be >= 0 for target='maxrl' (it divides by the mean reward)")
        if packed:
            n_bad = int(malformed_offsets(cu_seqlens, logp.shape[0]))
            if n_bad:
                raise malformed_offsets_error(n_bad, logp.shape[0])
        if group_size is not None and group_ids is not None:
            blocks = group_ids.view(-1, group_size)
            if bool((blocks != blocks[:, :1]).any()) or torch.unique(blocks[:, 0]).numel() != blocks.shape[0]:
                raise ValueError("group_ids disagree with group_size (groups must be consecutive rows)")

    return ListwiseBatch(
        logp=logp, old_logp=old_logp, mask=mask, group_ids=group_ids,
        rewards=per_seq if per_seq_name == "rewards" else None,
        advantages=per_seq if per_seq_name == "advantages" else None,
        cu_seqlens=cu_seqlens, group_size=group_size, n_seqs=n_seqs,
    )
