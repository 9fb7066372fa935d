"""verl adapter: the registered losses called exactly as verl 0.9's actor calls them
(``verl/workers/utils/losses.py`` ``ppo_loss``: keyword arguments, padded [B, R] tensors,
token-level advantages, bool response_mask, an ActorConfig). verl itself does not install on
this machine (it pulls ray, vllm, ...), so its registry is a stand-in copied from
``verl/trainer/ppo/core_algos.py`` and the config a stand-in with ActorConfig's fields."""

import importlib
import math
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from lpo_kernels import lpo_loss
from lpo_kernels.integrations import verl as lpo_verl
from tests.utils import assert_close


@dataclass
class ActorConfigStandIn:
    """The ActorConfig fields the policy losses read (verl/workers/config/actor.py)."""
    rollout_n: int = 4
    clip_ratio: float = 0.2
    clip_ratio_low: float | None = 0.2
    clip_ratio_high: float | None = 0.28
    loss_agg_mode: str = "token-mean"
    policy_loss: dict = field(default_factory=lambda: {"loss_mode": "lpo_fwd"})
    global_batch_info: dict = field(default_factory=dict)

    def get(self, key, default=None):
        return getattr(self, key, default)


def fake_verl_registry():
    """verl.trainer.ppo.core_algos' registry, as verl defines it."""
    core_algos = types.ModuleType("verl.trainer.ppo.core_algos")
    core_algos.POLICY_LOSS_REGISTRY = {}

    def register_policy_loss(name):
        def decorator(func):
            core_algos.POLICY_LOSS_REGISTRY[name] = func
            return func
        return decorator

    def get_policy_loss_fn(name):
        if name not in core_algos.POLICY_LOSS_REGISTRY:
            raise ValueError(f"Unsupported loss mode: {name}")
        return core_algos.POLICY_LOSS_REGISTRY[name]

    core_algos.register_policy_loss = register_policy_loss
    core_algos.get_policy_loss_fn = get_policy_loss_fn
    modules = {"verl": types.ModuleType("verl"), "verl.trainer": types.ModuleType("verl.trainer"),
               "verl.trainer.ppo": types.ModuleType("verl.trainer.ppo"), "verl.trainer.ppo.core_algos": core_algos}
    return modules, core_algos


def make_batch(n_groups=3, k=4, length=7, seed=0, off_policy=0.3):
    g = torch.Generator().manual_seed(seed)
    b = n_groups * k
    old = -3.0 * torch.rand(b, length, generator=g, dtype=torch.float64)
    logp = (old + off_policy * torch.randn(b, length, generator=g, dtype=torch.float64)).requires_grad_()
    lengths = torch.randint(2, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]  # right-padded, bool like verl's
    scores = torch.rand(b, generator=g, dtype=torch.float64) * 2
    grouped = scores.view(n_groups, k)
    seq_adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)
    advantages = seq_adv[:, None] * mask  # verl broadcasts the GRPO advantage over response tokens
    return dict(old=old, logp=logp, mask=mask, scores=scores, seq_adv=seq_adv, advantages=advantages, k=k)


def call_like_verl(fn, batch, config, logp=None, rollout_is_weights=None):
    """verl/workers/utils/losses.py ppo_loss's call, verbatim in form."""
    return fn(old_log_prob=batch["old"], log_prob=batch["logp"] if logp is None else logp,
              advantages=batch["advantages"], response_mask=batch["mask"],
              loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=rollout_is_weights)


def test_registers_in_verl_registry(monkeypatch):
    modules, core_algos = fake_verl_registry()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    reloaded = importlib.reload(lpo_verl)
    try:
        assert reloaded.REGISTERED
        for name in ("lpo_fwd", "lpo_rev", "lpo_js", "lpo_alpha"):
            assert core_algos.get_policy_loss_fn(name) is reloaded.POLICY_LOSSES[name]
    finally:
        monkeypatch.undo()
        importlib.reload(lpo_verl)


def test_importable_without_verl():
    assert "verl" not in sys.modules or lpo_verl.REGISTERED
    assert set(lpo_verl.POLICY_LOSSES) == {"lpo_fwd", "lpo_rev", "lpo_js", "lpo_alpha"}


