"""verl adapter: LPO as verl policy losses (``policy_loss.loss_mode=lpo_fwd`` ...).

verl calls a policy loss as (``verl/workers/utils/losses.py`` ``ppo_loss``, verl 0.9)::

    pg_loss, pg_metrics = policy_loss_fn(old_log_prob=..., log_prob=..., advantages=...,
        response_mask=..., loss_agg_mode=..., config=actor_config, rollout_is_weights=...)

with padded ``[B, R]`` tensors and token-level advantages. The loss functions here have that
signature (``PolicyLossFn``), and are registered under ``lpo_fwd`` (forward KL), ``lpo_rev``
(reverse KL), ``lpo_js`` and ``lpo_alpha`` when verl imports; importing this module never
needs verl. Put ``actor_rollout_ref.model.external_lib=lpo_kernels.integrations.verl`` in the
config so verl's workers import (and so register) them.

Groups. A listwise loss needs each response's group and, for reward-based targets, its score:
- **No patch** (default): rows are consecutive groups of ``config.rollout_n`` and the target
  is verl's own advantage (``lpo_target="advantages"``: the masked token mean of
  ``advantages`` per row, ``phi = A / tau``; with ``algorithm.adv_estimator=grpo`` that is
  LPO's ``grpo`` target). Needs ``trainer.balance_batch=False``,
  ``actor.use_dynamic_bsz=False``, ``actor.shuffle=False`` and ``ppo_micro_batch_size_per_gpu``
  a multiple of ``rollout.n`` (micro-batches must hold whole groups, in order).
- **Patch** (:func:`apply_verl_patch`): the trainer adds ``lpo_group_ids`` (from ``uid``) and
  ``lpo_scores`` (``token_level_scores`` summed) to the batch before the actor update, and the
  actor's ``ppo_loss`` hands them to the loss (:func:`lpo_group_context`); then any target
  works and rows may be in any order, but micro-batches must still hold whole groups.

Aggregation: LPO's loss is a mean over groups; ``loss_agg_mode`` is ignored. With verl's
``global_batch_info`` (``dp_size``, ``global_batch_size`` in sequences) the micro-batch loss is
``sum_g D_g * dp_size / (global_batch_size / rollout_n)``, so the summed, data-parallel-averaged
gradient is the mean over the mini-batch's groups; without it, the local group mean.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch

from ..functional import lpo_loss
from ..options import LPOOptions

LOSS_DIVERGENCES = {"lpo_fwd": "forward_kl", "lpo_rev": "reverse_kl", "lpo_js": "js", "lpo_alpha": "alpha"}

# Options not in verl's ActorConfig; override with set_lpo_options() or ``policy_loss.lpo_<name>``.
DEFAULT_OPTIONS = dict(target="advantages", alpha=0.5, tau=1.0, eps=1e-6, seq_reduce="mean", clip="clamp",
                       backend="auto")
_options = dict(DEFAULT_OPTIONS)
_group_info: contextvars.ContextVar = contextvars.ContextVar("lpo_group_info", default=None)


def set_lpo_options(**options) -> None:
    """Process-wide LPO options for the verl losses (``target``, ``alpha``, ``tau``, ``eps``,
    ``seq_reduce``, ``clip``, ``backend``); call it in your ``external_lib`` module."""
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown LPO options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
    merged = {**_options, **options}
    LPOOptions(**{k: v for k, v in merged.items() if k != "backend"})  # raises on bad values
    _options.update(options)


@contextlib.contextmanager
def lpo_group_context(group_ids: torch.Tensor, scores: torch.Tensor | None = None):
    """Within this block, the verl LPO losses take group ids (``[B]``) and scores (``[B]``)
    of the current micro-batch from here (what the patched ``ppo_loss`` does)."""
    token = _group_info.set((group_ids, scores))
    try:
        yield
    finally:
        _group_info.reset(token)


def _config_value(config, name: str, default=None):
    """``config.name`` for verl's ActorConfig (a dataclass with ``get``) or a DictConfig/dict."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    value = getattr(config, name, default)
    return default if value is None else value


