"""The GRPO loss family of TRL 1.16's ``GRPOTrainer._compute_loss``, once, in plain PyTorch.

Options, math and the functional ``grpo_loss`` of every TRL loss type — ``grpo``, ``bnpo``,
``dr_grpo``, ``dapo`` (TRL's default), ``luspo``, ``cispo``, ``sapo``, ``vespo`` — and every
option that changes TRL's loss, with TRL's names, defaults and semantics:
``importance_sampling_level="sequence"`` (GSPO), ``delta`` (two-sided clip), ``beta`` with
the k3 KL and ``use_bias_correction_kl``, the vLLM importance-sampling correction
(``importance_sampling_ratio``, computed as TRL does by :func:`vllm_importance_sampling_ratio`),
``top_entropy_quantile``, ``off_policy_mask_threshold``, ``num_items_in_batch``,
``max_completion_length`` and the entropy bonus ``entropy_coef``. The fused head
(``fused_grpo.py``) calls :func:`grpo_forward` on chunks of rows, so this file is the one
copy of the math.

The returned loss is TRL's ``policy_loss`` (minus ``entropy_coef`` x the entropy bonus): TRL's
returned loss with one accumulation step on one process. Under gradient accumulation TRL also
divides the ``grpo``/``bnpo``/``dr_grpo``/``luspo``/``sapo`` loss and the entropy bonus by the
number of accumulation steps, and for ``dapo``/``cispo``/``vespo`` normalises by
``num_items_in_batch * accumulation_steps / (num_processes * steps_per_generation)``: pass that
as ``num_items_in_batch`` to reproduce it.

Numerics (beyond TRL): log-ratios are capped before ``exp`` (fp32: at 32.6, a ratio of
1.4e14; fp64: 343), so finite inputs give a finite loss and gradient — TRL's fp32 ratio
overflows above 88.7 and gives a NaN loss for A = 0 and a NaN gradient for A > 0. Below the
cap the result is TRL's.
Values at masked positions never reach loss or gradient. B = 0 or T = 0 gives a 0 loss with
zero gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

from .inputs import check_finite, check_tensor, resolve_validate
from .options import _check_choice, _check_real, check_divisor
from .reference import compute_dtype, naive_linear_logprobs
from .stats import _StatsMixin

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VLLM_IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO's min(r A, clip(r) A)
_PER_ROW_TYPES = ("grpo", "sapo")            # mean over rows of each row's token mean
_PER_ITEM_TYPES = ("dapo", "cispo", "vespo")  # sum / num_items_in_batch
_OLD_NAMES = {"clip_eps_low": "epsilon", "clip_eps_high": "epsilon_high"}  # before TRL's names


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class GRPOOptions:
    """Every option of TRL 1.16's GRPO loss (``GRPOConfig`` names and defaults).

    ``epsilon_high=None`` means ``epsilon`` (TRL). ``max_completion_length`` is required by
    ``dr_grpo`` (TRL divides by ``GRPOConfig.max_completion_length``, default 512, not by the
    padded width). ``entropy_coef`` is the coefficient to apply this step (TRL's adaptive
    entropy control is trainer state: the trainer passes its current coefficient)."""

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    importance_sampling_level: str = "token"
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    max_completion_length: int | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_coef: float = 0.0

    def __post_init__(self):
        _check_choice("loss_type", self.loss_type, GRPO_LOSS_TYPES)
        _check_choice("importance_sampling_level", self.importance_sampling_level,
                      IMPORTANCE_SAMPLING_LEVELS)
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "float | None") and value is not None:
                object.__setattr__(self, f.name, _check_real(f.name, value))
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1], got {self.epsilon}")
        if self.epsilon_high < 0.0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.delta is not None and self.delta <= 0.0:
            raise ValueError(f"delta must be > 0, got {self.delta}")
        if self.beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {self.top_entropy_quantile}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):  # sapo divides by them
            check_divisor(name, getattr(self, name))
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        mcl = self.max_completion_length
        if mcl is not None and (isinstance(mcl, bool) or not isinstance(mcl, int) or mcl <= 0):
            raise ValueError(f"max_completion_length must be a positive int, got {mcl!r}")
        if self.loss_type == "dr_grpo" and mcl is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length: TRL divides by "
                             "GRPOConfig.max_completion_length (default 512), not the padded width")

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    # names of the options before they followed TRL (kept for old callers)
    clip_eps_low = epsilon_low

    @property
    def clip_eps_high(self) -> float:
        return self.epsilon_high

    @property
    def needs_entropy(self) -> bool:
        return self.top_entropy_quantile < 1.0 or self.entropy_coef != 0.0


def grpo_options(**options) -> GRPOOptions:
    """GRPOOptions from keyword options; also takes the old names ``clip_eps_low`` /
    ``clip_eps_high`` (for ``epsilon`` / ``epsilon_high``)."""
    for old, new in _OLD_NAMES.items():
        if old in options:
            value = options.pop(old)
            if new in options:
                raise ValueError(f"give {new} or its old name {old}, not both")
            if old == "clip_eps_low" and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"clip_eps_low must lie in [0, 1], got {value!r}")
            if old == "clip_eps_high" and not (isinstance(value, (int, float)) and value >= 0.0):
                raise ValueError(f"clip_eps_high must be >= 0, got {value!r}")
            options[new] = value
    known = {f.name for f in fields(GRPOOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown GRPO option(s) {unknown}; options are {sorted(known)}")
    return GRPOOptions(**options)


@dataclass(frozen=True)
class GRPOStats(_StatsMixin):
    """TRL's logged loss metrics (masked means over the counted tokens, or over sequences
    for ``importance_sampling_level="sequence"``, as TRL's ``global_masked_mean``)."""

    kl: Tensor                  # TRL's kl: mean k3 (x ratio with use_bias_correction_kl); 0 without ref_logp
    clip_fraction: Tensor       # TRL's clip_ratio/region_mean (cispo: cispo_clip_ratio)
    clip_fraction_low: Tensor   # TRL's clip_ratio/low_mean
    clip_fraction_high: Tensor  # TRL's clip_ratio/high_mean (cispo: cispo_clip_ratio)
    entropy: Tensor             # TRL's entropy: mean token entropy (0 when no entropy was given)
    policy_loss: Tensor         # TRL's policy_loss: the loss before the entropy bonus
    n_seqs: Tensor
    n_tokens: Tensor