@pytest.mark.parametrize("name", ["lpo_fwd", "lpo_rev", "lpo_js", "lpo_alpha"])
def test_matches_lpo_loss_on_consecutive_groups(name):
    batch = make_batch(seed=hash(name) % 100)
    config = ActorConfigStandIn(policy_loss={"loss_mode": name})
    loss, metrics = call_like_verl(lpo_verl.POLICY_LOSSES[name], batch, config)
    (grad,) = torch.autograd.grad(loss, batch["logp"])
    logp = batch["logp"].detach().clone().requires_grad_()
    expected, stats = lpo_loss(logp, batch["old"], batch["mask"], None, None, batch["seq_adv"],
                               target="advantages", divergence=lpo_verl.LOSS_DIVERGENCES[name],
                               clip_eps_low=0.2, clip_eps_high=0.28, group_size=batch["k"], backend="torch")
    expected.backward()
    assert_close(loss, expected, atol=1e-12, rtol=1e-10, name="loss")
    assert_close(grad, logp.grad, atol=1e-14, rtol=1e-10, name="grad")
    assert expected > 0
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/lpo_divergence",
                "actor/lpo_listwise_entropy", "actor/lpo_target_entropy", "actor/lpo_mean_abs_coef"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["actor/lpo_divergence"] == pytest.approx(float(stats.divergence))
    kl = float(((batch["old"] - batch["logp"].detach()) * batch["mask"]).sum() / batch["mask"].sum())
    assert metrics["actor/ppo_kl"] == pytest.approx(kl)


def test_reverse_kl_on_policy_equals_grpo_gradient():
    """On-policy, reverse-KL LPO with verl's GRPO advantages as target has GRPO's gradient
    with seq-mean-token-mean aggregation: -A_k / (B N_k) per counted token."""
    batch = make_batch(off_policy=0.0)
    batch["old"] = batch["logp"].detach().clone()
    config = ActorConfigStandIn(policy_loss={"loss_mode": "lpo_rev"})
    loss, _ = call_like_verl(lpo_verl.compute_policy_loss_lpo_rev, batch, config)
    (grad,) = torch.autograd.grad(loss, batch["logp"])
    mask = batch["mask"].double()
    centered = batch["seq_adv"] - batch["seq_adv"].view(-1, batch["k"]).mean(1).repeat_interleave(batch["k"])
    expected = -centered[:, None] * mask / (mask.sum(-1, keepdim=True) * mask.shape[0])
    assert_close(grad, expected, atol=1e-12, rtol=1e-9, name="grad")


def test_micro_batches_with_global_batch_info_sum_to_the_mini_batch_gradient():
    batch = make_batch(n_groups=4, k=3)
    config = ActorConfigStandIn(rollout_n=3, policy_loss={"loss_mode": "lpo_fwd"})
    full, _ = call_like_verl(lpo_verl.compute_policy_loss_lpo_fwd, batch, config)
    (full_grad,) = torch.autograd.grad(full, batch["logp"])
    # verl's ppo_loss fills global_batch_info per micro-batch; two micro-batches of 2 groups.
    config.global_batch_info.update(dp_size=1, global_batch_size=12, batch_num_tokens=None)
    total = 0.0
    for rows in (slice(0, 6), slice(6, 12)):
        micro = {key: (value[rows] if torch.is_tensor(value) else value) for key, value in batch.items()}
        loss, _ = call_like_verl(lpo_verl.compute_policy_loss_lpo_fwd, micro, config, logp=batch["logp"][rows])
        total = total + loss
    (micro_grad,) = torch.autograd.grad(total, batch["logp"])
    assert_close(total, full, atol=1e-12, rtol=1e-10, name="loss")
    assert_close(micro_grad, full_grad, atol=1e-14, rtol=1e-10, name="grad")


