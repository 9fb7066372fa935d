"""The reference listwise loss (lpo_kernels/reference.py) against the spec
(../shared/docs/lpo-math.md), through the public ``lpo_loss(backend="torch")``.

The expected values come from an independent transcription of the spec written here: a
Python loop over groups with ``torch.softmax`` and the divergence formulas of section 2,
differentiated by autograd. Nothing below reuses reference.py's math."""

from __future__ import annotations

import math

import pytest
import torch

from lpo_kernels import lpo_loss
from tests.utils import assert_close, call_lpo, make_listwise_case

TARGETS = ("grpo", "dr_grpo", "rloo", "maxrl", "softmax", "advantages")
DIVERGENCES = ("forward_kl", "reverse_kl", "alpha", "js")
F64 = torch.float64


def f64(x: float) -> torch.Tensor:
    """assert_close turns a bare Python float into fp32: keep expected values in fp64."""
    return torch.tensor(x, dtype=F64)


# --------------------------------------------------------------------------- the spec, by hand
def spec_target_logits(values: torch.Tensor, target: str, tau: float, eps: float) -> torch.Tensor:
    """phi of the spec's table for one group's non-empty responses (tau divides every target,
    as LPOOptions documents; the tests use tau=1 except for softmax/advantages)."""
    K = values.numel()
    if K == 1 or bool((values == values[0]).all()):
        return torch.zeros_like(values)  # "a group whose rewards are all equal has uniform target"
    mean = values.mean()
    if target == "grpo":
        phi = (values - mean) / (values.std(correction=1) + eps)
    elif target == "dr_grpo":
        phi = values - mean
    elif target == "rloo":
        phi = K / (K - 1) * (values - mean)
    elif target == "maxrl":
        phi = (values - mean) / (mean + eps)
    else:  # softmax / advantages
        phi = values
    return phi / tau