# --------------------------------------------------------------------------- helpers
def _exp_cap(dtype: torch.dtype) -> float:
    """Cap on a log-ratio before ``exp`` (fp32: 32.6, a ratio of 1.4e14; fp64: 343): the
    product of two capped ratios (the bias-corrected KL) times an advantage up to 1e3,
    summed over 2^24 tokens, stays finite, so finite inputs give finite loss and gradient.
    Below the cap (every trust region in use) the result is TRL's."""
    return (math.log(torch.finfo(dtype).max) - math.log(2.0 ** 24) - math.log(1e3)) / 2


def vllm_importance_sampling_ratio(old_logp: Tensor, sampling_logp: Tensor, mask: Tensor | None, *,
                                   mode: str = "sequence_mask", clip_min: float | None = None,
                                   clip_max: float | None = 3.0) -> Tensor:
    """TRL's vLLM importance-sampling correction ratio (``_generate_and_score_completions``):
    ``exp(old_logp - sampling_logp)`` per token (``token_*``, ``[B, T]``) or per sequence
    (``sequence_*``, ``[B, 1]``), clipped to ``[clip_min, clip_max]`` (``*_truncate``) or set
    to 0 outside it (``*_mask``). NaN sampling log-probs (tokens vLLM could not score) give a
    ratio of 1. Pass the result as ``importance_sampling_ratio``. TRL's defaults:
    ``vllm_importance_sampling_mode="sequence_mask"``, ``_clip_min=None``, ``_clip_max=3.0``
    (``vllm_importance_sampling_cap`` is the deprecated name of ``clip_max``)."""
    _check_choice("vllm_importance_sampling_mode", mode, VLLM_IMPORTANCE_SAMPLING_MODES)
    for name, value in (("vllm_importance_sampling_clip_min", clip_min),
                        ("vllm_importance_sampling_clip_max", clip_max)):
        if value is not None:
            _check_real(name, value)
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ValueError(f"vllm_importance_sampling_clip_min ({clip_min}) must be < "
                         f"vllm_importance_sampling_clip_max ({clip_max})")
    check_tensor("old_logp", old_logp, floating=True, dim=2)
    check_tensor("sampling_logp", sampling_logp, floating=True, dim=2)
    if sampling_logp.shape != old_logp.shape or (mask is not None and mask.shape != old_logp.shape):
        raise ValueError("old_logp, sampling_logp and mask must have one [B, T] shape")
    m = torch.ones_like(old_logp) if mask is None else mask
    diff = torch.nan_to_num((old_logp - sampling_logp) * m, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(torch.clamp(diff, max=_exp_cap(diff.dtype)))
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def high_entropy_mask(entropy: Tensor, mask: Tensor | None, top_entropy_quantile: float) -> Tensor:
    """TRL's ``get_high_entropy_mask``: counted tokens whose entropy is at least the
    ``1 - top_entropy_quantile`` quantile (fp32, linear interpolation, as ``torch.quantile``)
    of the counted tokens' entropies. No host sync (masked sort instead of boolean
    indexing). Quantile of this call's tokens: TRL gathers them over processes first."""
    counted = torch.ones_like(entropy, dtype=torch.bool) if mask is None else mask != 0
    values = entropy.detach().float().masked_fill(~counted, math.inf).flatten().sort().values
    n = counted.sum()
    q = torch.scalar_tensor(1.0 - top_entropy_quantile, dtype=torch.float32, device=entropy.device)
    rank = (q * (n - 1)).clamp(min=0.0)
    below = rank.long()
    above = rank.ceil().long()
    last = max(values.numel() - 1, 0)
    if values.numel() == 0:
        return counted
    lo = values.gather(0, below.clamp(max=last).reshape(1))
    hi = values.gather(0, above.clamp(max=last).reshape(1))
    threshold = torch.lerp(lo, hi, (rank - below).reshape(1)).reshape(())
    masked = entropy * (counted if mask is None else mask.float())
    return (masked >= threshold) & counted


def _gamma_weights(adv, log_ratio, m, is_ratio, options: GRPOOptions) -> Tensor:
    """VESPO's detached per-sequence gamma weight phi(w) = e^lambda w^k e^(-lambda w) of the
    sequence importance ratio w (TRL's ``get_gamma_weights``, in log space)."""
    with torch.no_grad():
        lower = math.log(1e-8)
        seq_log_ratio = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * m, dim=-1, keepdim=True)
        if is_ratio is not None:
            seq_log_ratio = seq_log_ratio + torch.sum(
                torch.clamp(torch.log(is_ratio), lower, 20.0), dim=-1, keepdim=True)
        log_w = torch.clamp(seq_log_ratio, lower, 20.0)
        w = torch.exp(log_w)
        nonneg = adv >= 0
        k = torch.where(nonneg, options.vespo_k_pos, options.vespo_k_neg)
        lam = torch.where(nonneg, options.vespo_lambda_pos, options.vespo_lambda_neg).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * w).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