def _lpo_option(config, name: str):
    policy_loss = _config_value(config, "policy_loss")
    value = _config_value(policy_loss, f"lpo_{name}")
    return _options[name] if value is None else value


def compute_policy_loss_lpo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                            rollout_is_weights: torch.Tensor | None = None, *, divergence: str = "forward_kl",
                            group_ids: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                            ) -> tuple[torch.Tensor, dict[str, Any]]:
    """LPO with verl's ``PolicyLossFn`` signature; returns ``(loss, metrics)`` with verl's
    metric names (``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``) plus
    ``actor/lpo_*``. ``group_ids``/``scores``: explicit group info (else the context set by
    :func:`lpo_group_context`, else consecutive groups of ``config.rollout_n``)."""
    if rollout_is_weights is not None:
        raise ValueError("rollout_is_weights: the LPO losses do not support rollout correction weights; "
                         "disable algorithm.rollout_correction")
    if group_ids is None and _group_info.get() is not None:
        group_ids, scores = _group_info.get()
    group_size = None
    if group_ids is None:
        group_size = _config_value(config, "rollout_n")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError("config.rollout_n: without group ids (apply_verl_patch) the LPO losses need "
                             "rollout_n to find the groups (consecutive rows)")
    mask = response_mask.to(log_prob.dtype)
    target = _lpo_option(config, "target")
    if target != "advantages" and scores is None:
        raise ValueError(f"lpo target={target!r} needs per-response scores: apply_verl_patch() (or use "
                         "target='advantages')")
    clip_ratio = _config_value(config, "clip_ratio", 0.2)
    # verl broadcasts the sequence advantage over tokens; its masked token mean recovers it.
    seq_advantages = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    loss, stats = lpo_loss(
        log_prob, old_log_prob, mask, group_ids, scores, seq_advantages.detach(), target=target,
        divergence=divergence, alpha=_lpo_option(config, "alpha"), tau=_lpo_option(config, "tau"),
        eps=_lpo_option(config, "eps"), seq_reduce=_lpo_option(config, "seq_reduce"),
        clip=_lpo_option(config, "clip"), clip_eps_low=_config_value(config, "clip_ratio_low", clip_ratio),
        clip_eps_high=_config_value(config, "clip_ratio_high", clip_ratio), reduction="sum",
        group_size=group_size, backend=_lpo_option(config, "backend"))

    batch_info = _config_value(config, "global_batch_info", {}) or {}
    global_batch_size = batch_info.get("global_batch_size")
    rollout_n = _config_value(config, "rollout_n")
    if global_batch_size is not None and isinstance(rollout_n, int):
        # sum over local groups / groups in the global mini-batch, times dp_size (DP averages grads)
        loss = loss * (batch_info.get("dp_size", 1) * rollout_n / global_batch_size)
    else:
        loss = loss / stats.n_groups.clamp(min=1).to(loss.dtype)

    ppo_kl = ((old_log_prob - log_prob).detach() * mask).sum() / mask.sum().clamp(min=1.0)
    values = torch.stack([stats.clip_fraction, ppo_kl, stats.clip_fraction_low, stats.divergence,
                          stats.listwise_entropy, stats.target_entropy, stats.mean_abs_coef]).float().tolist()
    names = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/lpo_divergence",
             "actor/lpo_listwise_entropy", "actor/lpo_target_entropy", "actor/lpo_mean_abs_coef")
    return loss, dict(zip(names, values))


def _make_loss(name: str, divergence: str):
    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                    config=None, rollout_is_weights=None):
        return compute_policy_loss_lpo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                       config, rollout_is_weights, divergence=divergence)

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{name}"
    policy_loss.__doc__ = f"verl PolicyLossFn: LPO with divergence={divergence!r} (see compute_policy_loss_lpo)."
    return policy_loss


