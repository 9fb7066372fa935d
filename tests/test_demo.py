"""Smoke tests of the end-to-end RLVR demo (python -m lpo_kernels.demo): the task's reward,
one training step per method, and a short run on an easy setting that must learn."""

import json
import math

import pytest
import torch

from lpo_kernels import demo

METHODS = list(demo.METHODS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_reward_checks_sum_and_format():
    task = demo.DigitSumTask(max_digits=3, max_target=18)
    eos, bos = task.eos, task.bos
    targets = torch.tensor([7, 7, 7, 7, 0, 18, 5])
    response = torch.tensor([
        [3, 4, eos, eos],   # 3 + 4 = 7
        [7, eos, eos, eos],  # 7
        [3, 3, eos, eos],   # 6: wrong sum
        [3, 4, 0, 0],       # no EOS: malformed
        [eos, eos, eos, eos],  # no digit: malformed
        [9, 9, 0, eos],     # 18
        [2, bos, 3, eos],   # a non-digit inside: malformed
    ])
    assert task.rewards(targets, response).tolist() == [1, 1, 0, 0, 0, 1, 0]
    # the mask covers the policy's choices up to and including the first EOS
    assert task.response_mask(response)[0].tolist() == [1, 1, 1, 0]
    assert task.response_mask(response)[3].tolist() == [1, 1, 1, 1]


def test_group_advantages_match_grpo_target():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = demo.group_advantages(rewards, 4)
    first = rewards[:4]
    expected = (first - first.mean()) / (first.std() + 1e-6)
    torch.testing.assert_close(adv[:4], expected)
    assert adv[4:].abs().max() == 0  # all-equal group: no signal


def test_pass_at_k_matches_combinatorics():
    n, k = 8, 3
    for c in range(n + 1):
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        got = float(demo.pass_at_k(n, torch.tensor([c]), k)[0])
        assert abs(got - expected) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_one_step_finite_loss_and_parameters_change(method):
    torch.manual_seed(0)
    task = demo.DigitSumTask(max_digits=2, max_target=6)
    model = demo.TinyCausalLM(task.vocab_size, 2 + task.response_len, dim=16, layers=1, heads=2)
    generator = torch.Generator().manual_seed(1)
    targets = torch.randint(0, task.max_target + 1, (6,), generator=generator).repeat_interleave(4)
    rollout = demo.sample(model, task, targets, generator)
    # dense random rewards, so every group has a learning signal
    rollout.rewards = torch.rand(rollout.rewards.shape, generator=generator)
    assert torch.isfinite(rollout.old_logp).all() and (rollout.old_logp <= 0).all()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # the second update is off-policy: logp != old_logp
        loss, stats = demo.policy_loss(method, model, rollout, 4, 1.0)
        assert loss.dim() == 0 and torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().max() > 0 for g in grads)
        opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(changed)


def test_short_run_learns_on_easy_setting(tmp_path):
    """One digit equal to the target (0..4): a few steps of RL must beat the warmed-up,
    untrained policy for every method, and the run writes its JSON (and PNG)."""
    cfg = demo.Config(steps=24, seeds=1, group_size=4, prompts_per_step=8, lr=5e-3,
                      warmup_steps=30, max_digits=1, max_target=4, dim=32, layers=1,
                      heads=2, eval_every=12, eval_samples=32, threshold=0.5, smooth=4)
    results = demo.run(cfg, out=str(tmp_path), verbose=False)
    for run in results["runs"]:
        assert all(math.isfinite(x) for x in run["curves"]["loss"])
        initial, final = run["evals"][0]["reward"], run["final"]["reward"]
        assert final > initial + 0.15, (run["method"], initial, final)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["summary"]) == set(cfg.methods) == set(demo.DEMO_METHODS)
    table = demo.format_table(results["summary"], cfg)
    assert all(m in table for m in cfg.methods)
    if results["plot"]:
        assert (tmp_path / "curves.png").stat().st_size > 0


def test_cli_parses_options():
    cfg, out = demo.parse_args(["--steps", "7", "--seeds", "2", "--group-size", "5",
                                "--device", "cpu", "--out", "x", "--methods", "grpo"])
    assert (cfg.steps, cfg.seeds, cfg.group_size, cfg.methods, out) == (7, 2, 5, ["grpo"], "x")
    with pytest.raises(SystemExit):
        demo.parse_args(["--group-size", "1"])
