"""Issue 13, items 1, 5, 6 and 7: the listwise step under malformed and extreme input, on
every backend — the torch reference, Triton (its interpreter on CPU) and the CUDA kernels
(compiled for the CPU through csrc/emulate on a machine without a GPU).

1. Malformed ``cu_seqlens`` with ``validate=False`` (the default for CUDA tensors): offsets
   are clamped inside the kernels, so nothing is read or written outside the N tokens; a
   token no sequence holds gets a zero gradient (outputs are NaN-poisoned, so an unwritten
   one shows); the kernels count the malformed offsets into ``stats.cu_seqlens_errors``,
   which ``stats.check_inputs()`` (and ``validate=True``, before any kernel) turn into a
   ValueError naming ``cu_seqlens``.
5. ``target="grpo"`` in fp32 matches fp64 from rewards ~1e-37 (eps=0) to ~1e38.
6. ``divergence="alpha"`` in fp32 matches fp64 for alpha within 1e-7 of 0 or 1, and tends
   to the KL limits.
7. A tau or temperature whose reciprocal overflows float32 is a ValueError naming it.
"""

from __future__ import annotations

import math

import pytest
import torch

from lpo_kernels import LPOOptions, fused_linear_lpo_loss, lpo_loss
from lpo_kernels import cuda as cuda_backend
from lpo_kernels.ops import listwise as triton_listwise
from tests.test_cuda import emulated_module  # noqa: F401  (fixture: csrc/ built for the CPU)
from tests.test_cuda import route_cuda_backend_to_emulator
from tests.utils import assert_close