compute_policy_loss_lpo_fwd = _make_loss("lpo_fwd", "forward_kl")
compute_policy_loss_lpo_rev = _make_loss("lpo_rev", "reverse_kl")
compute_policy_loss_lpo_js = _make_loss("lpo_js", "js")
compute_policy_loss_lpo_alpha = _make_loss("lpo_alpha", "alpha")
POLICY_LOSSES = {"lpo_fwd": compute_policy_loss_lpo_fwd, "lpo_rev": compute_policy_loss_lpo_rev,
                 "lpo_js": compute_policy_loss_lpo_js, "lpo_alpha": compute_policy_loss_lpo_alpha}


def register_verl_losses() -> bool:
    """Registers the losses in verl's policy-loss registry; False (and nothing done) when verl
    is not importable."""
    try:
        from verl.trainer.ppo.core_algos import register_policy_loss
    except ImportError:
        return False
    for name, fn in POLICY_LOSSES.items():
        register_policy_loss(name)(fn)
    return True


# -- the patch that brings uid and scores to the loss ---------------------------------------
def add_lpo_fields(batch) -> None:
    """On a verl ``DataProto`` after rewards are scored: ``lpo_group_ids`` (``uid`` as int ids)
    and ``lpo_scores`` (``token_level_scores`` summed over tokens), one per row."""
    import numpy as np

    uid = batch.non_tensor_batch["uid"]
    _, inverse = np.unique(np.asarray(uid, dtype=object).astype(str), return_inverse=True)
    scores = batch.batch["token_level_scores"]
    batch.batch["lpo_group_ids"] = torch.as_tensor(inverse, dtype=torch.long, device=scores.device)
    batch.batch["lpo_scores"] = scores.sum(-1).to(torch.float32)


def wrap_ppo_loss(ppo_loss):
    """verl's ``ppo_loss(config, model_output, data, dp_group=None)`` that passes the
    micro-batch's ``lpo_group_ids`` / ``lpo_scores`` (when present) to the LPO losses."""
    def ppo_loss_with_groups(config, model_output, data, dp_group=None):
        keys = data.keys()
        if "lpo_group_ids" not in keys:
            return ppo_loss(config, model_output, data, dp_group)
        scores = data["lpo_scores"] if "lpo_scores" in keys else None
        with lpo_group_context(data["lpo_group_ids"], scores):
            return ppo_loss(config, model_output, data, dp_group)

    ppo_loss_with_groups.__wrapped__ = ppo_loss
    return ppo_loss_with_groups


def apply_verl_patch() -> None:
    """Patches verl (0.9 layout) so group ids and scores reach the loss: the trainer's
    ``_update_actor`` adds them (:func:`add_lpo_fields`) and the actor's ``ppo_loss`` hands
    them on (:func:`wrap_ppo_loss`). Call it in the driver and in the workers (the
    ``external_lib`` module runs there). Not exercised against a live verl run here."""
    from verl.trainer.ppo import ray_trainer
    from verl.workers import engine_workers
    from verl.workers.utils import losses

    if not hasattr(losses.ppo_loss, "__wrapped__"):
        losses.ppo_loss = wrap_ppo_loss(losses.ppo_loss)
        engine_workers.ppo_loss = losses.ppo_loss
    update_actor = ray_trainer.RayPPOTrainer._update_actor
    if not hasattr(update_actor, "__wrapped__"):
        def _update_actor(self, batch):
            add_lpo_fields(batch)
            return update_actor(self, batch)

        _update_actor.__wrapped__ = update_actor
        ray_trainer.RayPPOTrainer._update_actor = _update_actor


REGISTERED = register_verl_losses()

__all__ = ["compute_policy_loss_lpo", "compute_policy_loss_lpo_fwd", "compute_policy_loss_lpo_rev",
           "compute_policy_loss_lpo_js", "compute_policy_loss_lpo_alpha", "POLICY_LOSSES", "LOSS_DIVERGENCES",
           "register_verl_losses", "set_lpo_options", "lpo_group_context", "add_lpo_fields", "wrap_ppo_loss",
           "apply_verl_patch", "REGISTERED"]