class GRPOScope(NamedTuple):
    """Batch-wide quantities a chunk of rows is normalised by (the fused head processes
    rows in chunks; each chunk's loss is its share of the whole batch's loss)."""

    n_rows: int                 # B: grpo, sapo, luspo, dr_grpo
    n_tokens: Tensor            # counted tokens: bnpo
    n_items: Tensor             # num_items_in_batch: dapo, cispo, vespo
    bonus_tokens: Tensor        # tokens of the entropy bonus (after the entropy mask)


def batch_scope(mask: Tensor | None, token_shape, options: GRPOOptions, num_items_in_batch=None,
                entropy_mask: Tensor | None = None, *, dtype, device) -> GRPOScope:
    m = (torch.ones(token_shape, dtype=dtype, device=device) if mask is None else mask.to(dtype))
    n_tokens = m.sum()
    if num_items_in_batch is None:
        n_items = n_tokens
    else:
        n_items = torch.as_tensor(num_items_in_batch, device=device).to(dtype)
    effective = m if entropy_mask is None else m * entropy_mask
    return GRPOScope(token_shape[0], n_tokens, n_items, effective.sum())


# --------------------------------------------------------------------------- the loss
def grpo_forward(logp: Tensor, old_logp: Tensor | None, mask: Tensor | None, advantages: Tensor,
                 ref_logp: Tensor | None, options: GRPOOptions, *, entropy: Tensor | None = None,
                 sampling_logp: Tensor | None = None, importance_sampling_ratio: Tensor | None = None,
                 num_items_in_batch=None, entropy_mask: Tensor | None = None,
                 scope: GRPOScope | None = None):
    """TRL GRPOTrainer's ``_compute_loss`` on padded ``[B, T]`` log-probs (differentiable
    through ``logp`` and ``entropy``). ``advantages``: ``[B]`` or ``[B, T]``.
    ``entropy_mask``/``scope``: batch-wide values for a chunk of rows (fused head).
    Returns ``(loss, GRPOStats)``."""
    o = options
    dtype = compute_dtype(logp.dtype)
    lp = logp.to(dtype)
    old = lp.detach() if old_logp is None else old_logp.to(dtype)
    m = torch.ones_like(lp) if mask is None else mask.to(dtype)
    counted = m != 0
    adv = advantages.to(dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    cap = _exp_cap(dtype)
    ent = None if entropy is None else entropy.to(dtype)
    if entropy_mask is None and o.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(ent, mask, o.top_entropy_quantile)
    is_ratio = None if importance_sampling_ratio is None else importance_sampling_ratio.to(dtype)
    if scope is None:
        scope = batch_scope(mask, lp.shape, o, num_items_in_batch, entropy_mask, dtype=dtype,
                            device=lp.device)

    log_ratio = torch.where(counted, lp - old, zero)  # masked positions never leak
    if o.importance_sampling_level == "token":
        log_weights = log_ratio
    else:  # GSPO: the length-normalised sequence log-ratio, one weight per row
        log_weights = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(torch.clamp(log_weights, max=cap))  # finite where TRL's overflows

    per_token_kl = None
    if ref_logp is not None:
        ref_delta = torch.where(counted, ref_logp.to(dtype) - lp, zero)
        per_token_kl = torch.exp(torch.clamp(ref_delta, max=cap)) - ref_delta - 1
        if o.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    if o.loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=o.epsilon_high).detach() * adv * lp
    elif o.loss_type in _CLIPPED_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - o.epsilon, 1 + o.epsilon_high)
        if o.delta is not None:  # two-sided clip (INTELLECT-2)
            coef_1 = torch.clamp(coef_1, max=o.delta)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    elif o.loss_type == "sapo":
        temperatures = torch.where(adv > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        per_token = -(torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures) * adv
    else:  # vespo
        phi = _gamma_weights(adv, log_ratio, m, is_ratio, o)
        per_token = -phi * adv * lp

    if o.off_policy_mask_threshold is not None:  # DeepSeek-V3.2 off-policy sequence mask
        sampled = old if sampling_logp is None else sampling_logp.to(dtype)
        kl_div = torch.nan_to_num(torch.where(counted, sampled - lp.detach(), zero), nan=0.0)
        seq_kl = (kl_div * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
        per_token = per_token * ((adv >= 0) | (seq_kl <= o.off_policy_mask_threshold)).to(dtype)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if is_ratio is not None and o.loss_type != "vespo":
        per_token = per_token * is_ratio
    if o.beta != 0.0:
        per_token = per_token + o.beta * per_token_kl

    masked = torch.where(counted, per_token * m, zero)
    if o.loss_type in _PER_ROW_TYPES:
        loss = (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / max(scope.n_rows, 1)
    elif o.loss_type == "bnpo":
        loss = masked.sum() / scope.n_tokens.clamp(min=1.0)
    elif o.loss_type == "dr_grpo":
        loss = masked.sum() / max(scope.n_rows * o.max_completion_length, 1)
    elif o.loss_type == "luspo":
        loss = masked.sum(-1).sum() / max(scope.n_rows, 1)
    else:  # dapo, cispo, vespo: the generation batch's token count
        loss = masked.sum() / scope.n_items.clamp(min=1.0)
    policy_loss = loss

    if o.entropy_coef != 0.0:  # TRL: mean entropy over the tokens the policy term acts on
        effective = m if entropy_mask is None else m * entropy_mask
        bonus = torch.where(counted, ent * effective, zero).sum() / scope.bonus_tokens.clamp(min=1.0)
        loss = loss - o.entropy_coef * bonus

    stats = _stats(o, coef_1, adv, counted, m, per_token_kl, ent, policy_loss)
    return loss, stats


def _stats(o: GRPOOptions, coef_1, adv, counted, m, per_token_kl, ent, policy_loss) -> GRPOStats:
    with torch.no_grad():
        dtype = m.dtype
        n_counted = counted.sum()
        denom = n_counted.clamp(min=1).to(dtype)

        def masked_mean(x):  # TRL's global_masked_mean on one process
            if x.shape[1] == 1:  # sequence level: one value per sequence
                return x.to(dtype).sum() / max(x.shape[0], 1)
            return torch.where(counted, x.to(dtype) * m, torch.zeros((), dtype=dtype, device=m.device)).sum() / denom

        zero = torch.zeros((), dtype=dtype, device=m.device)
        low = high = region = zero
        if o.loss_type in _CLIPPED_TYPES:
            is_low = (coef_1 < 1 - o.epsilon) & (adv < 0)
            is_high = (coef_1 > 1 + o.epsilon_high) & (adv > 0)
            low, high, region = masked_mean(is_low), masked_mean(is_high), masked_mean(is_low | is_high)
        elif o.loss_type == "cispo":
            high = region = masked_mean((coef_1 > o.epsilon_high) & (adv > 0))
        return GRPOStats(
            kl=zero if per_token_kl is None else masked_mean(per_token_kl),
            clip_fraction=region, clip_fraction_low=low, clip_fraction_high=high,
            entropy=zero if ent is None else masked_mean(ent),
            policy_loss=policy_loss.detach(),
            n_seqs=(m.sum(-1) > 0).sum(), n_tokens=n_counted)


# --------------------------------------------------------------------------- checks + API
def check_grpo_tensors(token_shape, options: GRPOOptions, *, device, old_logp, mask, advantages,
                       ref_logp, entropy=None, sampling_logp=None, importance_sampling_ratio=None,
                       num_items_in_batch=None, ref_name="logp") -> None:
    """Shape/dtype/device checks shared by grpo_loss and the fused head (no host sync)."""
    token_shape = tuple(token_shape)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy),
                    ("sampling_logp", sampling_logp), ("mask", mask)):
        if x is not None:
            check_tensor(name, x, floating=None if name == "mask" else True)
            if tuple(x.shape) != token_shape:
                raise ValueError(f"{name} shape {tuple(x.shape)} != {ref_name} shape {token_shape}")
    check_tensor("advantages", advantages, dim=(1, 2))
    if tuple(advantages.shape) not in (token_shape[:1], token_shape):
        raise ValueError(f"advantages must be [B] or [B, T] = {token_shape}, got {tuple(advantages.shape)}")
    if options.beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    if options.needs_entropy and entropy is None and ref_name == "logp":
        raise ValueError("top_entropy_quantile < 1 and entropy_coef != 0 need the token entropy")
    if importance_sampling_ratio is not None:
        check_tensor("importance_sampling_ratio", importance_sampling_ratio, floating=True, dim=2)
        rs = tuple(importance_sampling_ratio.shape)
        if rs not in (token_shape, (token_shape[0], 1)):
            raise ValueError(f"importance_sampling_ratio must be [B, T] or [B, 1] for {token_shape}, got {rs}")
        if options.loss_type == "vespo" and rs != token_shape:
            raise ValueError("loss_type='vespo' needs a token-level importance_sampling_ratio "
                             "(TRL: vllm_importance_sampling_mode token_truncate or token_mask)")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError("num_items_in_batch must be a number or a one-element tensor")
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
            raise TypeError(f"num_items_in_batch must be a number or a tensor, got {type(num_items_in_batch).__name__}")
        elif not (math.isfinite(num_items_in_batch) and num_items_in_batch >= 0):
            raise ValueError(f"num_items_in_batch must be finite and >= 0, got {num_items_in_batch}")
    tensors = dict(old_logp=old_logp, mask=mask, advantages=advantages, ref_logp=ref_logp,
                   entropy=entropy, sampling_logp=sampling_logp,
                   importance_sampling_ratio=importance_sampling_ratio)
    for name, x in tensors.items():
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {device}")


def check_grpo_values(token_shape, mask, validate, device, **tensors) -> None:
    """Finite values at the counted tokens (advantages: of the counted rows/tokens; the vLLM
    ratio also >= 0). A host sync: runs when ``validate`` is True (None: CPU tensors only)."""
    if not resolve_validate(validate, device):
        return
    check_finite("mask", mask)  # NaN weights would count as tokens (NaN != 0)
    counted = (torch.ones(token_shape, dtype=torch.bool, device=device) if mask is None
               else mask.reshape(token_shape) != 0)
    for name, x in tensors.items():
        if x is None or not isinstance(x, Tensor):
            continue
        where = counted
        if x.dim() == 2 and x.shape[1] == 1 and len(token_shape) == 2 and token_shape[1] != 1:
            where = counted.any(-1, keepdim=True)  # [B, 1]: rows with a counted token
        elif x.dim() == 1:
            where = counted.any(-1)                # [B] advantages
        check_finite(name, x.detach(), where)
        if name == "importance_sampling_ratio" and bool(((x.detach() < 0) & where).any()):
            raise ValueError(f"{name} has negative values at counted tokens")


def grpo_loss(logp, old_logp, mask, advantages, *, ref_logp=None, entropy=None, sampling_logp=None,
              importance_sampling_ratio=None, num_items_in_batch=None, validate=None, **options
              ) -> tuple[Tensor, GRPOStats]:
    """The GRPO loss family with TRL 1.16 GRPOTrainer's conventions (this module's docstring).

    ``logp`` (differentiable), ``old_logp`` (None: on-policy), ``mask``, ``ref_logp``,
    ``sampling_logp`` (vLLM's log-probs, for ``off_policy_mask_threshold``; default
    ``old_logp``), ``entropy`` (for ``top_entropy_quantile`` / ``entropy_coef``; may carry a
    gradient): padded ``[B, T]``. ``advantages``: ``[B]`` or ``[B, T]``.
    ``importance_sampling_ratio``: TRL's vLLM correction, ``[B, T]`` or ``[B, 1]``
    (:func:`vllm_importance_sampling_ratio`). ``num_items_in_batch``: the token count of the
    generation batch (``dapo``/``cispo``/``vespo``; default: this call's counted tokens).
    ``**options``: :class:`GRPOOptions` (TRL's names; default ``loss_type="dapo"``).
    ``validate``: check that the counted values are finite (host sync; None: CPU only).
    Returns ``(loss, GRPOStats)``."""
    opts = grpo_options(**options)
    check_tensor("logp", logp, floating=True, dim=2)
    check_grpo_tensors(logp.shape, opts, device=logp.device, old_logp=old_logp, mask=mask,
                       advantages=advantages, ref_logp=ref_logp, entropy=entropy,
                       sampling_logp=sampling_logp, importance_sampling_ratio=importance_sampling_ratio,
                       num_items_in_batch=num_items_in_batch)
    check_grpo_values(logp.shape, mask, validate, logp.device, logp=logp, old_logp=old_logp,
                      advantages=advantages, ref_logp=ref_logp, entropy=entropy,
                      sampling_logp=sampling_logp, importance_sampling_ratio=importance_sampling_ratio)
    return grpo_forward(logp, old_logp, mask, advantages, ref_logp, opts, entropy=entropy,
                        sampling_logp=sampling_logp, importance_sampling_ratio=importance_sampling_ratio,
                        num_items_in_batch=num_items_in_batch)


def naive_linear_grpo_loss(hidden, weight, target_ids, mask, advantages, *, bias=None,
                           temperature=1.0, old_logp=None, ref_logp=None, softcap=None,
                           logit_scale=1.0, **grpo_kwargs):
    """Naive eager GRPO from hidden states (TRL's path: full logits, fp32 log-softmax); the
    entropy is computed (and differentiable) when an option needs it."""

    opts = grpo_options(**{k: v for k, v in grpo_kwargs.items() if k not in _TENSOR_KWARGS})
    if opts.needs_entropy:
        logp, entropy = naive_linear_logprobs(hidden, weight, target_ids, bias=bias,
                                              temperature=temperature, return_entropy=True,
                                              softcap=softcap, logit_scale=logit_scale)
        grpo_kwargs.setdefault("entropy", entropy)
    else:
        logp = naive_linear_logprobs(hidden, weight, target_ids, bias=bias, temperature=temperature,
                                     softcap=softcap, logit_scale=logit_scale)
    return grpo_loss(logp, old_logp, mask, advantages, ref_logp=ref_logp, **grpo_kwargs)


_TENSOR_KWARGS = ("entropy", "sampling_logp", "importance_sampling_ratio", "num_items_in_batch", "validate")

__all__ = ["GRPOOptions", "GRPOStats", "GRPO_LOSS_TYPES", "grpo_loss", "grpo_forward",
           "grpo_options", "vllm_importance_sampling_ratio", "high_entropy_mask",
           "naive_linear_grpo_loss", "GRPOScope", "batch_scope"]