def spec_divergence(P: torch.Tensor, w: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """D(w* || P) written straight from the table of section 2."""
    if divergence == "forward_kl":
        return (w * (w.log() - P.log())).sum()
    if divergence == "reverse_kl":
        return (P * (P.log() - w.log())).sum()
    if divergence == "alpha":
        a = alpha
        return ((w ** a * P ** (1 - a)).sum() - 1) / (a * (a - 1))
    M = (P + w) / 2
    return 0.5 * (P * (P / M).log()).sum() + 0.5 * (w * (w / M).log()).sum()


def spec_scores(logp, old, mask, seq_reduce):
    m = mask.to(logp.dtype)
    delta = (logp - old) * m
    n_tokens = m.sum(-1)
    summed = delta.sum(-1)
    if seq_reduce == "mean":
        return summed / n_tokens.clamp(min=1), n_tokens
    return summed, n_tokens


def spec_group_divergences(scores, n_tokens, ids, values, *, target, divergence, alpha=0.5,
                           tau=1.0, eps=1e-6):
    """(per-group D in ascending id order, number of counted groups G)."""
    per_group, G = [], 0
    for gid in sorted(set(ids.tolist())):
        rows = [i for i in range(ids.numel()) if int(ids[i]) == gid and float(n_tokens[i]) > 0]
        if not rows:
            per_group.append(scores.sum() * 0)
            continue
        G += 1
        rows = torch.tensor(rows)
        P = torch.softmax(scores[rows], 0)
        w = torch.softmax(spec_target_logits(values[rows].to(scores.dtype), target, tau, eps), 0)
        per_group.append(spec_divergence(P, w, divergence, alpha))
    return torch.stack(per_group), G


def spec_loss(logp, old, mask, ids, values, *, target="grpo", divergence="forward_kl", alpha=0.5,
              tau=1.0, eps=1e-6, seq_reduce="mean", reduction="mean"):
    scores, n_tokens = spec_scores(logp, old, mask, seq_reduce)
    per_group, G = spec_group_divergences(scores, n_tokens, ids, values, target=target,
                                          divergence=divergence, alpha=alpha, tau=tau, eps=eps)
    if reduction == "none":
        return per_group
    if reduction == "sum":
        return per_group.sum()
    return per_group.sum() / max(G, 1)


def spec_coefficients(case, *, seq_reduce="mean", **options):
    """c_k = dD/ds_k by autograd through the hand-written divergence (scores as leaves)."""
    old = case["old_logp"] if case["old_logp"] is not None else case["logp"].detach()
    scores, n_tokens = spec_scores(case["logp"].detach(), old, case["mask"], seq_reduce)
    scores = scores.clone().requires_grad_()
    per_group, G = spec_group_divergences(scores, n_tokens, case["group_ids"], values_of(case),
                                          **options)
    (coef,) = torch.autograd.grad(per_group.sum(), scores)
    return coef, n_tokens, G


def values_of(case):
    return case["advantages"] if "advantages" in case else case["rewards"]


def rewards_for(target, case, seed=3):
    """maxrl needs rewards >= 0 (it divides by the mean reward)."""
    if target == "maxrl":
        g = torch.Generator().manual_seed(seed)
        case["rewards"] = torch.rand(case["rewards"].shape, generator=g, dtype=case["rewards"].dtype) + 0.1
    return case


def f64_case(target="grpo", **kw):
    kw.setdefault("group_sizes", [4, 3, 1, 5])
    kw.setdefault("empty_prob", 0.15)
    kw.setdefault("max_len", 5)
    case = make_listwise_case(dtype=F64, target=target, **kw)
    return rewards_for(target, case)


def spec_grad(case, **options):
    """(value, d(value . grad_out)/d logp) of the hand-written loss, with call_lpo's grad_out."""
    logp = case["logp"].detach().clone().requires_grad_()
    value = spec_loss(logp, case["old_logp"], case["mask"], case["group_ids"], values_of(case),
                      **options)
    grad_out = torch.randn(value.shape, dtype=value.dtype, generator=torch.Generator().manual_seed(1)) \
        if value.dim() else torch.ones((), dtype=value.dtype)
    (grad,) = torch.autograd.grad((value * grad_out).sum(), logp)
    return value.detach(), grad


# --------------------------------------------------------------------------- exact gradient
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_unclipped_gradient_equals_autograd_of_divergence(target, divergence):
    case = f64_case(target, seed=TARGETS.index(target) * 10 + DIVERGENCES.index(divergence))
    tau = 0.7 if target in ("softmax", "advantages") else 1.0
    eps = 0.1 if target in ("grpo", "maxrl") else 1e-6  # large enough to pin where eps goes
    for seq_reduce in ("mean", "sum"):
        for reduction in ("mean", "sum", "none"):
            opts = dict(target=target, divergence=divergence, alpha=0.3, tau=tau, eps=eps,
                        seq_reduce=seq_reduce, reduction=reduction)
            loss, _, grad = call_lpo(case, clip="none", backend="torch", **opts)
            want_loss, want_grad = spec_grad(case, **opts)
            name = f"{target}/{divergence}/{seq_reduce}/{reduction}"
            assert_close(loss, want_loss, atol=1e-12, rtol=1e-10, name=name + " loss")
            assert_close(grad, want_grad, atol=1e-12, rtol=1e-9, name=name + " grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unclipped_gradient_matches_finite_differences(divergence, reduction):
    case = f64_case(group_sizes=[3, 2, 1], max_len=3, empty_prob=0.2, seed=5)
    for seq_reduce in ("mean", "sum"):
        def loss_of(logp):
            return lpo_loss(logp, case["old_logp"], case["mask"], case["group_ids"], case["rewards"],
                            divergence=divergence, alpha=0.6, seq_reduce=seq_reduce, clip="none",
                            reduction=reduction, backend="torch")[0]
        logp = case["logp"].detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(loss_of, (logp,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_packed_gradient_matches_finite_differences():
    case = make_listwise_case(group_sizes=[3, 2], packed=True, max_len=3, dtype=F64, seed=2)

    def loss_of(logp):
        return lpo_loss(logp, case["old_logp"], None, case["group_ids"], case["rewards"],
                        cu_seqlens=case["cu_seqlens"], clip="none", divergence="js",
                        backend="torch")[0]
    logp = case["logp"].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(loss_of, (logp,), eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------- properties of c
def coefficients_via_api(case, **options):
    """c_k read from the token gradient: seq_reduce='sum', reduction='sum', clip='none' make
    d loss / d logp[k, t] = c_k at every counted token."""
    _, _, grad = call_lpo(case, seq_reduce="sum", reduction="sum", clip="none", backend="torch",
                          **options)
    mask = case["mask"]
    coef = (grad * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    # every counted token of a sequence carries the same coefficient
    assert_close(grad * mask, coef[:, None] * mask, atol=1e-15, rtol=0, name="constant c per sequence")
    return coef, mask.sum(-1) > 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_coefficients_zero_sum_and_bounded(divergence):
    for seed in range(3):
        case = f64_case(score_scale=2.0, seed=seed)
        coef, valid = coefficients_via_api(case, divergence=divergence, alpha=0.4)
        ids = case["group_ids"]
        assert torch.all(coef[~valid] == 0)
        for gid in ids.unique():
            assert abs(float(coef[ids == gid].sum())) < 1e-12, "sum_k c_k = 0 per group"
        want, _, _ = spec_coefficients(case, target="grpo", divergence=divergence, alpha=0.4,
                                       seq_reduce="sum")
        assert_close(coef, want, atol=1e-12, rtol=1e-10, name="c = dD/ds")
        if divergence == "forward_kl":
            assert coef.abs().max() <= 1
            for gid in ids.unique():
                assert float(coef[ids == gid].abs().sum()) <= 2 + 1e-12
        if divergence == "js":
            # |c_k| = P_k |f_k - E_P f| with f = 1/2 log(P/M) in [-1/2 log 2... 1/2 log 2]: bounded
            assert coef.abs().max() <= math.log(2)


def test_js_coefficients_bounded_far_from_target():
    """Even hundreds of nats from the target the JS coefficients stay bounded (and finite)."""
    case = f64_case(score_scale=200.0, seed=4)
    coef, _ = coefficients_via_api(case, divergence="js")
    assert torch.isfinite(coef).all() and coef.abs().max() <= math.log(2)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("target", ["grpo", "softmax", "rloo"])
def test_self_correction_when_policy_equals_target(divergence, target):
    """old_logp built so that s_k = phi_k (log w* up to a constant): P = w*, D = 0, c = 0."""
    case = f64_case(target, group_sizes=[4, 3, 5], empty_prob=0.0, seed=7)
    ids, rewards, mask = case["group_ids"], case["rewards"], case["mask"]
    phi = torch.zeros_like(rewards)
    for gid in ids.unique():
        rows = ids == gid
        phi[rows] = spec_target_logits(rewards[rows], target, tau=0.8 if target == "softmax" else 1.0,
                                       eps=1e-6) + 3.0 * float(gid)  # shift: softmax-invariant
    case["old_logp"] = case["logp"].detach() - phi[:, None]  # every token's delta is phi_k
    tau = 0.8 if target == "softmax" else 1.0
    loss, stats, grad = call_lpo(case, target=target, divergence=divergence, tau=tau,
                                 clip="none", backend="torch")
    assert abs(float(loss)) < 1e-12
    assert float(grad.abs().max()) < 1e-12
    assert abs(float(stats.divergence)) < 1e-12
    assert float(stats.mean_abs_coef) < 1e-12
    assert_close(stats.listwise_entropy, stats.target_entropy, atol=1e-12, rtol=0, name="H(P) = H(w*)")
    assert mask.any()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_nonnegative(divergence):
    for seed in range(4):
        case = f64_case(score_scale=1.5, seed=seed)
        loss, stats, _ = call_lpo(case, divergence=divergence, alpha=0.7, reduction="none",
                                  backend="torch")
        assert torch.all(loss >= -1e-15), loss
        assert float(stats.divergence) >= 0


# --------------------------------------------------------------------------- first-order link to GRPO
def on_policy_case(advantages, seed=0):
    """One group, on-policy (old_logp=None), target='advantages' with the given A."""
    K = advantages.numel()
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(K, 4, generator=g, dtype=F64) * 2
    mask = torch.rand(K, 4, generator=g) < 0.7
    mask[:, 0] = True
    return dict(logp=logp.requires_grad_(), old_logp=None, mask=mask,
                group_ids=torch.zeros(K, dtype=torch.long), advantages=advantages)


def zero_mean_advantages(K, seed):
    A = torch.randn(K, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return A - A.mean()


def test_on_policy_reverse_kl_is_exactly_grpo():
    for K, seed in ((2, 0), (5, 1), (8, 2)):
        A = zero_mean_advantages(K, seed) * 2.0
        coef, _ = coefficients_via_api(on_policy_case(A, seed), target="advantages",
                                       divergence="reverse_kl")
        assert_close(coef, -A / K, atol=1e-14, rtol=1e-12, name="reverse-KL c = -A/K")


def test_on_policy_forward_kl_is_grpo_to_first_order():
    K = 6
    A = zero_mean_advantages(K, 3)
    errors = []
    for scale in (0.1, 0.05, 0.025, 0.0125):
        coef, _ = coefficients_via_api(on_policy_case(A * scale), target="advantages")
        assert_close(coef, 1 / K - torch.softmax(A * scale, 0), atol=1e-15, rtol=1e-12,
                     name="forward-KL c = P - w*")
        errors.append(float((coef + A * scale / K).abs().max()))
    for big, small in zip(errors, errors[1:]):
        assert 3.5 < big / small < 4.5, errors  # O(A^2): halving A quarters the error
    assert errors[0] < 0.1 ** 2


def test_worked_example_of_the_spec():
    """K=8, binary reward, one success, GRPO target (ddof=1 std)."""
    K = 8
    rewards = torch.zeros(K, dtype=F64)
    rewards[0] = 1.0
    case = on_policy_case(torch.zeros(K, dtype=F64))
    del case["advantages"]
    case["rewards"] = rewards
    A = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    assert round(float(A[0]), 3) == 2.475 and round(float(A[1]), 3) == -0.354
    coef, _ = coefficients_via_api(case, target="grpo", divergence="forward_kl")
    assert round(float(coef[0]), 3) == -0.582
    assert all(round(float(c), 3) == 0.083 for c in coef[1:])
    assert round(float(-A[0] / K), 3) == -0.309 and round(float(-A[1] / K), 3) == 0.044
    reverse, _ = coefficients_via_api(case, target="grpo", divergence="reverse_kl")
    assert_close(reverse, -A / K, atol=1e-14, rtol=1e-12, name="reverse KL = GRPO")


# --------------------------------------------------------------------------- degenerate cases (spec section 3)
def padded(logp, old, mask, ids, rewards):
    return dict(logp=logp.detach().clone().requires_grad_(), old_logp=old, mask=mask,
                group_ids=ids, rewards=rewards)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_empty_responses_are_left_out(divergence):
    case = f64_case(group_sizes=[4, 3, 5], empty_prob=0.3, seed=11)
    nonempty = case["mask"].any(-1)
    assert not nonempty.all() and nonempty.any()
    loss, stats, grad = call_lpo(case, divergence=divergence, backend="torch")
    kept = padded(case["logp"][nonempty], case["old_logp"][nonempty], case["mask"][nonempty],
                  case["group_ids"][nonempty], case["rewards"][nonempty])
    loss2, stats2, grad2 = call_lpo(kept, divergence=divergence, backend="torch")
    assert_close(loss, loss2, atol=1e-14, rtol=1e-12, name="loss without empty rows")
    assert_close(grad[nonempty], grad2, atol=1e-14, rtol=1e-12, name="grad without empty rows")
    assert torch.all(grad[~nonempty] == 0)
    assert int(stats.n_seqs) == int(nonempty.sum()) == int(stats2.n_seqs)
    # an empty response's reward does not enter the target
    case["rewards"] = case["rewards"].clone()
    case["rewards"][~nonempty] = 1e6
    loss3, _, _ = call_lpo(case, divergence=divergence, backend="torch")
    assert_close(loss3, loss, atol=1e-14, rtol=1e-12, name="empty rows' rewards ignored")


def test_group_of_one_counts_in_G_with_zero_divergence():
    case = f64_case(group_sizes=[4, 1, 3], empty_prob=0.0, score_scale=1.0, seed=12)
    ids = case["group_ids"]
    per_group, _, grad_none = call_lpo(case, reduction="none", clip="none", backend="torch")
    assert per_group.shape == (3,) and float(per_group[1]) == 0.0
    loss, stats, grad = call_lpo(case, clip="none", backend="torch")
    assert int(stats.n_groups) == 3
    assert_close(loss, per_group.sum() / 3, atol=1e-15, rtol=1e-13, name="mean over G=3")
    assert torch.all(grad[ids == 1] == 0)
    # a group reduced to one response by empty siblings behaves the same way
    case["mask"] = case["mask"].clone()
    case["mask"][(ids == 2).nonzero()[1:, 0]] = False
    per_group, stats, grad = call_lpo(case, reduction="none", clip="none", backend="torch")
    assert float(per_group[2]) == 0.0 and int(stats.n_groups) == 3
    assert torch.all(grad[ids == 2] == 0)


def test_all_empty_group_is_not_counted():
    case = f64_case(group_sizes=[4, 3, 3], empty_prob=0.0, seed=13)
    ids = case["group_ids"]
    loss_all, _, _ = call_lpo(case, reduction="none", backend="torch")
    case["mask"] = case["mask"].clone()
    case["mask"][ids == 1] = False
    per_group, _, _ = call_lpo(case, reduction="none", backend="torch")
    assert float(per_group[1]) == 0.0
    loss, stats, grad = call_lpo(case, backend="torch")
    assert int(stats.n_groups) == 2
    assert_close(loss, (per_group[0] + per_group[2]) / 2, atol=1e-15, rtol=1e-13, name="mean over G=2")
    assert_close(per_group[[0, 2]], loss_all[[0, 2]], atol=1e-15, rtol=1e-13, name="other groups")
    assert torch.all(grad[ids == 1] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("packed", [False, True])
def test_no_groups_left_gives_zero_loss_and_zero_grad(reduction, packed):
    case = make_listwise_case(group_sizes=[3, 2], empty_prob=1.0, packed=packed, seed=14)
    loss, stats, grad = call_lpo(case, reduction=reduction, backend="torch")
    assert torch.isfinite(loss).all() and torch.all(loss == 0)
    assert torch.isfinite(grad).all() and torch.all(grad == 0)
    assert int(stats.n_groups) == 0 and int(stats.n_tokens) == 0
    for name in ("divergence", "listwise_entropy", "target_entropy", "clip_fraction", "mean_abs_coef"):
        assert torch.isfinite(getattr(stats, name)), name


def test_zero_sequences():
    logp = torch.randn(0, 5, dtype=F64, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        loss, stats = lpo_loss(logp, None, torch.ones(0, 5, dtype=torch.bool),
                               torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=F64),
                               reduction=reduction, backend="torch")
        assert torch.all(loss == 0) and int(stats.n_groups) == 0
        (grad,) = torch.autograd.grad(loss.sum(), logp, allow_unused=True)
        assert grad is None or grad.shape == logp.shape


@pytest.mark.parametrize("target", TARGETS)
def test_equal_rewards_give_uniform_target(target):
    case = f64_case(target, group_sizes=[4, 5], empty_prob=0.0, score_scale=0.5, seed=15)
    key = "advantages" if target == "advantages" else "rewards"
    case[key] = torch.full_like(case[key], 0.375)
    coef, valid = coefficients_via_api(case, target=target)
    _, stats, _ = call_lpo(case, target=target, backend="torch")
    assert_close(stats.target_entropy, f64((math.log(4) + math.log(5)) / 2), atol=1e-14, rtol=0,
                 name="H(w*) = log K")
    # forward KL: c = P - 1/K
    scores = spec_scores(case["logp"].detach(), case["old_logp"], case["mask"], "sum")[0]
    ids = case["group_ids"]
    for gid, K in ((0, 4), (1, 5)):
        rows = ids == gid
        assert_close(coef[rows], torch.softmax(scores[rows], 0) - 1 / K, atol=1e-14, rtol=1e-12,
                     name="c = P - 1/K")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("seq_reduce", ["mean", "sum"])
def test_large_scores_stay_finite(divergence, seq_reduce):
    for dtype in (F64, torch.float32):
        case = make_listwise_case(group_sizes=[4, 3], score_scale=300.0, dtype=dtype, seed=16)
        case["rewards"] = case["rewards"] * 100
        for clip in ("none", "clamp", "ppo"):
            loss, stats, grad = call_lpo(case, divergence=divergence, seq_reduce=seq_reduce,
                                         clip=clip, target="softmax", tau=0.01, backend="torch")
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            for value in (stats.divergence, stats.listwise_entropy, stats.target_entropy,
                          stats.mean_abs_coef):
                assert torch.isfinite(value)
        scores = spec_scores(case["logp"].detach().double(), case["old_logp"].double(), case["mask"],
                             seq_reduce)[0]
        assert float(scores.abs().max()) > 100  # really hundreds of nats


@pytest.mark.parametrize("target", ["grpo", "maxrl", "rloo", "dr_grpo"])
def test_eps_zero_with_equal_rewards_is_finite(target):
    case = make_listwise_case(group_sizes=[4, 3], dtype=F64, seed=17)
    case["rewards"] = torch.tensor([0.0] * 4 + [1.0] * 3, dtype=F64)  # maxrl: mean 0 in group 0
    for divergence in DIVERGENCES:
        loss, stats, grad = call_lpo(case, target=target, eps=0.0, divergence=divergence,
                                     backend="torch")
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert_close(stats.target_entropy, f64((math.log(4) + math.log(3)) / 2), atol=1e-14, rtol=0,
                     name="uniform targets")


# --------------------------------------------------------------------------- clipping
def clip_case(seed=20):
    case = f64_case(group_sizes=[4, 3, 5], empty_prob=0.1, score_scale=0.3, max_len=6, seed=seed)
    delta = (case["logp"] - case["old_logp"]).detach()
    inside = (delta > math.log(0.8)) & (delta < math.log(1.3))
    assert (inside & case["mask"]).any() and (~inside & case["mask"]).any()
    return case


def clip_surrogate_grad(case, gate_fn, **options):
    """Autograd of sum_k c_k / N_k sum_t m * h(delta) with c_k constants (hand-written)."""
    coef, n_tokens, G = spec_coefficients(case, target="grpo", divergence=options["divergence"],
                                          seq_reduce="mean")
    logp = case["logp"].detach().clone().requires_grad_()
    delta = logp - case["old_logp"]
    per_token = gate_fn(delta, coef[:, None])
    surrogate = (per_token * case["mask"]).sum(-1) / n_tokens.clamp(min=1)
    (grad,) = torch.autograd.grad(surrogate.sum() / max(G, 1), logp)
    return grad


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "js"])
def test_clamp_gate_matches_autograd_of_clamp(divergence):
    low, high = math.log(1 - 0.2), math.log(1 + 0.3)
    for seed in (20, 21):
        case = clip_case(seed)
        _, stats, grad = call_lpo(case, divergence=divergence, clip="clamp", clip_eps_high=0.3,
                                  backend="torch")
        want = clip_surrogate_grad(case, lambda d, c: c * d.clamp(low, high), divergence=divergence)
        assert_close(grad, want, atol=1e-14, rtol=1e-12, name="clamp gate")
        delta = (case["logp"] - case["old_logp"]).detach()
        m = case["mask"]
        n = m.sum().double()
        assert_close(stats.clip_fraction_low, ((delta < low) & m).sum() / n, atol=1e-15, rtol=0, name="low")
        assert_close(stats.clip_fraction_high, ((delta > high) & m).sum() / n, atol=1e-15, rtol=0, name="high")
        assert_close(stats.clip_fraction, (((delta < low) | (delta > high)) & m).sum() / n,
                     atol=1e-15, rtol=0, name="clip_fraction")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "alpha"])
def test_ppo_gate_is_sign_aware(divergence):
    """PPO's pessimistic bound in log-ratio form: per token max(c*delta, c*clamp(delta))."""
    low, high = math.log(1 - 0.25), math.log(1 + 0.2)
    for seed in (22, 23):
        case = clip_case(seed)
        _, stats, grad = call_lpo(case, divergence=divergence, clip="ppo", clip_eps_low=0.25,
                                  backend="torch")
        want = clip_surrogate_grad(
            case, lambda d, c: torch.maximum(c * d, c * d.clamp(low, high)), divergence=divergence)
        assert_close(grad, want, atol=1e-14, rtol=1e-12, name="ppo gate")
        coef, _, _ = spec_coefficients(case, target="grpo", divergence=divergence, seq_reduce="mean")
        delta = (case["logp"] - case["old_logp"]).detach()
        m = case["mask"]
        c = coef[:, None]
        below, above = (delta < low) & (c > 0) & m, (delta > high) & (c < 0) & m
        assert below.any() or above.any()
        n = m.sum().double()
        assert_close(stats.clip_fraction_low, below.sum() / n, atol=1e-15, rtol=0, name="low")
        assert_close(stats.clip_fraction_high, above.sum() / n, atol=1e-15, rtol=0, name="high")
        # sign-aware: fewer tokens gated than clamp would gate
        _, clamp_stats, _ = call_lpo(case, divergence=divergence, clip="clamp", clip_eps_low=0.25,
                                     backend="torch")
        assert float(stats.clip_fraction) < float(clamp_stats.clip_fraction)


def test_clip_none_is_exact_and_clip_does_not_change_loss():
    case = clip_case(24)
    loss_none, stats, grad_none = call_lpo(case, clip="none", backend="torch")
    assert float(stats.clip_fraction) == 0.0
    _, want = spec_grad(case)
    assert_close(grad_none, want, atol=1e-14, rtol=1e-12, name="clip='none'")
    for clip in ("clamp", "ppo"):
        loss, _, grad = call_lpo(case, clip=clip, backend="torch")
        assert_close(loss, loss_none, atol=0, rtol=0, name="scores use the unclipped delta")
        assert not torch.equal(grad, grad_none)
    # eps_low = 1: no lower bound at all
    _, stats, _ = call_lpo(case, clip="clamp", clip_eps_low=1.0, backend="torch")
    assert float(stats.clip_fraction_low) == 0.0


# --------------------------------------------------------------------------- layout invariance
def to_packed(case):
    mask = case["mask"]
    lengths = mask.sum(-1)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    out = {k: v for k, v in case.items() if k not in ("logp", "old_logp", "mask")}
    out.update(logp=case["logp"].detach()[mask].clone().requires_grad_(),
               old_logp=case["old_logp"][mask], mask=None, cu_seqlens=cu)
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("clip", ["clamp", "ppo", "none"])
def test_packed_equals_padded(reduction, clip):
    case = f64_case(group_sizes=[4, 3, 1, 5], empty_prob=0.2, shuffle=True, sparse_ids=True, seed=30)
    loss, stats, grad = call_lpo(case, reduction=reduction, clip=clip, divergence="js", backend="torch")
    packed = to_packed(case)
    loss_p, stats_p, grad_p = call_lpo(packed, reduction=reduction, clip=clip, divergence="js",
                                       backend="torch")
    assert_close(loss_p, loss, atol=1e-14, rtol=1e-12, name="loss")
    assert_close(grad_p, grad[case["mask"]], atol=1e-14, rtol=1e-12, name="grad")
    for name in stats.to_dict():
        assert_close(getattr(stats_p, name), getattr(stats, name), atol=1e-13, rtol=1e-12, name=name)


def test_packed_mask_inside_sequences():
    """Packed layout with a mask of its own (prompt tokens inside the packed rows)."""
    case = f64_case(group_sizes=[3, 4], empty_prob=0.0, seed=31)
    full = torch.ones_like(case["mask"])
    packed = to_packed(dict(case, mask=full))
    packed["mask"] = case["mask"].reshape(-1)
    loss, _, grad = call_lpo(case, backend="torch")
    loss_p, _, grad_p = call_lpo(packed, backend="torch")
    assert_close(loss_p, loss, atol=1e-14, rtol=1e-12, name="loss")
    assert_close(grad_p, grad.reshape(-1), atol=1e-14, rtol=1e-12, name="grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_row_permutation_and_id_renaming(divergence):
    case = f64_case(group_sizes=[4, 3, 1, 5], empty_prob=0.15, seed=32)
    loss, _, grad = call_lpo(case, divergence=divergence, backend="torch")
    per_group, _, _ = call_lpo(case, divergence=divergence, reduction="none", backend="torch")
    perm = torch.randperm(case["group_ids"].numel(), generator=torch.Generator().manual_seed(0))
    # order-preserving renaming (negative, sparse): per-group output keeps its order
    renamed = case["group_ids"] * 1000 - 7
    moved = padded(case["logp"][perm], case["old_logp"][perm], case["mask"][perm],
                   renamed[perm], case["rewards"][perm])
    loss2, _, grad2 = call_lpo(moved, divergence=divergence, backend="torch")
    assert_close(loss2, loss, atol=1e-14, rtol=1e-12, name="loss after permuting")
    assert_close(grad2, grad[perm], atol=1e-14, rtol=1e-12, name="grad permutes with rows")
    per_group2, _, _ = call_lpo(moved, divergence=divergence, reduction="none", backend="torch")
    assert_close(per_group2, per_group, atol=1e-14, rtol=1e-12, name="per group (ascending ids)")
    # an order-changing renaming permutes the per-group output accordingly
    reversed_ids = 10 - case["group_ids"]
    per_group3, _, _ = call_lpo(dict(case, group_ids=reversed_ids), divergence=divergence,
                                reduction="none", backend="torch")
    assert_close(per_group3, per_group.flip(0), atol=1e-14, rtol=1e-12, name="reversed ids")


@pytest.mark.parametrize("packed", [False, True])
def test_group_size_equals_group_ids(packed):
    case = f64_case(group_sizes=[3, 3, 3], empty_prob=0.2, seed=33)
    if packed:
        case = to_packed(case)
    for reduction in ("mean", "none"):
        loss, stats, grad = call_lpo(case, reduction=reduction, backend="torch")
        loss2, stats2, grad2 = call_lpo(dict(case, group_ids=None), group_size=3,
                                        reduction=reduction, backend="torch")
        assert_close(loss2, loss, atol=0, rtol=0, name="loss")
        assert_close(grad2, grad, atol=0, rtol=0, name="grad")
        assert stats.to_dict() == stats2.to_dict()


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fp32_agrees_with_fp64(divergence):
    """CCE pattern: the reference in fp32 is no worse than the hand-written spec in fp32
    (both measured against fp64), plus a small slack."""
    case64 = f64_case(group_sizes=[6, 5, 8], empty_prob=0.1, score_scale=0.5, max_len=9, seed=40)
    case32 = {k: (v.detach().float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in case64.items()}
    case32["logp"].requires_grad_()
    for reduction in ("mean", "none"):
        opts = dict(divergence=divergence, reduction=reduction)
        loss64, _, grad64 = call_lpo(case64, backend="torch", clip="none", **opts)
        loss32, _, grad32 = call_lpo(case32, backend="torch", clip="none", **opts)
        assert loss32.dtype == grad32.dtype == torch.float32
        spec_loss32, spec_grad32 = spec_grad(case32, **opts)
        for got, plain, truth, name in ((loss32, spec_loss32, loss64, "loss"),
                                        (grad32, spec_grad32, grad64, "grad")):
            err = (got.double() - truth).abs().max()
            plain_err = (plain.double() - truth).abs().max()
            assert err <= 2 * plain_err + 1e-6, f"{name}: {err} vs plain fp32 {plain_err}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_half_gradients(dtype):
    case = make_listwise_case(group_sizes=[4, 3], dtype=dtype, seed=41)
    loss, stats, grad = call_lpo(case, backend="torch")
    assert grad.dtype == dtype and grad.shape == case["logp"].shape
    assert loss.dtype == torch.float32  # computed in fp32
    assert torch.isfinite(grad.float()).all()
    upcast = {k: (v.detach().float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in case.items()}
    upcast["logp"].requires_grad_()
    loss32, _, grad32 = call_lpo(upcast, backend="torch")
    assert_close(loss, loss32, atol=1e-6, rtol=1e-5, name="half loss = fp32 loss of the same values")
    assert_close(grad, grad32.to(dtype), atol=0, rtol=0, name="half grad = fp32 grad rounded")


@pytest.mark.parametrize("clip", ["clamp", "none"])
def test_padding_values_never_leak(clip):
    """Non-finite log-probs at tokens that do not count change nothing (padding is often
    filled with -inf or garbage by trainers)."""
    case = f64_case(group_sizes=[4, 3], empty_prob=0.2, seed=42)
    pad = ~case["mask"]
    assert pad.any()
    loss, stats, grad = call_lpo(case, clip=clip, backend="torch")
    poisoned = dict(case, logp=case["logp"].detach().masked_fill(pad, math.nan).requires_grad_(),
                    old_logp=case["old_logp"].masked_fill(pad, -math.inf))
    loss2, stats2, grad2 = call_lpo(poisoned, clip=clip, backend="torch")
    assert_close(loss2, loss, atol=0, rtol=0, name="loss")
    assert_close(grad2, grad, atol=0, rtol=0, name="grad")
    assert stats.to_dict() == stats2.to_dict()


def test_reduction_none_order_with_group_size_follows_row_blocks():
    """With group_size=K the groups are the row blocks and the per-group output follows
    them; with group ids alone it follows ascending ids (documented choice)."""
    case = f64_case(group_sizes=[3, 3, 3], empty_prob=0.0, seed=43)
    ids = torch.tensor([7] * 3 + [2] * 3 + [5] * 3)
    by_ids, _, _ = call_lpo(dict(case, group_ids=ids), reduction="none", backend="torch")
    by_blocks, _, _ = call_lpo(dict(case, group_ids=ids), group_size=3, reduction="none",
                               backend="torch")
    no_ids, _, _ = call_lpo(dict(case, group_ids=None), group_size=3, reduction="none",
                            backend="torch")
    assert_close(by_blocks, no_ids, atol=0, rtol=0, name="row-block order")
    assert_close(by_ids, by_blocks[[1, 2, 0]], atol=0, rtol=0, name="ascending-id order")


@pytest.mark.parametrize("target", ["grpo", "dr_grpo", "rloo", "maxrl"])
def test_tau_divides_every_target(target):
    """The spec names tau for softmax/advantages only; LPOOptions documents that it divides
    every target's logits (tau=1, the default, is the spec's table)."""
    case = f64_case(target, seed=44)
    loss, _, grad = call_lpo(case, target=target, tau=2.5, clip="none", backend="torch")
    want_loss, want_grad = spec_grad(case, target=target, tau=2.5)
    assert_close(loss, want_loss, atol=1e-13, rtol=1e-11, name="loss")
    assert_close(grad, want_grad, atol=1e-13, rtol=1e-10, name="grad")
    loss1, _, _ = call_lpo(case, target=target, tau=1.0, clip="none", backend="torch")
    assert not torch.allclose(loss, loss1)
