"""verl adapter. Two layers:

- Unit tests (no verl needed): the registered losses called exactly as verl 0.9.1's
  ``ppo_loss`` calls them (keyword arguments, padded [B, R] tensors, token-level advantages,
  bool response_mask), inside the mini-batch plan the pre-pass sets, against ``lpo_loss``.
- ``test_real_verl_actor_update``: verl 0.9.1's real actor update (``tests/verl_actor_harness.py``)
  run with the python of a separate environment that has verl (``.ci/run`` builds
  ``.venv-verl``); skipped when there is none.
"""

import importlib
import json
import math
import os
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lpo_kernels import lpo_loss
from lpo_kernels.integrations import verl as lpo_verl
from lpo_kernels.integrations.verl_minibatch import LPOVerlError, uid_to_group_ids
from tests.utils import assert_close

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ActorConfigStandIn:
    """The ActorConfig fields the policy losses read (verl/workers/config/actor.py)."""
    rollout_n: int = 4
    clip_ratio: float = 0.2
    clip_ratio_low: float | None = 0.2
    clip_ratio_high: float | None = 0.28
    clip_ratio_c: float = 3.0
    loss_agg_mode: str = "seq-mean-token-mean"
    loss_scale_factor: float | None = None
    policy_loss: dict = field(default_factory=lambda: {"loss_mode": "lpo_fwd"})
    global_batch_info: dict = field(default_factory=dict)


