"""The GRPO baseline (reference.grpo_forward via grpo_loss) against an independent
transcription of TRL GRPOTrainer's ``_compute_loss`` (spec section 5)."""

from __future__ import annotations

import pytest
import torch

from lpo_kernels import GRPOLoss, grpo_loss
from lpo_kernels.reference import naive_linear_grpo_loss, naive_linear_logprobs
from tests.utils import assert_close

F64 = torch.float64
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def trl_compute_loss(per_token_logps, old_per_token_logps, completion_mask, advantages, *,
                     loss_type, epsilon_low, epsilon_high, beta=0.0, ref_per_token_logps=None,
                     max_completion_length=None):
    """TRL GRPOTrainer._compute_loss, line by line (single process: dapo's global token
    count is the local one). Returns (loss, metrics)."""
    if beta != 0.0:
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                        - (ref_per_token_logps - per_token_logps) - 1)
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    mask = completion_mask.to(per_token_loss.dtype)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "dapo":
        num_items_in_batch = mask.sum()
        loss = (per_token_loss * mask).sum() / num_items_in_batch
    else:
        raise ValueError(loss_type)
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    is_region_clipped = is_low_clipped | is_high_clipped
    metrics = {
        "clip_ratio/low_mean": (is_low_clipped * mask).sum() / mask.sum(),
        "clip_ratio/high_mean": (is_high_clipped * mask).sum() / mask.sum(),
        "clip_ratio/region_mean": (is_region_clipped * mask).sum() / mask.sum(),
    }
    if beta != 0.0:
        metrics["kl"] = (per_token_kl * mask).sum() / mask.sum()
    return loss, metrics