def test_group_context_takes_shuffled_ids_and_reward_targets():
    batch = make_batch(n_groups=3, k=4, seed=5)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    shuffled = {key: (value[perm] if torch.is_tensor(value) else value) for key, value in batch.items()}
    logp = batch["logp"].detach()[perm].requires_grad_()
    group_ids = (torch.arange(12) // 4 * 7 + 100)[perm]  # sparse ids, rows in any order
    config = ActorConfigStandIn(policy_loss={"loss_mode": "lpo_fwd", "lpo_target": "rloo", "lpo_clip": "ppo"})
    with lpo_verl.lpo_group_context(group_ids, shuffled["scores"]):
        loss, _ = call_like_verl(lpo_verl.compute_policy_loss_lpo_fwd, shuffled, config, logp=logp)
    (grad,) = torch.autograd.grad(loss, logp)
    ref_logp = logp.detach().clone().requires_grad_()
    expected, _ = lpo_loss(ref_logp, shuffled["old"], shuffled["mask"], group_ids, shuffled["scores"],
                           target="rloo", clip="ppo", clip_eps_low=0.2, clip_eps_high=0.28, backend="torch")
    expected.backward()
    assert_close(loss, expected, atol=1e-12, rtol=1e-10, name="loss")
    assert_close(grad, ref_logp.grad, atol=1e-14, rtol=1e-10, name="grad")


def test_wrapped_ppo_loss_passes_group_info_from_the_micro_batch():
    seen = {}

    def ppo_loss(config, model_output, data, dp_group=None):  # stands in for verl's
        seen["info"] = lpo_verl._group_info.get()
        return "loss", {}

    wrapped = lpo_verl.wrap_ppo_loss(ppo_loss)
    ids, scores = torch.tensor([3, 3, 8, 8]), torch.tensor([0.5, 1.0, 0.0, 2.0])
    assert wrapped(None, None, {"lpo_group_ids": ids, "lpo_scores": scores}) == ("loss", {})
    assert seen["info"][0] is ids and seen["info"][1] is scores
    assert lpo_verl._group_info.get() is None
    wrapped(None, None, {"advantages": scores})
    assert seen["info"] is None


def test_add_lpo_fields_from_uid_and_token_level_scores():
    import numpy as np
    scores = torch.zeros(5, 6)
    scores[torch.arange(5), torch.tensor([2, 5, 1, 3, 0])] = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.5])
    batch = types.SimpleNamespace(non_tensor_batch={"uid": np.array(["b", "a", "b", "c", "a"], dtype=object)},
                                  batch={"token_level_scores": scores})
    lpo_verl.add_lpo_fields(batch)
    ids = batch.batch["lpo_group_ids"]
    assert ids.dtype == torch.long and ids[0] == ids[2] and ids[1] == ids[4] and len(set(ids.tolist())) == 3
    assert_close(batch.batch["lpo_scores"], torch.tensor([1.0, 0.0, 0.5, 2.0, 1.5]), atol=0, rtol=0, name="scores")


def test_bad_inputs_raise():
    batch = make_batch()
    config = ActorConfigStandIn()
    with pytest.raises(ValueError, match="rollout_is_weights"):
        call_like_verl(lpo_verl.compute_policy_loss_lpo_fwd, batch, config,
                       rollout_is_weights=torch.ones_like(batch["old"]))
    with pytest.raises(ValueError, match="rollout_n"):
        call_like_verl(lpo_verl.compute_policy_loss_lpo_fwd, batch, ActorConfigStandIn(rollout_n=None))
    with pytest.raises(ValueError, match="scores"):
        call_like_verl(lpo_verl.compute_policy_loss_lpo_fwd, batch,
                       ActorConfigStandIn(policy_loss={"lpo_target": "grpo"}))
    with pytest.raises(ValueError, match="group_size"):
        call_like_verl(lpo_verl.compute_policy_loss_lpo_fwd, batch, ActorConfigStandIn(rollout_n=5))
    with pytest.raises(ValueError, match="unknown LPO options"):
        lpo_verl.set_lpo_options(divergence="js")
    with pytest.raises(ValueError, match="tau"):
        lpo_verl.set_lpo_options(tau=-1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lpo_fwd", "lpo_rev"])
def test_cuda_triton_backend_through_verl_call(name):
    """On CUDA the adapter's default backend is Triton: fp32 CUDA loss/grad vs the fp64 reference."""
    batch = make_batch(n_groups=8, k=8, length=64, seed=11)
    cuda = {key: (value.cuda() if torch.is_tensor(value) else value) for key, value in batch.items()}
    logp = cuda["logp"].detach().float().requires_grad_()
    cuda["old"] = cuda["old"].float()
    cuda["advantages"] = cuda["advantages"].float()
    config = ActorConfigStandIn(rollout_n=8, policy_loss={"loss_mode": name})
    loss, _ = call_like_verl(lpo_verl.POLICY_LOSSES[name], cuda, config, logp=logp)
    (grad,) = torch.autograd.grad(loss, logp)
    ref_logp = batch["logp"].detach().clone().requires_grad_()
    expected, _ = lpo_loss(ref_logp, batch["old"], batch["mask"], None, None, batch["seq_adv"], target="advantages",
                           divergence=lpo_verl.LOSS_DIVERGENCES[name], clip_eps_low=0.2, clip_eps_high=0.28,
                           group_size=8, backend="torch")
    expected.backward()
    assert_close(loss, expected, atol=1e-5, rtol=1e-4, name="loss")
    assert_close(grad, ref_logp.grad, atol=1e-7, rtol=1e-4, name="grad")
