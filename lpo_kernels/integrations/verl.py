"""verl adapter: LPO as verl policy losses (``policy_loss.loss_mode=lpo_fwd`` ...), exact
under verl 0.9.1's defaults.

Setup: ``actor_rollout_ref.model.external_lib=lpo_kernels.integrations.verl`` (verl imports
it in every worker) and ``actor_rollout_ref.actor.policy_loss.loss_mode=lpo_fwd`` (or
``lpo_rev``, ``lpo_js``, ``lpo_alpha``). Importing this module registers the losses in
verl's policy-loss registry and installs the mini-batch pre-pass
(:mod:`.verl_minibatch`): group identity comes from verl's ``uid``, rewards from
``token_level_rewards``, and groups that verl spreads over micro-batches and ranks
(balancing, ``use_dynamic_bsz``, shuffling) are finished exactly with group-stats records.
Importing it never needs verl.

Options (verl's ``PolicyLossConfig`` is a closed dataclass, so they cannot be config keys):
the environment variable ``LPO_VERL_OPTIONS="target=rloo,tau=1.0,clip=ppo"`` (set it for
the workers, e.g. ``+ray_kwargs.ray_init.runtime_env.env_vars.LPO_VERL_OPTIONS=...``), or
:func:`set_lpo_options` in your own ``external_lib`` module. Known: ``target``
(default ``advantages``: verl's advantages, ``phi = A / tau``), ``alpha``, ``tau``,
``eps``, ``clip``. From verl's own config: ``clip_ratio_low``/``clip_ratio_high`` (LPO's
clip bounds), ``loss_agg_mode`` (``seq-mean-token-mean`` -> ``seq_reduce='mean'``,
``seq-mean-token-sum`` -> ``'sum'``; others refused), ``clip_ratio_c`` (dual clip, below).

Semantics beyond the spec (``shared/docs/lpo-math.md``):
- ``rollout_is_weights`` (verl's rollout correction): per-token importance weights on LPO's
  token gradient, ``dL/dlogp[k,t] = w_is[k,t] * c_k * gate / N_k / G``, as verl's vanilla
  loss weights each token's term; scores, ``P`` and the target stay unweighted.
- ``clip_ratio_c`` (verl's dual clip): a token of a response that LPO pushes down
  (``c_k > 0``) whose ratio exceeds ``clip_ratio_c`` gets no gradient, as dual-clip PPO
  does for negative advantages.
- Loss value: the mean over the mini-batch's groups of the divergence; verl's summed
  micro-batch losses and data-parallel average report exactly that number.

Metrics (verl's names, verl's meanings): ``actor/pg_clipfrac`` share of counted tokens whose
gradient the clip gate zeroed, ``actor/pg_clipfrac_lower`` share zeroed by the dual clip,
``actor/ppo_kl`` mean ``old_log_prob - log_prob``; plus ``actor/lpo_*``.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch

from ..group_stats import listwise_forward_with_group_stats, lpo_group_stats
from ..inputs import check_listwise_inputs
from ..options import LPOOptions
from .verl_minibatch import (LPOVerlError, MiniBatchPlan, current_micro_rows, current_plan, install_verl_hook,
                             minibatch_context)

LOSS_DIVERGENCES = {"lpo_fwd": "forward_kl", "lpo_rev": "reverse_kl", "lpo_js": "js", "lpo_alpha": "alpha"}
LOSS_AGG_MODES = {"seq-mean-token-mean": "mean", "seq-mean-token-sum": "sum"}
ENV_OPTIONS = "LPO_VERL_OPTIONS"

DEFAULT_OPTIONS = dict(target="advantages", alpha=0.5, tau=1.0, eps=1e-6, clip="clamp")
_FLOAT_OPTIONS = {"alpha", "tau", "eps"}
_options: dict = {}


def _check_options(options: dict, source: str) -> None:
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"{source}: unknown LPO options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
    LPOOptions(**{**DEFAULT_OPTIONS, **options})  # raises a ValueError naming a bad value


def parse_env_options(text: str) -> dict:
    """``"target=rloo,tau=0.5"`` -> ``{"target": "rloo", "tau": 0.5}``."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"{ENV_OPTIONS}: expected name=value items separated by commas, got {item!r}")
        options[key] = float(value) if key in _FLOAT_OPTIONS else value
    _check_options(options, ENV_OPTIONS)
    return options