def fake_verl_registry():
    """verl.trainer.ppo.core_algos' registry, as verl defines it."""
    core_algos = types.ModuleType("verl.trainer.ppo.core_algos")
    core_algos.POLICY_LOSS_REGISTRY = {}

    def register_policy_loss(name):
        def decorator(func):
            core_algos.POLICY_LOSS_REGISTRY[name] = func
            return func
        return decorator

    core_algos.register_policy_loss = register_policy_loss
    core_algos.get_policy_loss_fn = lambda name: core_algos.POLICY_LOSS_REGISTRY[name]
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
    rewards = torch.rand(b, generator=g, dtype=torch.float64) * 2
    grouped = rewards.view(n_groups, k)
    seq_adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)
    advantages = seq_adv[:, None] * mask  # verl broadcasts the GRPO advantage over response tokens
    perm = torch.randperm(b, generator=g)  # rows in any order, as verl's balancing leaves them
    group_ids = (torch.arange(b) // k * 7 + 100)
    batch = dict(old=old, logp=logp.detach(), mask=mask, rewards=rewards, seq_adv=seq_adv, advantages=advantages,
                 group_ids=group_ids)
    batch = {key: value[perm] for key, value in batch.items()}
    batch["logp"] = batch["logp"].clone().requires_grad_()
    return batch


def call_like_verl(fn, batch, config, rows=slice(None), rollout_is_weights=None):
    """verl/workers/utils/losses.py ppo_loss's call, verbatim in form, on rows ``rows``."""
    return fn(old_log_prob=batch["old"][rows], log_prob=batch["logp"][rows],
              advantages=batch["advantages"][rows], response_mask=batch["mask"][rows],
              loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=rollout_is_weights)


def plan_for(batch, rows, target="advantages", dp_size=1):
    return lpo_verl.lpo_minibatch(batch["group_ids"], batch["logp"], batch["old"], batch["mask"],
                                  batch["rewards"] if target != "advantages" else None,
                                  batch["advantages"] if target == "advantages" else None,
                                  rows=rows, target=target, dp_size=dp_size)


def expected_loss(batch, name, target="advantages", clip="clamp"):
    logp = batch["logp"].detach().clone().requires_grad_()
    loss, stats = lpo_loss(logp, batch["old"], batch["mask"], batch["group_ids"],
                           batch["rewards"] if target != "advantages" else None,
                           batch["seq_adv"] if target == "advantages" else None, target=target,
                           divergence=lpo_verl.LOSS_DIVERGENCES[name], clip=clip, clip_eps_low=0.2,
                           clip_eps_high=0.28, backend="torch")
    loss.backward()
    return loss, logp.grad, stats


@pytest.fixture(autouse=True)
def clean_options(monkeypatch):
    monkeypatch.delenv(lpo_verl.ENV_OPTIONS, raising=False)
    lpo_verl.reset_lpo_options()
    yield
    lpo_verl.reset_lpo_options()


def test_registers_in_verl_registry(monkeypatch):
    modules, core_algos = fake_verl_registry()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    reloaded = importlib.reload(lpo_verl)
    try:
        assert reloaded.REGISTERED and not reloaded.HOOKED  # no verl engine to hook here
        for name in ("lpo_fwd", "lpo_rev", "lpo_js", "lpo_alpha"):
            assert core_algos.get_policy_loss_fn(name) is reloaded.POLICY_LOSSES[name]
    finally:
        monkeypatch.undo()
        importlib.reload(lpo_verl)


def test_importable_without_verl():
    assert "verl" not in sys.modules or lpo_verl.REGISTERED
    assert set(lpo_verl.POLICY_LOSSES) == {"lpo_fwd", "lpo_rev", "lpo_js", "lpo_alpha"}


@pytest.mark.parametrize("name", ["lpo_fwd", "lpo_rev", "lpo_js", "lpo_alpha"])
def test_micro_batches_in_any_order_sum_to_the_whole_batch_gradient(name):
    """Rows shuffled, groups cut across three uneven micro-batches: the summed micro-batch
    gradients and reported losses are those of whole-batch lpo_loss."""
    batch = make_batch(seed=len(name))
    config = ActorConfigStandIn(policy_loss={"loss_mode": name})
    total, metrics_seen = 0.0, []
    for rows in (torch.arange(0, 5), torch.arange(5, 7), torch.arange(7, 12)):
        with plan_for(batch, rows):
            loss, metrics = call_like_verl(lpo_verl.POLICY_LOSSES[name], batch, config, rows=rows)
        total = total + loss
        metrics_seen.append(metrics)
    (grad,) = torch.autograd.grad(total, batch["logp"])
    expected, expected_grad, stats = expected_loss(batch, name)
    assert expected > 0
    assert_close(total, expected, atol=1e-12, rtol=1e-10, name="loss")
    assert_close(grad, expected_grad, atol=1e-14, rtol=1e-10, name="grad")
    for metrics in metrics_seen:
        for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/lpo_divergence"):
            assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
        assert metrics["actor/lpo_divergence"] == pytest.approx(float(stats.divergence))


def test_reward_target_from_rewards_and_data_parallel_scaling():
    """target=rloo from the rewards; dp_size=2: the gradient is doubled (verl's data-parallel
    average halves it) and each call reports its share of the loss times dp_size."""
    batch = make_batch(seed=3)
    lpo_verl.set_lpo_options(target="rloo", clip="ppo")
    config = ActorConfigStandIn()
    rows = torch.arange(0, 6)
    with plan_for(batch, rows, target="rloo", dp_size=2):
        loss, _ = call_like_verl(lpo_verl.compute_policy_loss_lpo_fwd, batch, config, rows=rows)
    (grad,) = torch.autograd.grad(loss, batch["logp"])
    expected, expected_grad, _ = expected_loss(batch, "lpo_fwd", target="rloo", clip="ppo")
    assert_close(loss, expected * 2 * 6 / 12, atol=1e-12, rtol=1e-10, name="loss share")
    assert_close(grad[:6], 2 * expected_grad[:6], atol=1e-14, rtol=1e-10, name="grad")
    assert float(grad[6:].abs().max()) == 0.0


def test_reverse_kl_on_policy_equals_grpo_gradient():
    """On-policy, reverse-KL LPO with verl's GRPO advantages as target has GRPO's gradient
    with seq-mean-token-mean aggregation: -A_k / (B N_k) per counted token."""
    batch = make_batch(off_policy=0.0)
    batch["old"] = batch["logp"].detach().clone()
    config = ActorConfigStandIn(policy_loss={"loss_mode": "lpo_rev"})
    with plan_for(batch, torch.arange(12)):
        loss, _ = call_like_verl(lpo_verl.compute_policy_loss_lpo_rev, batch, config)
    (grad,) = torch.autograd.grad(loss, batch["logp"])
    mask = batch["mask"].double()
    ids = batch["group_ids"]
    group_mean = torch.stack([batch["seq_adv"][ids == g].mean() for g in ids])
    expected = -(batch["seq_adv"] - group_mean)[:, None] * mask / (mask.sum(-1, keepdim=True) * mask.shape[0])
    assert_close(grad, expected, atol=1e-12, rtol=1e-9, name="grad")


def test_rollout_is_weights_scale_each_tokens_gradient():
    batch = make_batch(seed=4)
    weights = torch.rand(batch["old"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    config = ActorConfigStandIn()
    with plan_for(batch, torch.arange(12)):
        loss, _ = call_like_verl(lpo_verl.compute_policy_loss_lpo_fwd, batch, config, rollout_is_weights=weights)
    (grad,) = torch.autograd.grad(loss, batch["logp"])
    expected, expected_grad, _ = expected_loss(batch, "lpo_fwd")
    assert_close(loss, expected, atol=1e-12, rtol=1e-10, name="loss (weights leave the value alone)")
    assert_close(grad, weights * expected_grad, atol=1e-14, rtol=1e-10, name="grad")


def test_dual_clip_zeroes_pushed_down_tokens_above_clip_ratio_c():
    batch = make_batch(seed=5, off_policy=0.5)
    lpo_verl.set_lpo_options(clip="none")
    config = ActorConfigStandIn(clip_ratio_c=1.1)
    with plan_for(batch, torch.arange(12)):
        loss, metrics = call_like_verl(lpo_verl.compute_policy_loss_lpo_fwd, batch, config)
    (grad,) = torch.autograd.grad(loss, batch["logp"])
    _, base, _ = expected_loss(batch, "lpo_fwd", clip="none")
    dual = batch["mask"] & (base > 0) & ((batch["logp"].detach() - batch["old"]) > math.log(1.1))
    assert int(dual.sum()) > 0 and int((batch["mask"] & ~dual & (base != 0)).sum()) > 0
    assert_close(grad, torch.where(dual, torch.zeros_like(base), base), atol=1e-14, rtol=1e-10, name="grad")
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(float(dual.sum() / batch["mask"].sum()))


def test_options_from_the_environment(monkeypatch):
    monkeypatch.setenv(lpo_verl.ENV_OPTIONS, "target=rloo, tau=0.5,clip=ppo")
    options = lpo_verl.resolved_options("seq-mean-token-sum")
    assert options["target"] == "rloo" and options["tau"] == 0.5 and options["clip"] == "ppo"
    assert options["seq_reduce"] == "sum"
    lpo_verl.set_lpo_options(target="grpo")  # the external_lib route wins over the environment
    assert lpo_verl.resolved_options("seq-mean-token-mean")["target"] == "grpo"


def test_uid_hash_is_stable_and_exact_in_fp64():
    ids = uid_to_group_ids(["a", "b", "a", "prompt-7"])
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert bool((ids < 2 ** 52).all()) and bool((ids.double().long() == ids).all())
    assert torch.equal(ids, uid_to_group_ids(["a", "b", "a", "prompt-7"]))


def test_refused_settings_raise_named_errors(monkeypatch):
    batch = make_batch()
    fn = lpo_verl.compute_policy_loss_lpo_fwd
    with pytest.raises(LPOVerlError, match="external_lib=lpo_kernels.integrations.verl"):
        call_like_verl(fn, batch, ActorConfigStandIn())  # no pre-pass: refused, not guessed
    with plan_for(batch, torch.arange(12)):
        with pytest.raises(LPOVerlError, match="loss_agg_mode=seq-mean-token-mean"):
            call_like_verl(fn, batch, ActorConfigStandIn(loss_agg_mode="token-mean"))
        with pytest.raises(LPOVerlError, match="loss_scale_factor"):
            call_like_verl(fn, batch, ActorConfigStandIn(loss_scale_factor=1.0))
        with pytest.raises(LPOVerlError, match="clip_ratio_c"):
            call_like_verl(fn, batch, ActorConfigStandIn(clip_ratio_c=0.9))
        with pytest.raises(ValueError, match="rollout_is_weights"):
            call_like_verl(fn, batch, ActorConfigStandIn(), rollout_is_weights=torch.ones(3))
    with pytest.raises(ValueError, match="unknown LPO options"):
        lpo_verl.set_lpo_options(divergence="js")
    with pytest.raises(ValueError, match="tau"):
        lpo_verl.set_lpo_options(tau=-1.0)
    monkeypatch.setenv(lpo_verl.ENV_OPTIONS, "target")
    with pytest.raises(ValueError, match="LPO_VERL_OPTIONS"):
        lpo_verl.resolved_options("seq-mean-token-mean")


# -- verl's real actor update (separate environment with verl 0.9.1) ---------------------------
def verl_python():
    """The python of an environment with verl: $LPO_VERL_PYTHON, else .ci/run's .venv-verl."""
    for candidate in (os.environ.get("LPO_VERL_PYTHON"), REPO / ".venv-verl" / "bin" / "python"):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([str(candidate), "-c", "import verl, tensordict"], capture_output=True)
            if probe.returncode == 0:
                return str(candidate)
    return None


def run_harness(python, tmp_path, *args, timeout=600):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([python, str(REPO / "tests" / "verl_actor_harness.py"), *args, "--out", str(out),
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"verl harness {args} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def verl_env():
    python = verl_python()
    if python is None:
        pytest.skip("no environment with verl 0.9.1 (.ci/run builds .venv-verl; or set LPO_VERL_PYTHON)")
    return python


def test_real_verl_actor_update_single_process(verl_env, tmp_path):
    """verl 0.9.1's ActorRolloutRefWorker.update_actor on CPU: the parameter update (SGD,
    lr=1) equals minus the gradient of whole-mini-batch lpo_loss, with verl's balancing, its
    dynamic batch size, fixed micro-batches of 2 rows, shuffled rows, a reward target (rloo),
    the default v1 trainer's path, and two optimizer steps per batch (checked step by step);
    the calls really held partial groups. Refused settings raise LPOVerlError."""
    results = run_harness(verl_env, tmp_path, "all")
    readme = results["readme_config"]  # the README's command line is valid verl 0.9.1 config
    assert readme["adv_estimator"] == "grpo" and readme["loss_mode"] == "lpo_fwd", readme
    assert readme["loss_agg_mode"] == "seq-mean-token-mean", readme
    assert readme["external_lib"] == "lpo_kernels.integrations.verl" and readme["options"], readme
    for case in ("defaults", "micro", "shuffled", "rloo", "v1"):
        r = results[case]
        assert r["rel_err"] < 1e-5, (case, r)
        assert r["grad_norm"] > 1e-3, (case, r)
        assert r["calls"] >= 2 and r["partial_group_calls"] >= 1, (case, r)
        assert r["metrics"]["actor/pg_loss"] == pytest.approx(r["ref_loss"], rel=1e-5), (case, r)
    two = results["two_steps"]  # two optimizer steps, every group straddling them
    assert two["steps"] == 2 and two["groups_in_both_steps"] >= 1 and two["rel_err"] < 1e-5, two
    assert results["error_split"]["error"] == "LPOVerlError"
    assert "ppo_mini_batch_size" in results["error_split"]["message"]
    assert results["error_agg"]["error"] == "LPOVerlError"
    assert "loss_agg_mode" in results["error_agg"]["message"]


def test_real_verl_actor_update_two_ranks(verl_env, tmp_path):
    """dp=2 (gloo, two processes): groups split across ranks are finished with the records
    all-gathered from the other rank."""
    r = run_harness(verl_env, tmp_path, "defaults", "--world", "2")
    assert r["rel_err"] < 1e-5 and r["grad_norm"] > 1e-3, r
    assert r["groups_across_ranks"] >= 1 and r["partial_group_calls"] >= 1, r
