"""The GRPO family (lpo_kernels/grpo.py, fused_grpo.py): properties that need no TRL, the
fused head against ``grpo_loss`` on the naive head for every loss type and option, and the
regressions of issue 13 items 3 (fp32 exp overflow -> NaN) and 4 (B = 0 / T = 0 -> NaN).
Parity with TRL's real ``_compute_loss`` is tests/test_trl_loss_parity.py."""

from __future__ import annotations

import pytest
import torch

from lpo_kernels import GRPOLoss, GRPOOptions, fused_linear_grpo_loss, grpo_loss
from lpo_kernels.grpo import GRPO_LOSS_TYPES, grpo_options, naive_linear_grpo_loss
from lpo_kernels.reference import naive_linear_logprobs
from tests.utils import assert_close

F64, F32 = torch.float64, torch.float32
MCL = 10


def grpo_case(B=6, T=7, seed=0, dtype=F64, token_advantages=False, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=g) if T else torch.zeros(B, dtype=torch.long)
    mask = torch.arange(T)[None] < lengths[:, None]
    adv = torch.randn((B, T) if token_advantages else (B,), generator=g, dtype=F64)
    entropy = torch.rand(B, T, generator=g, dtype=F64) * 2
    return dict(logp=logp.to(dtype), old_logp=old.to(dtype), mask=mask, advantages=adv.to(dtype),
                ref_logp=ref.to(dtype), entropy=entropy.to(dtype))


def run(case, **options):
    logp = case["logp"].clone().requires_grad_()
    entropy = case["entropy"].clone().requires_grad_()
    loss, stats = grpo_loss(logp, case["old_logp"], case["mask"], case["advantages"],
                            ref_logp=case["ref_logp"], entropy=entropy, **options)
    grads = torch.autograd.grad(loss, [logp, entropy], allow_unused=True)
    return loss.detach(), stats, grads[0], grads[1]


# --------------------------------------------------------------------------- properties
def test_default_loss_type_is_dapo_and_old_names_still_work():
    assert GRPOOptions().loss_type == "dapo"
    case = grpo_case(seed=1)
    new = run(case, loss_type="bnpo", epsilon=0.1, epsilon_high=0.3)
    old = run(case, loss_type="bnpo", clip_eps_low=0.1, clip_eps_high=0.3)
    assert torch.equal(new[0], old[0]) and torch.equal(new[2], old[2])
    assert GRPOOptions(epsilon=0.1).clip_eps_low == 0.1 and GRPOOptions(epsilon=0.1).epsilon_high == 0.1
    with pytest.raises(ValueError, match="epsilon"):
        grpo_options(epsilon=0.1, clip_eps_low=0.1)