def set_lpo_options(**options) -> None:
    """Process-wide LPO options for the verl losses (``target``, ``alpha``, ``tau``,
    ``eps``, ``clip``); they override ``LPO_VERL_OPTIONS``. Call it in your
    ``external_lib`` module (it runs in every worker)."""
    _check_options({**_options, **options}, "set_lpo_options")
    _options.update(options)


def reset_lpo_options() -> None:
    _options.clear()


def _config_value(config, name: str, default=None):
    """``config.name`` for verl's ActorConfig (a dataclass) or a DictConfig/dict."""
    if config is None:
        return default
    value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
    return default if value is None else value


def resolved_options(loss_agg_mode: str) -> dict:
    """The LPO options of a call: defaults < ``LPO_VERL_OPTIONS`` < :func:`set_lpo_options`,
    plus ``seq_reduce`` from verl's ``loss_agg_mode``."""
    options = {**DEFAULT_OPTIONS, **parse_env_options(os.environ.get(ENV_OPTIONS, "")), **_options}
    mode = loss_agg_mode
    if mode not in LOSS_AGG_MODES:
        raise LPOVerlError(
            f"actor_rollout_ref.actor.loss_agg_mode={mode!r}: LPO's loss is a mean over groups of a per-response "
            "divergence, spread over each response's tokens; set actor_rollout_ref.actor.loss_agg_mode="
            "seq-mean-token-mean (score = token mean of the log-ratio) or seq-mean-token-sum (token sum)")
    options["seq_reduce"] = LOSS_AGG_MODES[mode]
    return options


def _check_verl_config(config) -> None:
    batch_info = _config_value(config, "global_batch_info", {}) or {}
    if batch_info.get("loss_scale_factor") is not None or _config_value(config, "loss_scale_factor") is not None:
        raise LPOVerlError("actor_rollout_ref.actor.loss_scale_factor: the LPO losses normalise by the number of "
                           "groups in the mini-batch; leave loss_scale_factor unset (null)")


def compute_policy_loss_lpo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                            rollout_is_weights: torch.Tensor | None = None, *, divergence: str = "forward_kl",
                            ) -> tuple[torch.Tensor, dict[str, Any]]:
    """LPO with verl's ``PolicyLossFn`` signature; returns ``(loss, metrics)``.

    Needs the mini-batch plan that the pre-pass sets (inside verl: automatic once this
    module is imported; by hand: :func:`lpo_minibatch`). The gradient w.r.t. ``log_prob``
    is that of the whole mini-batch's LPO loss (times the data-parallel size, which verl's
    gradient average divides out)."""
    plan, rows = current_plan(), current_micro_rows()
    if plan is None or rows is None:
        raise LPOVerlError(
            "the LPO verl losses were called without the mini-batch pre-pass, so groups split across "
            "micro-batches or ranks could not be finished exactly. Set actor_rollout_ref.model.external_lib="
            "lpo_kernels.integrations.verl (it installs the pre-pass in verl's workers), or wrap a direct call "
            "in lpo_kernels.integrations.verl.lpo_minibatch(...)")
    _check_verl_config(config)
    cfg = config
    options = resolved_options(loss_agg_mode)
    clip_ratio = _config_value(cfg, "clip_ratio", 0.2)
    lpo_options = LPOOptions(
        target=options["target"], divergence=divergence, alpha=options["alpha"], tau=options["tau"],
        eps=options["eps"], seq_reduce=options["seq_reduce"], clip=options["clip"],
        clip_eps_low=_config_value(cfg, "clip_ratio_low", clip_ratio),
        clip_eps_high=_config_value(cfg, "clip_ratio_high", clip_ratio), reduction="mean")

    own = plan.local[rows.to(plan.local.group_ids.device)]
    values = own.values.to(log_prob.device)
    rewards, seq_adv = (None, values) if lpo_options.target == "advantages" else (values, None)
    mask = response_mask.bool()
    batch = check_listwise_inputs(log_prob, old_log_prob, mask, own.group_ids.to(log_prob.device), rewards,
                                  seq_adv, options=lpo_options)
    with torch.no_grad():
        result = listwise_forward_with_group_stats(batch, lpo_options, plan.others(rows))
        token_grad = result.token_grad
        delta = (log_prob.detach() - old_log_prob).to(token_grad.dtype)
        clip_ratio_c = _config_value(cfg, "clip_ratio_c", None)
        dual = torch.zeros_like(mask)
        if clip_ratio_c is not None:
            if not clip_ratio_c > 1.0:
                raise LPOVerlError(f"actor_rollout_ref.actor.clip_ratio_c={clip_ratio_c}: the dual clip needs a "
                                   "value > 1 (verl's default is 3.0)")
            dual = mask & (token_grad > 0) & (delta > math.log(clip_ratio_c))
            token_grad = torch.where(dual, torch.zeros_like(token_grad), token_grad)
        if rollout_is_weights is not None:
            if rollout_is_weights.shape != log_prob.shape:
                raise ValueError(f"rollout_is_weights must have the shape of log_prob {tuple(log_prob.shape)}, got "
                                 f"{tuple(rollout_is_weights.shape)}")
            token_grad = token_grad * rollout_is_weights.detach().to(token_grad.dtype)
        # verl sums the micro-batch losses and averages them (and the gradients) over ranks:
        # each call reports its share of the whole-mini-batch loss, and its gradient is scaled
        # by dp_size to undo the data-parallel average.
        share = plan.dp_size * log_prob.shape[0] / max(plan.n_global, 1)
        value = result.loss * share
        token_grad = token_grad * plan.dp_size
    from ..functional import AttachTokenGrad

    loss = AttachTokenGrad.apply(log_prob, value.to(log_prob.dtype), token_grad, None, None) \
        if torch.is_grad_enabled() and log_prob.requires_grad else value
    stats = result.stats
    n_tok = mask.sum().clamp(min=1)
    ppo_kl = ((old_log_prob - log_prob).detach() * mask).sum() / n_tok
    dual_frac = dual.sum() / n_tok
    values_ = torch.stack([stats.clip_fraction, ppo_kl, dual_frac, stats.divergence, stats.listwise_entropy,
                           stats.target_entropy, stats.mean_abs_coef, stats.clip_fraction_low,
                           stats.clip_fraction_high]).float().tolist()
    names = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/lpo_divergence",
             "actor/lpo_listwise_entropy", "actor/lpo_target_entropy", "actor/lpo_mean_abs_coef",
             "actor/lpo_clipfrac_low", "actor/lpo_clipfrac_high")
    return loss, dict(zip(names, values_))


