"""Exact LPO inside verl's actor update, wherever verl puts the rows (verl 0.9.1 layout).

verl balances rows across data-parallel ranks (``trainer.balance_batch``; the v1 trainer
always), packs micro-batches by tokens (``use_dynamic_bsz``) and may shuffle: a group's
responses end up in different micro-batches and on different ranks. LPO's coefficient for
a response needs the current score of every response of its group, so this module adds a
**no-grad pre-pass** to each optimizer step:

1. ``BaseEngine.train_batch(data, loss_function)`` (one call per rank and mini-batch, before
   the micro-batches are cut) is wrapped. When the loss is an LPO loss, one forward pass
   without grad over this rank's mini-batch (``engine.infer_batch``, the same micro-batches
   as the gradient pass) gives every response's log-probs under the current weights.
2. Each response becomes a record ``(group id, score, reward or advantage, n_tokens)``
   (:func:`lpo_kernels.lpo_group_stats`): the group id is a hash of verl's ``uid``, the
   reward the sum of ``token_level_rewards`` (v1: ``rm_scores``), the advantage the token
   mean of ``advantages``. One all-gather over the data-parallel group
   (:func:`lpo_kernels.distributed.all_gather_group_stats`) gives every rank the records of
   the whole mini-batch.
3. Each micro-batch's loss call finishes its groups with the records of every *other*
   response of the mini-batch (``group_stats=``): its gradient is exactly the gradient of
   the whole-mini-batch LPO loss w.r.t. its own tokens, so gradient accumulation and the
   data-parallel average give the whole-mini-batch gradient. Exact because the weights do not
   change between the pre-pass and the gradient pass (one optimizer step).

Cost: one extra forward per mini-batch (about a third of a forward+backward step, ~+33%
FLOPs, less with gradient checkpointing, which already repeats the forward), no extra
activation memory (no grad), 4 numbers per response, and one all-gather of them.

Nothing here runs unless the configured ``policy_loss.loss_mode`` is an LPO loss.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from ..group_stats import LPOGroupStats, combine_group_stats, lpo_group_stats


class LPOVerlError(ValueError):
    """An LPO loss inside verl met a setting under which its gradient would not be exact.
    The message names the verl setting and the fix."""


@dataclass
class MiniBatchPlan:
    """One rank's mini-batch: its own records (row order of ``data``) and every other
    rank's records."""

    local: LPOGroupStats
    remote: LPOGroupStats | None
    dp_size: int

    @property
    def n_global(self) -> int:
        """Responses in the whole (all-rank) mini-batch."""
        return len(self.local) + (0 if self.remote is None else len(self.remote))

    def others(self, rows: torch.Tensor) -> LPOGroupStats:
        """Records of every response of the mini-batch except ``rows`` (this rank's)."""
        keep = torch.ones(len(self.local), dtype=torch.bool, device=self.local.scores.device)
        keep[rows.to(keep.device)] = False
        mine = self.local[keep]
        return mine if self.remote is None else combine_group_stats([mine, self.remote])


_plan: contextvars.ContextVar = contextvars.ContextVar("lpo_verl_minibatch_plan", default=None)
_micro: contextvars.ContextVar = contextvars.ContextVar("lpo_verl_micro_batch", default=None)
ROW_KEY = "lpo_row"  # this rank's row index, carried through verl's micro-batching


def current_plan() -> MiniBatchPlan | None:
    return _plan.get()


def current_micro_rows() -> torch.Tensor | None:
    return _micro.get()