BACKENDS = ["torch", "triton", "cuda"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # with a GPU: the real kernels


@pytest.fixture
def backend(request, monkeypatch):
    """The backend's name, with every output NaN-poisoned; without a GPU "cuda" runs
    csrc/'s kernels compiled for the CPU on CPU tensors (as tests/test_cuda.py does)."""
    monkeypatch.setattr(triton_listwise, "POISON_OUTPUTS", True)
    monkeypatch.setenv("LPO_KERNELS_POISON", "1")
    if request.param == "cuda" and DEVICE == "cuda" and not cuda_backend.cuda_extension_available():
        pytest.skip("the CUDA extension is not built")
    if request.param == "cuda" and DEVICE == "cpu":
        route_cuda_backend_to_emulator(monkeypatch, request.getfixturevalue("emulated_module"))
    return request.param


# =========================================================================== item 1
N_TOKENS = 40
# name -> (cu_seqlens over 40 tokens, malformed offsets counted by hand)
MALFORMED = {
    "decreasing": ([0, 25, 5, 30, 40], 1),        # sequences 0 and 2 overlap on [5, 25)
    "decreasing_short": ([0, 30, 10, 20, 25], 2),  # 0 overlaps 2, 3 and the zero-filled tail
    "beyond_n": ([0, 10, 20, 30, 4000], 1),
    "negative": ([-1000, 10, 20, 30, 40], 1),
    "short_last": ([0, 10, 20, 30, 33], 1),       # tokens 33..39 in no sequence
    "not_from_zero": ([7, 10, 20, 30, 40], 1),    # tokens 0..6 in no sequence
    "wild": ([2**40, -5, 2**62, 3, -2**62], 5),
    "no_sequence": ([5], 1),                      # B = 0 but 40 tokens
}
# after clamping into [0, N] these are well-formed offsets of the tokens [first, last)
MONOTONE = {"beyond_n": (0, 40), "negative": (0, 40), "short_last": (0, 33), "not_from_zero": (7, 40)}


def _held_tokens(cu, n):
    """Tokens some sequence reads: [c_b, max(c_b, c_{b+1})) with c = clamp(cu, 0, n)."""
    c = [min(max(x, 0), n) for x in cu]
    held = torch.zeros(n, dtype=torch.bool)
    for b in range(len(c) - 1):
        held[c[b]:max(c[b], c[b + 1])] = True
    return held


def _packed_case(cu, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_seqs = len(cu) - 1
    logp = -torch.rand(N_TOKENS, generator=g) * 2
    return dict(logp=logp, old_logp=logp + 0.3 * torch.randn(N_TOKENS, generator=g),
                rewards=torch.randn(n_seqs, generator=g), group_ids=torch.tensor([5, 2, 5, 2][:n_seqs], dtype=torch.long),
                cu_seqlens=torch.tensor(cu, dtype=torch.int64))


def _call(case, backend, layout, **options):
    case = {k: v.to(DEVICE) for k, v in case.items()}
    logp = case["logp"].clone().requires_grad_()
    ids = None if layout == "group_size" else case["group_ids"]
    group_size = 2 if layout == "group_size" else None
    loss, stats = lpo_loss(logp, case["old_logp"], None, ids, case["rewards"], cu_seqlens=case["cu_seqlens"],
                           group_size=group_size, backend=backend, **options)
    loss.sum().backward()
    return loss.detach().cpu(), stats, logp.grad.cpu()


@pytest.mark.parametrize("layout", ["group_size", "group_ids"])
@pytest.mark.parametrize("variant", list(MALFORMED))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_malformed_cu_seqlens_stay_in_bounds(backend, variant, layout):
    cu, n_bad = MALFORMED[variant]
    case = _packed_case(cu)
    loss, stats, grad = _call(case, backend, layout, validate=False, clip="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (loss, grad)
    held = _held_tokens(cu, N_TOKENS)
    assert torch.count_nonzero(grad[~held]) == 0, "a token of no sequence got a gradient"
    assert stats.cu_seqlens_errors.dtype == torch.int64 and int(stats.cu_seqlens_errors) == n_bad
    assert stats.cu_seqlens_errors.device.type == DEVICE  # a device-side count: no host sync
    with pytest.raises(ValueError, match="cu_seqlens"):
        stats.check_inputs()
    with pytest.raises(ValueError, match="cu_seqlens"):
        _call(case, backend, layout, validate=True)
    if variant in MONOTONE:  # = the well-formed call on the tokens the clamped offsets hold
        first, last = MONOTONE[variant]
        c = torch.tensor(cu).clamp(0, N_TOKENS)
        trimmed = dict(case, logp=case["logp"][first:last], old_logp=case["old_logp"][first:last],
                       cu_seqlens=c - first)
        want_loss, want_stats, want_grad = _call(trimmed, "torch", layout, clip="none")
        assert_close(loss, want_loss, atol=1e-6, rtol=1e-6, name="loss")
        assert_close(grad[first:last], want_grad, atol=1e-7, rtol=1e-6, name="grad")
        for name in ("divergence", "n_tokens", "n_seqs", "n_groups", "clip_fraction"):
            assert_close(getattr(stats, name), getattr(want_stats, name), atol=1e-6, rtol=1e-6, name=name)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_well_formed_cu_seqlens_report_no_error(backend):
    case = _packed_case([0, 10, 20, 30, 40])
    for layout in ("group_size", "group_ids"):
        _, stats, grad = _call(case, backend, layout, validate=False)
        assert int(stats.cu_seqlens_errors) == 0 and torch.isfinite(grad).all()
        stats.check_inputs()  # no error


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_fused_head_with_malformed_cu_seqlens(backend):
    """mode='fast' reads cu_seqlens on the host anyway (to cut chunks on group boundaries):
    a named error. mode='low_memory' never syncs: the listwise kernels clamp, and tokens of
    no sequence give hidden no gradient."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N_TOKENS, 8, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(16, 8, generator=g).to(DEVICE).requires_grad_()
    targets = torch.randint(0, 16, (N_TOKENS,), generator=g).to(DEVICE)
    old = (-torch.rand(N_TOKENS, generator=g) * 3).to(DEVICE)
    cu, _ = MALFORMED["short_last"]
    args = (hidden, weight, targets, None, torch.tensor([0, 0, 1, 1], device=DEVICE),
            torch.randn(4, generator=g).to(DEVICE))
    kwargs = dict(old_logp=old, cu_seqlens=torch.tensor(cu, device=DEVICE), validate=False, backend=backend,
                  clip="none")
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_linear_lpo_loss(*args, mode="fast", **kwargs)
    loss, stats = fused_linear_lpo_loss(*args, mode="low_memory", **kwargs)
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and int(stats.cu_seqlens_errors) == 1
    assert torch.count_nonzero(hidden.grad[33:]) == 0 and torch.count_nonzero(hidden.grad[:33]) > 0


# =========================================================================== items 5 and 6
def _padded_case(rewards, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = rewards.shape[0], 5
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return dict(logp=logp, old_logp=old, rewards=rewards, group_ids=torch.arange(B) // 3)


def _padded_call(case, dtype, backend, **options):
    case = {k: v.to(DEVICE) for k, v in case.items()}
    logp = case["logp"].detach().to(dtype).clone().requires_grad_()
    loss, _ = lpo_loss(logp, case["old_logp"].to(dtype), None, case["group_ids"], case["rewards"].to(dtype),
                       backend=backend if dtype != torch.float64 else "torch", clip="none", **options)
    loss.sum().backward()
    return loss.detach().double().cpu(), logp.grad.double().cpu()


def _relative_error(got, want):
    return float((got - want).abs().max() / want.abs().max())


BASE_REWARDS = torch.tensor([0.3, -1.2, 2.0, 0.5, 0.9, -0.4], dtype=torch.float64)
# (reward scale, eps): before the fix fp32 gave a uniform target from 1e19 on (squares
# overflow), NaN at 3e38 (the sum overflows), and uniform for 1e-30 with eps=0 (underflow)
REWARD_SCALES = [(1e19, 1e-6), (1e30, 1e-6), (1.5e38, 1e-6), (1e-30, 0.0), (1e-37, 0.0)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_grpo_target_at_every_reward_scale(backend):
    """fp32 agrees with fp64 on the same (fp32-rounded) rewards, and the standardised
    target does not depend on the rewards' scale."""
    case = _padded_case(BASE_REWARDS)
    unit_loss, unit_grad = _padded_call(case, torch.float64, "torch", eps=0.0)
    for scale, eps in REWARD_SCALES:
        rewards = (BASE_REWARDS * scale).float().double()
        case = _padded_case(rewards)
        loss32, grad32 = _padded_call(case, torch.float32, backend, eps=eps)
        loss64, grad64 = _padded_call(case, torch.float64, "torch", eps=eps)
        assert _relative_error(loss32, loss64) < 2e-6, (scale, loss32, loss64)
        assert _relative_error(grad32, grad64) < 2e-6, (scale, grad32, grad64)
        assert _relative_error(loss64, unit_loss) < 1e-6, scale  # rewards rounded to fp32


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_every_target_finite_near_float32_max(backend):
    """Rewards ~1e38 (sums overflow fp32) and target logits beyond the fp32 range (tiny
    tau) stay finite and agree with fp64 on every target (softmax: one-hot at 3e38 apart),
    except a reverse KL to a one-hot target, whose true value (~1e38) only fp64 holds."""
    rewards = torch.tensor([3e38, -1e38, 2e38, 1e38, 2.5e38, -3e38], dtype=torch.float32).double()
    for options in (dict(target="grpo"), dict(target="dr_grpo"), dict(target="rloo"), dict(target="maxrl"),
                    dict(target="softmax"), dict(target="grpo", tau=1e-37),
                    dict(target="dr_grpo", divergence="reverse_kl"), dict(target="softmax", divergence="js")):
        case = _padded_case(rewards.abs() if options["target"] == "maxrl" else rewards)
        loss32, grad32 = _padded_call(case, torch.float32, backend, **options)
        loss64, grad64 = _padded_call(case, torch.float64, "torch", **options)
        assert torch.isfinite(loss32) and torch.isfinite(grad32).all(), options
        if options.get("divergence") == "reverse_kl":  # KL(P || one-hot) ~ 1e38: beyond
            assert loss32 > 1e37  # fp32's log-prob floor (-max/4), finite is all one can ask
            continue
        assert_close(loss32, loss64, atol=1e-5, rtol=1e-5, name=f"loss {options}")
        assert_close(grad32, grad64, atol=1e-6, rtol=1e-5, name=f"grad {options}")


ALPHAS = [1e-7, 1e-4, 0.5, 1 - 1e-4, 1 - 1e-7]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_alpha_divergence_near_its_ends(backend):
    """fp32 within a few ulps of fp64 for alpha within 1e-7 of 0 or 1 (it was 84% off at
    1e-7 and 4% at 1 - 1e-7), and the fp64 loss tends to reverse KL (a -> 0) and forward
    KL (a -> 1) at rate O(a)."""
    case = _padded_case(BASE_REWARDS)
    reverse, _ = _padded_call(case, torch.float64, "torch", divergence="reverse_kl")
    forward, _ = _padded_call(case, torch.float64, "torch", divergence="forward_kl")
    for alpha in ALPHAS:
        loss32, grad32 = _padded_call(case, torch.float32, backend, divergence="alpha", alpha=alpha)
        loss64, grad64 = _padded_call(case, torch.float64, "torch", divergence="alpha", alpha=alpha)
        assert _relative_error(loss32, loss64) < 1e-6, (alpha, loss32, loss64)
        assert _relative_error(grad32, grad64) < 1e-6, (alpha, grad32, grad64)
        if alpha < 0.5:
            assert abs(float(loss64 - reverse)) <= 2 * alpha * float(reverse) + 1e-15, alpha
        elif alpha > 0.5:
            assert abs(float(loss64 - forward)) <= 2 * (1 - alpha) * float(forward) + 1e-15, alpha


def test_alpha_divergence_matches_the_spec_formula_in_fp64():
    """Away from the ends the reformulation is the spec's (sum w^a P^(1-a) - 1)/(a(a-1))."""
    case = _padded_case(BASE_REWARDS)
    for alpha in (0.05, 0.3, 0.5, 0.7, 0.95):
        loss, _ = _padded_call(case, torch.float64, "torch", divergence="alpha", alpha=alpha,
                               reduction="none")
        logp, old = case["logp"], case["old_logp"]
        scores = (logp - old).mean(-1)
        want = []
        for group in range(2):
            s, r = scores[3 * group:3 * group + 3], BASE_REWARDS[3 * group:3 * group + 3]
            P, w = torch.softmax(s, 0), torch.softmax((r - r.mean()) / (r.std() + 1e-6), 0)
            want.append(((w ** alpha * P ** (1 - alpha)).sum() - 1) / (alpha * (alpha - 1)))
        assert_close(loss, torch.stack(want), atol=1e-14, rtol=1e-12, name=f"alpha={alpha}")


# =========================================================================== item 7
@pytest.mark.parametrize("value", [1e-40, 5e-39, 0.0, -1.0, math.inf])
def test_divisor_below_smallest_normal_float32_is_named(value):
    with pytest.raises(ValueError, match="tau"):
        LPOOptions(tau=value)
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(1, 4, 3, generator=g), torch.randn(5, 3, generator=g)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_lpo_loss(hidden, weight, torch.zeros(1, 4, dtype=torch.long), None, None,
                              torch.randn(1), group_size=1, temperature=value)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_smallest_allowed_tau_is_finite(backend):
    case = _padded_case(BASE_REWARDS)
    loss32, grad32 = _padded_call(case, torch.float32, backend, target="softmax", tau=2.0 ** -126)
    loss64, grad64 = _padded_call(case, torch.float64, "torch", target="softmax", tau=2.0 ** -126)
    assert torch.isfinite(loss32) and torch.isfinite(grad32).all()
    assert_close(loss32, loss64, atol=1e-5, rtol=1e-5, name="loss")