@contextlib.contextmanager
def lpo_minibatch(group_ids: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor,
                  response_mask: torch.Tensor, rewards: torch.Tensor | None = None,
                  advantages: torch.Tensor | None = None, *, rows: torch.Tensor | None = None,
                  target: str = "advantages", seq_reduce: str = "mean", dp_size: int = 1):
    """Outside verl's engine: the pre-pass by hand. ``log_prob`` etc. are the whole
    mini-batch (``[B, R]``, no grad needed); inside the block, loss calls on the rows
    ``rows`` (default: all) are finished with the other rows' records."""
    if target == "advantages" and advantages is not None and advantages.dim() == 2:
        m = response_mask.to(advantages.dtype)
        advantages = (advantages * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    local = lpo_group_stats(log_prob.detach(), old_log_prob, response_mask.bool(), group_ids, rewards, advantages,
                            target=target, seq_reduce=seq_reduce)
    plan = MiniBatchPlan(local=local, remote=None, dp_size=dp_size)
    rows = torch.arange(len(local)) if rows is None else rows
    with minibatch_context(plan, rows):
        yield plan


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
    """Registers the losses in verl's policy-loss registry; False (and nothing done) when
    verl is not importable."""
    try:
        from verl.trainer.ppo.core_algos import register_policy_loss
    except ImportError:
        return False
    for name, fn in POLICY_LOSSES.items():
        register_policy_loss(name)(fn)
    return True


REGISTERED = register_verl_losses()
HOOKED = REGISTERED and install_verl_hook()  # the mini-batch pre-pass in verl's engine

__all__ = ["compute_policy_loss_lpo", "compute_policy_loss_lpo_fwd", "compute_policy_loss_lpo_rev",
           "compute_policy_loss_lpo_js", "compute_policy_loss_lpo_alpha", "POLICY_LOSSES", "LOSS_DIVERGENCES",
           "LOSS_AGG_MODES", "LPOVerlError", "register_verl_losses", "set_lpo_options", "reset_lpo_options",
           "parse_env_options", "resolved_options", "lpo_minibatch", "REGISTERED", "HOOKED"]