def uid_to_group_ids(uids) -> torch.Tensor:
    """verl's ``uid`` strings -> int64 ids that are equal on every rank (a stable hash;
    Python's ``hash`` is salted per process). 52 bits: ``all_gather_group_stats`` carries
    ids in fp64, exact below 2**53; a collision among n groups has probability ~n**2 / 2**53."""
    out = []
    for u in uids:
        digest = hashlib.blake2b(str(u).encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") & (1 << 52) - 1)
    return torch.tensor(out, dtype=torch.long)


def _padded(data, keys):
    """The named fields of a verl TensorDict as padded [B, R] tensors (they are nested
    in the v1 trainer's layout, padded in the legacy one)."""
    return data.select(*keys).to_padded_tensor()


def _uids(data):
    if "uid" not in data.keys():
        raise LPOVerlError("the LPO losses need verl's per-response 'uid' (the prompt group) in the actor's "
                           "batch; it is dropped here. verl's trainers carry it (non_tensor_batch['uid']); a "
                           "custom trainer must keep it in the batch sent to update_actor")
    uid = data["uid"]
    return uid.tolist() if hasattr(uid, "tolist") else list(uid)


REWARD_KEYS = ("token_level_rewards", "token_level_scores", "rm_scores")


def sequence_values(data, needs_rewards: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(rewards [B], advantages [B]) of the rows of ``data``: the reward is the sum of
    ``token_level_rewards`` (what verl's outcome estimators sum), the advantage the masked
    token mean of ``advantages`` (verl broadcasts a response's advantage over its tokens)."""
    keys = data.keys()
    if needs_rewards:
        key = next((k for k in REWARD_KEYS if k in keys), None)
        if key is None:
            raise LPOVerlError(f"an LPO reward target needs the rewards in the actor's batch ({' or '.join(REWARD_KEYS)}); "
                               "none is there. Use the default target='advantages' or keep the rewards in the batch")
        rewards = _padded(data, [key])[key].float().sum(-1)
        return rewards, None
    fields = _padded(data, ["advantages", "response_mask"])
    mask = fields["response_mask"].to(fields["advantages"].dtype)
    adv = (fields["advantages"] * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return None, adv


def _check_split_groups(records: LPOGroupStats, remote: LPOGroupStats | None, rollout_n, target: str):
    """Reward targets build the target from the group's rewards: a group that verl spread
    over several mini-batches (optimizer steps) would get its statistics from part of the
    group. The 'advantages' target takes verl's advantages, computed on the whole group."""
    if target == "advantages" or not isinstance(rollout_n, int) or rollout_n < 2:
        return
    allr = records if remote is None else combine_group_stats([records, remote])
    ids = allr.group_ids[allr.n_tokens > 0]
    if ids.numel() == 0:
        return
    _, counts = torch.unique(ids, return_counts=True)
    if bool((counts < rollout_n).any()):
        raise LPOVerlError(
            f"LPO target={target!r}: a group's responses are spread over several mini-batches "
            f"(found {int(counts.min())} of rollout.n={rollout_n} in one optimizer step), so its reward "
            "statistics would come from part of the group. Fix: set actor_rollout_ref.actor.ppo_mini_batch_size "
            "to the number of prompts per step (data.train_batch_size: one optimizer step per batch), or use "
            "the default LPO target 'advantages' with the matching algorithm.adv_estimator (verl computes "
            "advantages on whole groups)")


def build_plan(engine, data, options: dict, rollout_n) -> MiniBatchPlan:
    """The pre-pass over this rank's mini-batch (see the module docstring)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    from ..distributed import all_gather_group_stats

    probe = data.copy()
    tu.assign_non_tensor(probe, calculate_entropy=False, calculate_sum_pi_squared=False)
    output = engine.infer_batch(probe, loss_function=None)
    model_output = (output or {}).get("model_output", {}) if isinstance(output, dict) else {}
    if "log_probs" not in model_output:
        raise LPOVerlError(
            f"the LPO pre-pass got no log-probs from verl's {type(engine).__name__}.infer_batch on this rank (a "
            "pipeline-parallel stage other than the last?). The LPO losses are tested with "
            "actor_rollout_ref.actor.strategy=fsdp/fsdp2; use one of those")
    log_probs = no_padding_2_padding(model_output["log_probs"], data)
    fields = _padded(data, ["old_log_probs", "response_mask"])
    old, mask = fields["old_log_probs"], fields["response_mask"].bool()
    log_probs = log_probs[:, :old.shape[1]]
    group_ids = uid_to_group_ids(_uids(data)).to(old.device)
    target = options["target"]
    rewards, advantages = sequence_values(data, target != "advantages")
    local = lpo_group_stats(log_probs.float(), old.float(), mask, group_ids, rewards, advantages,
                            target=target, seq_reduce=options["seq_reduce"])
    dp_group = engine.get_data_parallel_group()
    dp_size = engine.get_data_parallel_size()
    remote = all_gather_group_stats(local, group=dp_group, exclude_self=True) if dp_size > 1 else None
    _check_split_groups(local, remote, rollout_n, target)
    return MiniBatchPlan(local=local, remote=remote, dp_size=dp_size)


def lpo_config_of(loss_function) -> Any:
    """The ActorConfig bound into verl's ``partial(ppo_loss, config=...)`` when its
    ``policy_loss.loss_mode`` is one of ours; else None."""
    from .verl import POLICY_LOSSES

    config = getattr(loss_function, "keywords", {}).get("config") if loss_function is not None else None
    if config is None:
        return None
    policy_loss = getattr(config, "policy_loss", None)
    mode = policy_loss.get("loss_mode", None) if policy_loss is not None else None
    return config if mode in POLICY_LOSSES else None


def _with_rows(loss_function):
    @functools.wraps(loss_function)
    def loss_with_rows(*args, **kwargs):
        data = kwargs.get("data")
        rows = data[ROW_KEY] if data is not None and ROW_KEY in data.keys() else None
        token = _micro.set(rows)
        try:
            return loss_function(*args, **kwargs)
        finally:
            _micro.reset(token)
    return loss_with_rows


def wrap_train_batch(train_batch):
    """``BaseEngine.train_batch`` with the LPO pre-pass (a no-op for other losses)."""
    @functools.wraps(train_batch)
    def train_batch_with_lpo_prepass(self, data, loss_function):
        config = lpo_config_of(loss_function)
        if config is None:
            return train_batch(self, data, loss_function)
        from .verl import resolved_options

        options = resolved_options(getattr(config, "loss_agg_mode", "token-mean"))
        data[ROW_KEY] = torch.arange(len(data), device=data.device)
        plan = build_plan(self, data, options, getattr(config, "rollout_n", None))
        token = _plan.set(plan)
        try:
            return train_batch(self, data, _with_rows(loss_function))
        finally:
            _plan.reset(token)

    train_batch_with_lpo_prepass.__lpo_wrapped__ = train_batch
    return train_batch_with_lpo_prepass


def install_verl_hook() -> bool:
    """Wraps verl's ``BaseEngine.train_batch`` (idempotent); False when verl is absent."""
    try:
        from verl.workers.engine.base import BaseEngine
    except ImportError:
        return False
    if not hasattr(BaseEngine.train_batch, "__lpo_wrapped__"):
        BaseEngine.train_batch = wrap_train_batch(BaseEngine.train_batch)
    return True


@contextlib.contextmanager
def minibatch_context(plan: MiniBatchPlan, rows: torch.Tensor):
    """Sets the plan and this call's rows by hand (what the hook does inside verl)."""
    t1, t2 = _plan.set(plan), _micro.set(rows)
    try:
        yield
    finally:
        _micro.reset(t2)
        _plan.reset(t1)


__all__ = ["LPOVerlError", "MiniBatchPlan", "install_verl_hook", "wrap_train_batch", "build_plan",
           "uid_to_group_ids", "sequence_values", "minibatch_context", "current_plan", "current_micro_rows"]