def test_clipped_tokens_get_no_gradient():
    case = grpo_case(seed=2, spread=0.6)
    _, stats, grad, _ = run(case, loss_type="bnpo", epsilon=0.2, epsilon_high=0.28)
    assert 0 < float(stats.clip_fraction_low) and 0 < float(stats.clip_fraction_high)
    ratio = (case["logp"] - case["old_logp"]).exp()
    adv = case["advantages"][:, None]
    clipped = ((ratio < 0.8) & (adv < 0)) | ((ratio > 1.28) & (adv > 0))
    assert torch.all(grad[clipped & case["mask"]] == 0)
    assert torch.all(grad[~case["mask"]] == 0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo", "luspo"])
def test_on_policy_gradient_is_minus_advantage_over_normaliser(loss_type):
    case = grpo_case(seed=3)
    case["old_logp"] = None
    _, stats, grad, _ = run(case, loss_type=loss_type, max_completion_length=MCL)
    assert float(stats.clip_fraction) == 0.0
    m = case["mask"].double()
    B = m.shape[0]
    norm = {"grpo": m.sum(-1, keepdim=True) * B, "bnpo": m.sum(), "dapo": m.sum(),
            "dr_grpo": torch.tensor(B * MCL, dtype=F64), "luspo": torch.tensor(B, dtype=F64)}[loss_type]
    assert_close(grad, -case["advantages"][:, None] * m / norm, atol=1e-15, rtol=1e-12, name="-A/norm")


def test_delta_bounds_the_ratio_of_negative_advantages():
    case = grpo_case(seed=4, spread=1.5)
    case["advantages"] = -case["advantages"].abs()
    _, _, free, _ = run(case, loss_type="bnpo")
    _, _, bounded, _ = run(case, loss_type="bnpo", delta=1.5)
    ratio = (case["logp"] - case["old_logp"]).exp()
    beyond = case["mask"] & (ratio > 1.5)
    assert beyond.any()
    assert torch.all(bounded[beyond] == 0) and torch.all(free[beyond] != 0)


def test_masked_values_never_leak():
    case = grpo_case(seed=5)
    pad = ~case["mask"]
    opts = dict(loss_type="grpo", beta=0.1, entropy_coef=0.1, top_entropy_quantile=0.5,
                off_policy_mask_threshold=0.1, importance_sampling_level="sequence")
    want = run(case, **opts)
    poisoned = dict(case, old_logp=case["old_logp"].masked_fill(pad, -1e30),
                    ref_logp=case["ref_logp"].masked_fill(pad, float("nan")),
                    logp=case["logp"].masked_fill(pad, float("inf")))
    got = run(poisoned, **opts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    assert torch.isfinite(got[1].kl)


def test_entropy_bonus_gradient_and_entropy_mask():
    case = grpo_case(seed=6)
    _, stats, _, g_ent = run(case, loss_type="dapo", entropy_coef=0.1, top_entropy_quantile=0.25)
    kept = g_ent != 0
    m = case["mask"]
    assert torch.all(~kept[~m])
    assert 0 < int(kept.sum()) < int(m.sum())
    assert torch.all(case["entropy"][kept].min() >= case["entropy"][m & ~kept].max())
    assert_close(g_ent[kept], torch.full_like(g_ent[kept], -0.1 / int(kept.sum())), atol=1e-16, rtol=1e-12,
                 name="d loss / d entropy = -coef / tokens")
    assert float(stats.policy_loss) != 0.0


def test_module_equals_function():
    case = grpo_case(seed=7)
    module = GRPOLoss(loss_type="dr_grpo", epsilon_high=0.28, beta=0.04, max_completion_length=10)
    loss, stats = module(case["logp"], case["old_logp"], case["mask"], case["advantages"],
                         ref_logp=case["ref_logp"])
    want, want_stats = grpo_loss(case["logp"], case["old_logp"], case["mask"], case["advantages"],
                                 loss_type="dr_grpo", epsilon_high=0.28, beta=0.04,
                                 ref_logp=case["ref_logp"], max_completion_length=10)
    assert torch.equal(loss, want) and stats.to_dict() == want_stats.to_dict()


@pytest.mark.parametrize("bad,match", [
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(delta=0.0), "delta"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (dict(sapo_temperature_pos=1e-40), "sapo_temperature_pos"),
    (dict(off_policy_mask_threshold=float("nan")), "off_policy_mask_threshold"),
    (dict(epsilon=1.5), "epsilon"),
    (dict(use_bias_correction_kl=1), "use_bias_correction_kl"),
])
def test_bad_options_are_named(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        grpo_options(**bad)
    with pytest.raises(TypeError, match="unknown GRPO option"):
        grpo_options(temperature=1.0)


def test_bad_tensors_are_named():
    case = grpo_case(seed=8)
    args = (case["logp"], case["old_logp"], case["mask"], case["advantages"])
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(*args, top_entropy_quantile=0.5)
    with pytest.raises(ValueError, match="importance_sampling_ratio"):
        grpo_loss(*args, importance_sampling_ratio=torch.ones(6, 3, dtype=F64))
    with pytest.raises(ValueError, match="sampling_logp"):
        grpo_loss(*args, sampling_logp=case["logp"][:, 1:])
    with pytest.raises(TypeError, match="num_items_in_batch"):
        grpo_loss(*args, num_items_in_batch="7")
    counted = case["mask"].nonzero()[0].tolist()
    for name in ("old_logp", "ref_logp", "advantages"):
        bad = dict(case)
        bad[name] = case[name].clone()
        bad[name][tuple(counted[: bad[name].dim()])] = float("nan")
        with pytest.raises(ValueError, match=name):  # validate=None checks CPU tensors
            grpo_loss(bad["logp"], bad["old_logp"], bad["mask"], bad["advantages"], ref_logp=bad["ref_logp"])
        grpo_loss(bad["logp"], bad["old_logp"], bad["mask"], bad["advantages"], ref_logp=bad["ref_logp"],
                  validate=False)  # the check is the only thing that looks
    with pytest.raises(ValueError, match="importance_sampling_ratio"):
        grpo_loss(*args, importance_sampling_ratio=-torch.ones(6, 1, dtype=F64))


# --------------------------------------------------------------------------- fused head
HEAD_OPTIONS = [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
    dict(loss_type="dr_grpo", max_completion_length=MCL, delta=1.3, beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="luspo", importance_sampling_level="sequence", off_policy_mask_threshold=0.0),
    dict(loss_type="cispo", epsilon_high=1.1, top_entropy_quantile=0.4),
    dict(loss_type="sapo", entropy_coef=0.05),
    dict(loss_type="vespo", entropy_coef=0.05, top_entropy_quantile=0.5),
    dict(loss_type="bnpo", epsilon_high=0.28),
]


def head_case(seed=0, B=5, T=6, H=8, V=13, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64) * 0.5
    bias = torch.randn(V, generator=g, dtype=F64) * 0.2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    with torch.no_grad():
        logp = naive_linear_logprobs(hidden, weight, ids, bias=bias, temperature=0.8)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=bias.to(dtype), ids=ids, mask=mask,
                adv=torch.randn(B, generator=g, dtype=dtype), old=old.to(dtype),
                ref=(logp + 0.2 * torch.randn(B, T, generator=g, dtype=F64)).to(dtype))


HEAD_CASES = [(i, c, None) for i in range(len(HEAD_OPTIONS)) for c in (1, 12, 1000)] + [
    (i, 12, (3.0, 1.7)) for i in (0, 4, 5, 6)]  # + soft-capped, scaled logits (Gemma-2 style)


@pytest.mark.parametrize("index,chunk_tokens,cap", HEAD_CASES)
def test_fused_head_matches_naive_head(index, chunk_tokens, cap):
    options = dict(HEAD_OPTIONS[index])
    if cap is not None:
        options.update(softcap=cap[0], logit_scale=cap[1])
    c = head_case(seed=index)
    p = {k: c[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    q = {k: c[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    ids = c["ids"].masked_fill(~c["mask"], -100)
    l1, s1 = fused_linear_grpo_loss(p["hidden"], p["weight"], ids, c["mask"], c["adv"], bias=p["bias"],
                                    temperature=0.8, old_logp=c["old"], ref_logp=c["ref"],
                                    chunk_tokens=chunk_tokens, **options)
    l2, s2 = naive_linear_grpo_loss(q["hidden"], q["weight"], c["ids"], c["mask"], c["adv"], bias=q["bias"],
                                    temperature=0.8, old_logp=c["old"], ref_logp=c["ref"], **options)
    l1.backward()
    l2.backward()
    assert_close(l1, l2, atol=1e-14, rtol=1e-12, name="loss")
    assert_close(s1.clip_fraction, s2.clip_fraction, atol=1e-15, rtol=0, name="clip")
    for name in ("hidden", "weight", "bias"):
        assert_close(p[name].grad, q[name].grad, atol=1e-13 * float(q[name].grad.abs().max()), rtol=1e-11,
                     name=name)


def test_fused_head_triton_entropy_bonus_fp32():
    c = head_case(seed=9, dtype=F32)
    c64 = {k: v.double() if v.is_floating_point() else v for k, v in c.items()}
    grads = {}
    for name, case, backend in (("triton", c, "triton"), ("fp64", c64, "torch")):
        leaves = {k: case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
        loss, _ = fused_linear_grpo_loss(leaves["hidden"], leaves["weight"], case["ids"], case["mask"], case["adv"],
                                         bias=leaves["bias"], temperature=0.8, old_logp=case["old"],
                                         backend=backend, chunk_tokens=12, loss_type="dapo", entropy_coef=0.1,
                                         top_entropy_quantile=0.6)
        loss.backward()
        grads[name] = (loss.detach(), leaves["weight"].grad)
    assert_close(grads["triton"][0], grads["fp64"][0], atol=1e-6, rtol=1e-5, name="loss")
    assert_close(grads["triton"][1], grads["fp64"][1], atol=1e-6 * float(grads["fp64"][1].abs().max()),
                 rtol=1e-4, name="grad weight")


# --------------------------------------------------------------------------- issue 13.3
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fp32_log_ratio_overflow_is_finite(loss_type, level):
    """exp(log_ratio) with log_ratio > 88.7 overflows fp32: TRL gives NaN loss for A = 0 and
    NaN gradient for A > 0. Here loss and gradient stay finite."""
    logp = torch.full((3, 4), -1.0, dtype=F32)
    old = logp.clone()
    old[:, 1] = -101.0                            # log-ratio 100 on one token of each row
    adv = torch.tensor([0.0, 1.0, -0.5], dtype=F32)
    mask = torch.ones(3, 4, dtype=torch.bool)
    ref = logp.clone()
    ref[:, 2] = 99.0                              # k3 KL overflows as well
    leaf = logp.clone().requires_grad_()
    loss, stats = grpo_loss(leaf, old, mask, adv, ref_logp=ref, beta=0.01, loss_type=loss_type,
                            importance_sampling_level=level, max_completion_length=4)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, grad)
    assert torch.isfinite(stats.kl)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_large_but_finite_ratio_is_trls_value(loss_type):
    """Below the cap the guard changes nothing: fp32 agrees with fp64 (log-ratio 30)."""
    logp = torch.full((2, 3), -1.0, dtype=F64)
    old = logp.clone()
    old[:, 0] = -31.0
    adv = torch.tensor([0.3, -0.2], dtype=F64)
    out = {}
    for dtype in (F32, F64):
        leaf = logp.to(dtype).requires_grad_()
        loss, _ = grpo_loss(leaf, old.to(dtype), None, adv.to(dtype), loss_type=loss_type, max_completion_length=3)
        out[dtype] = (loss, torch.autograd.grad(loss, leaf)[0])
    assert_close(out[F32][0], out[F64][0], atol=0, rtol=1e-5, name="loss")
    assert_close(out[F32][1], out[F64][1], atol=0, rtol=1e-5, name="grad")


def test_fused_fp32_overflow_is_finite():
    c = head_case(seed=10, dtype=F32)
    old = c["old"].clone()
    old[:, 0] = -200.0
    adv = c["adv"].clone()
    adv[0] = 0.0
    w = c["weight"].clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(c["hidden"], w, c["ids"], c["mask"], adv, old_logp=old, loss_type="grpo")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all()


# --------------------------------------------------------------------------- issue 13.4
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_empty_batch_gives_zero_loss_and_zero_grad(loss_type, shape):
    B, T = shape
    options = dict(loss_type=loss_type, max_completion_length=8, beta=0.04, entropy_coef=0.1,
                   top_entropy_quantile=0.5)
    case = grpo_case(B=B, T=T)
    loss, stats, grad, g_ent = run(case, **options)
    assert float(loss) == 0.0 and grad.shape == (B, T) and torch.all(grad == 0)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in stats.to_dict().values())
    H, V = 4, 7
    hidden = torch.randn(B, T, H, dtype=F64, requires_grad=True)
    weight = torch.randn(V, H, dtype=F64, requires_grad=True)
    fused, _ = fused_linear_grpo_loss(hidden, weight, torch.zeros(B, T, dtype=torch.long),
                                      torch.ones(B, T, dtype=torch.bool), torch.zeros(B, dtype=F64),
                                      ref_logp=torch.zeros(B, T, dtype=F64), **options)
    fused.backward()
    assert float(fused) == 0.0 and torch.all(weight.grad == 0) and hidden.grad.shape == (B, T, H)


def test_entropy_logits_gradient_blocks_and_banned_tokens(monkeypatch):
    """The fused head's d(g_lp logp + g_H H)/d logits against autograd, in row blocks, with a
    -inf logit (a banned token: 0 log 0 = 0) and a -100 label (no log-prob term)."""
    import lpo_kernels.fused_grpo as fused_grpo

    monkeypatch.setattr(fused_grpo, "_ENTROPY_GRAD_ROWS", 3)
    g = torch.Generator().manual_seed(0)
    N, V, inv_t = 10, 17, 0.7
    logits = torch.randn(N, V, generator=g, dtype=F64)
    logits[0, 3] = float("-inf")
    targets = torch.randint(0, V, (N,), generator=g)
    targets[2] = -100
    g_lp, g_h = torch.randn(N, generator=g, dtype=F64), torch.randn(N, generator=g, dtype=F64)
    g_lp[2] = 0.0  # the loss gives no log-prob gradient to a masked token
    z = (logits * inv_t).requires_grad_()
    log_p = torch.log_softmax(z, -1)
    entropy = -(log_p.exp() * log_p.clamp(min=-1e300)).sum(-1)
    logp = torch.where(targets >= 0, log_p.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    (want,) = torch.autograd.grad((g_lp * logp + g_h * entropy).sum(), z)
    got = logits.clone()
    fused_grpo._logits_grad_with_entropy_inplace(got, targets, torch.logsumexp(logits * inv_t, -1),
                                                 entropy.detach(), g_lp, g_h, inv_t)
    assert_close(got, want * inv_t, atol=1e-15, rtol=1e-12, name="logits grad")