def grpo_case(B=6, T=7, seed=0, dtype=F64, token_advantages=False, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    adv = torch.randn((B, T) if token_advantages else (B,), generator=g, dtype=F64)
    return dict(logp=logp.to(dtype), old_logp=old.to(dtype), mask=mask, advantages=adv.to(dtype),
                ref_logp=ref.to(dtype))


def both(case, *, loss_type, eps_low, eps_high, beta=0.0, with_ref=True, mcl=None, on_policy=False):
    old = None if on_policy else case["old_logp"]
    ref = case["ref_logp"] if with_ref else None
    logp = case["logp"].clone().requires_grad_()
    loss, stats = grpo_loss(logp, old, case["mask"], case["advantages"], loss_type=loss_type,
                            clip_eps_low=eps_low, clip_eps_high=eps_high, beta=beta, ref_logp=ref,
                            max_completion_length=mcl)
    (grad,) = torch.autograd.grad(loss, logp)
    logp_trl = case["logp"].clone().requires_grad_()
    want, metrics = trl_compute_loss(
        logp_trl, old, case["mask"], case["advantages"], loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, beta=beta, ref_per_token_logps=ref,
        max_completion_length=mcl or case["logp"].shape[-1])
    (want_grad,) = torch.autograd.grad(want, logp_trl)
    return (loss, stats, grad), (want, metrics, want_grad)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_matches_trl(loss_type, eps_low, eps_high, beta):
    for seed, token_adv in ((0, False), (1, True)):
        case = grpo_case(seed=seed, token_advantages=token_adv)
        mcl = 9 if loss_type == "dr_grpo" else None
        (loss, stats, grad), (want, metrics, want_grad) = both(
            case, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, beta=beta, mcl=mcl)
        name = f"{loss_type}/{eps_low}/{eps_high}/{beta}"
        assert_close(loss, want, atol=1e-14, rtol=1e-12, name=name + " loss")
        assert_close(grad, want_grad, atol=1e-14, rtol=1e-12, name=name + " grad")
        assert_close(stats.clip_fraction_low, metrics["clip_ratio/low_mean"], atol=1e-15, rtol=0, name="low")
        assert_close(stats.clip_fraction_high, metrics["clip_ratio/high_mean"], atol=1e-15, rtol=0, name="high")
        assert_close(stats.clip_fraction, metrics["clip_ratio/region_mean"], atol=1e-15, rtol=0, name="region")
        if beta:
            assert_close(stats.kl, metrics["kl"], atol=1e-14, rtol=1e-12, name="kl")
        assert int(stats.n_tokens) == int(case["mask"].sum())
        assert int(stats.n_seqs) == case["logp"].shape[0]


def test_grpo_clipping_is_exercised():
    case = grpo_case(seed=2, spread=0.6)
    (_, stats, grad), _ = both(case, loss_type="bnpo", eps_low=0.2, eps_high=0.28)
    assert 0 < float(stats.clip_fraction_low) and 0 < float(stats.clip_fraction_high)
    assert float(stats.clip_fraction) < 1
    # clipped tokens get no gradient (beta = 0)
    ratio = (case["logp"] - case["old_logp"]).exp()
    adv = case["advantages"][:, None]
    clipped = ((ratio < 0.8) & (adv < 0)) | ((ratio > 1.28) & (adv > 0))
    assert torch.all(grad[clipped & case["mask"]] == 0)
    assert torch.all(grad[~case["mask"]] == 0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_on_policy(loss_type):
    """old_logp=None: ratio = 1, gradient = -A * (aggregation weight), no clipping."""
    case = grpo_case(seed=3)
    (loss, stats, grad), (want, _, want_grad) = both(case, loss_type=loss_type, eps_low=0.2,
                                                     eps_high=0.2, on_policy=True)
    assert_close(loss, want, atol=1e-14, rtol=1e-12, name="loss")
    assert_close(grad, want_grad, atol=1e-14, rtol=1e-12, name="grad")
    assert float(stats.clip_fraction) == 0.0
    m = case["mask"].double()
    if loss_type == "grpo":
        expected = -case["advantages"][:, None] * m / m.sum(-1, keepdim=True) / m.shape[0]
        assert_close(grad, expected, atol=1e-15, rtol=1e-12, name="-A/(|o| B)")


def test_dapo_equals_bnpo_on_one_process_and_dr_grpo_default_length():
    case = grpo_case(seed=4)
    (dapo, _, _), _ = both(case, loss_type="dapo", eps_low=0.2, eps_high=0.28)
    (bnpo, _, _), _ = both(case, loss_type="bnpo", eps_low=0.2, eps_high=0.28)
    assert_close(dapo, bnpo, atol=0, rtol=0, name="dapo = bnpo")
    (dr, _, _), (want, _, _) = both(case, loss_type="dr_grpo", eps_low=0.2, eps_high=0.2)
    assert_close(dr, want, atol=1e-15, rtol=1e-12, name="dr_grpo with max_completion_length = T")


def test_grpo_masked_padding_values_never_leak():
    """Huge or non-finite values at padding positions do not reach loss or gradient."""
    case = grpo_case(seed=5)
    pad = ~case["mask"]
    assert pad.any()
    (loss, _, grad), _ = both(case, loss_type="grpo", eps_low=0.2, eps_high=0.2, beta=0.1)
    poisoned = dict(case)
    poisoned["old_logp"] = case["old_logp"].masked_fill(pad, -1e30)
    poisoned["ref_logp"] = case["ref_logp"].masked_fill(pad, 1e30)
    (loss2, stats2, grad2), _ = both(poisoned, loss_type="grpo", eps_low=0.2, eps_high=0.2, beta=0.1)
    assert_close(loss2, loss, atol=0, rtol=0, name="loss")
    assert_close(grad2, grad, atol=0, rtol=0, name="grad")
    assert torch.isfinite(stats2.kl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grpo_low_precision(dtype):
    case = grpo_case(seed=6)
    low = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.items()}
    (loss, _, grad), _ = both(low, loss_type="bnpo", eps_low=0.2, eps_high=0.2, beta=0.04)
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()
    up = {k: v.double() if v.is_floating_point() else v for k, v in low.items()}
    (loss64, _, grad64), _ = both(up, loss_type="bnpo", eps_low=0.2, eps_high=0.2, beta=0.04)
    assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="loss vs fp64 of the same values")
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close(grad.double(), grad64, atol=tol * float(grad64.abs().max()), rtol=tol, name="grad")


def test_grpo_module_equals_function():
    case = grpo_case(seed=7)
    module = GRPOLoss(loss_type="dr_grpo", clip_eps_high=0.28, beta=0.04, max_completion_length=10)
    loss, stats = module(case["logp"], case["old_logp"], case["mask"], case["advantages"],
                         ref_logp=case["ref_logp"])
    want, want_stats = grpo_loss(case["logp"], case["old_logp"], case["mask"], case["advantages"],
                                 loss_type="dr_grpo", clip_eps_high=0.28, beta=0.04,
                                 ref_logp=case["ref_logp"], max_completion_length=10)
    assert torch.equal(loss, want) and stats.to_dict() == want_stats.to_dict()


def test_naive_linear_grpo_loss():
    g = torch.Generator().manual_seed(8)
    B, T, H, V = 3, 4, 8, 11
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    adv = torch.randn(B, generator=g, dtype=F64)
    loss, _ = naive_linear_grpo_loss(hidden, weight, ids, mask, adv, temperature=0.9,
                                     loss_type="bnpo")
    logp = naive_linear_logprobs(hidden, weight, ids, temperature=0.9)
    want, _ = grpo_loss(logp, None, mask, adv, loss_type="bnpo")
    assert_close(loss, want, atol=0, rtol=0, name="naive head + grpo_loss")
