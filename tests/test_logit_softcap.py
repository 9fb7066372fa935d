"""Logit scaling and soft-capping in the fused head (lpo_kernels/logit_transform.py) against
the naive full-logits head of reference.py with the same options: fp64 and fp32, both modes,
torch and Triton row kernels (Triton under the interpreter), the log-prob head and the GRPO
head. Vocabulary slices are shrunk so the sliced cap/gradient path is exercised."""

from __future__ import annotations

import pytest
import torch

from lpo_kernels import logit_transform, reference
from lpo_kernels.fused_linear import (FusedLinearLPOLoss, fused_linear_grpo_loss, fused_linear_logprobs,
                                      fused_linear_lpo_loss)

from .test_fused_linear import leaves, make_head_case
from .utils import assert_close

# (softcap, logit_scale): cap only (Gemma-2), scale then cap (MuseGlimmer), scale only (Cohere)
TRANSFORMS = [(1.5, 1.0), (2.0, 1.7), (None, 0.6)]
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4)}


@pytest.fixture(autouse=True)
def narrow_slices(monkeypatch):
    monkeypatch.setattr(logit_transform, "SLICE_COLUMNS", 16)  # vocab 50: 4 slices, one ragged
    monkeypatch.setattr(logit_transform, "SLICE_ELEMENTS", 80)  # and blocks of 5 rows (ragged too)


def scaled_case(dtype, seed=0, **kw):
    case = make_head_case(dtype=dtype, seed=seed, bias=True, **kw)
    case["weight"] = case["weight"] * 3.0  # logits O(3): well into the cap's bend
    return case


def naive(case, softcap, logit_scale, temperature, **options):
    p = leaves(case)
    loss, _ = reference.naive_linear_lpo_loss(
        p["hidden"], p["weight"], case["target_ids"].clamp(min=0), case["mask"], case["group_ids"],
        case.get("rewards"), case.get("advantages"), bias=p["bias"], temperature=temperature,
        old_logp=case["old_logp"], softcap=softcap, logit_scale=logit_scale, **options)
    loss.backward()
    return loss.detach(), p


def assert_head_grads_close(p, ref, atol, rtol):
    """Gradients of hidden, weight and bias, atol relative to each reference gradient's scale."""
    for name in ("hidden", "weight", "bias"):
        scale = float(ref[name].grad.abs().max())
        assert_close(p[name].grad, ref[name].grad, atol=atol * scale, rtol=rtol, name=f"grad {name}")


@pytest.mark.parametrize("softcap,logit_scale", TRANSFORMS)
@pytest.mark.parametrize("mode", ["fast", "low_memory"])
@pytest.mark.parametrize("dtype,backend", [(torch.float64, "torch"), (torch.float32, "torch"),
                                           (torch.float32, "triton")])
def test_lpo_head_matches_naive(softcap, logit_scale, mode, dtype, backend):
    case = scaled_case(dtype)
    options = dict(divergence="reverse_kl", clip="none")
    expected, ref = naive(case, softcap, logit_scale, 1.3, **options)
    p = leaves(case)
    loss, _ = fused_linear_lpo_loss(
        p["hidden"], p["weight"], case["target_ids"], case["mask"], case["group_ids"], case["rewards"],
        bias=p["bias"], temperature=1.3, old_logp=case["old_logp"], mode=mode, chunk_tokens=8,
        backend=backend, softcap=softcap, logit_scale=logit_scale, **options)
    loss.backward()
    atol, rtol = TOL[dtype]
    assert_close(loss, expected, atol=atol, rtol=rtol, name="loss")
    assert_head_grads_close(p, ref, atol, rtol)


def test_cap_changes_the_gradient():
    """The cases above are in the cap's bend: the cap really changes loss and gradient."""
    case = scaled_case(torch.float64)
    capped, p_cap = naive(case, 1.5, 1.0, 1.0)
    plain, p_plain = naive(case, None, 1.0, 1.0)
    assert abs(float(capped - plain)) > 1e-3
    assert float((p_cap["weight"].grad - p_plain["weight"].grad).abs().max()) > 1e-2


@pytest.mark.parametrize("softcap,logit_scale", TRANSFORMS)
@pytest.mark.parametrize("dtype,backend", [(torch.float64, "torch"), (torch.float32, "triton")])
def test_logprobs_and_entropy_match_naive(softcap, logit_scale, dtype, backend):
    case = scaled_case(dtype, seed=1)
    targets = case["target_ids"].clamp(min=0)
    g = torch.Generator().manual_seed(5)
    upstream = torch.randn(targets.shape, generator=g, dtype=torch.float64)
    ref = leaves(case)
    logp_ref, ent_ref = reference.naive_linear_logprobs(ref["hidden"], ref["weight"], targets, bias=ref["bias"],
                                                        temperature=0.7, return_entropy=True, softcap=softcap,
                                                        logit_scale=logit_scale)
    (logp_ref * upstream.to(logp_ref.dtype)).sum().backward()
    p = leaves(case)
    logp, ent = fused_linear_logprobs(p["hidden"], p["weight"], targets, bias=p["bias"], temperature=0.7,
                                      return_entropy=True, chunk_tokens=8, backend=backend, softcap=softcap,
                                      logit_scale=logit_scale)
    (logp * upstream.to(logp.dtype)).sum().backward()
    atol, rtol = TOL[dtype]
    assert_close(logp, logp_ref, atol=atol, rtol=rtol, name="logp")
    assert_close(ent, ent_ref, atol=atol, rtol=rtol, name="entropy")
    assert_head_grads_close(p, ref, atol, rtol)


@pytest.mark.parametrize("dtype,backend", [(torch.float64, "torch"), (torch.float32, "triton")])
def test_grpo_head_matches_naive(dtype, backend):
    case = scaled_case(dtype, seed=2)
    targets, mask = case["target_ids"].clamp(min=0), case["mask"]
    advantages = case["rewards"].to(case["old_logp"].dtype)
    options = dict(loss_type="bnpo", clip_eps_low=0.2, clip_eps_high=0.28)
    ref = leaves(case)
    expected, _ = reference.naive_linear_grpo_loss(ref["hidden"], ref["weight"], targets, mask, advantages,
                                                   bias=ref["bias"], temperature=1.1, old_logp=case["old_logp"],
                                                   softcap=2.0, logit_scale=1.7, **options)
    expected.backward()
    p = leaves(case)
    loss, _ = fused_linear_grpo_loss(p["hidden"], p["weight"], targets, mask, advantages, bias=p["bias"],
                                     temperature=1.1, old_logp=case["old_logp"], chunk_tokens=12,
                                     backend=backend, softcap=2.0, logit_scale=1.7, **options)
    loss.backward()
    atol, rtol = TOL[dtype]
    assert_close(loss, expected, atol=atol, rtol=rtol, name="loss")
    assert_head_grads_close(p, ref, atol, rtol)


def test_bf16_error_no_worse_than_naive_bf16():
    """bf16 storage: the capped buffer is rounded once to bf16. Its error against the fp64
    truth stays within the naive bf16 path's error plus a small slack (CCE's criterion)."""
    case64 = scaled_case(torch.float64, seed=3)
    truth, ref = naive(case64, 1.5, 1.3, 1.0)
    case16 = scaled_case(torch.bfloat16, seed=3)
    naive16, ref16 = naive(case16, 1.5, 1.3, 1.0)
    p = leaves(case16)
    loss, _ = fused_linear_lpo_loss(p["hidden"], p["weight"], case16["target_ids"], case16["mask"],
                                    case16["group_ids"], case16["rewards"], bias=p["bias"],
                                    old_logp=case16["old_logp"], chunk_tokens=8, backend="torch",
                                    softcap=1.5, logit_scale=1.3)
    loss.backward()
    true_grad = ref["weight"].grad
    fused_err = float((p["weight"].grad.double() - true_grad).abs().max())
    naive_err = float((ref16["weight"].grad.double() - true_grad).abs().max())
    assert fused_err <= 2 * naive_err + 1e-2 * float(true_grad.abs().max()), (fused_err, naive_err)
    assert abs(float(loss) - float(truth)) <= 2 * abs(float(naive16) - float(truth)) + 1e-2 * abs(float(truth))


@pytest.mark.parametrize("bad,error", [({"softcap": 0.0}, ValueError), ({"softcap": float("inf")}, ValueError),
                                       ({"logit_scale": -1.0}, ValueError), ({"softcap": "30"}, TypeError),
                                       ({"logit_scale": None}, TypeError)])
def test_bad_transform_options_raise(bad, error):
    case = make_head_case(dtype=torch.float32)
    name = next(iter(bad))
    with pytest.raises(error, match=name):
        fused_linear_logprobs(case["hidden"], case["weight"], case["target_ids"].clamp(min=0), **bad)
    with pytest.raises(error, match=name):
        FusedLinearLPOLoss(**bad)


@pytest.mark.parametrize("mode", ["fast", "low_memory"])
def test_nan_hidden_at_uncounted_tokens_reaches_nothing_with_a_cap(mode):
    """Packed input, masked tokens holding NaN hidden states: with a soft-cap the chain
    factor of those rows is NaN, but their gradient is exactly 0 and stays so (it used to be
    0 * NaN = NaN, spreading to grad-weight)."""
    case = scaled_case(torch.float64, seed=6, packed=True)
    masked = ~case["mask"]
    assert bool(masked.any())
    runs = []
    for fill in (float("nan"), 0.0):
        hidden = case["hidden"].clone()
        hidden[masked] = fill
        p = leaves({**case, "hidden": hidden})
        loss, _ = fused_linear_lpo_loss(p["hidden"], p["weight"], case["target_ids"], case["mask"],
                                        case["group_ids"], case["rewards"], bias=p["bias"],
                                        old_logp=case["old_logp"], cu_seqlens=case["cu_seqlens"], mode=mode,
                                        chunk_tokens=12, softcap=1.5, backend="torch", validate=False)
        loss.backward()
        runs.append(p)
    for name in ("hidden", "weight", "bias"):
        assert bool(torch.isfinite(runs[0][name].grad).all()), name
        assert_close(runs[0][name].grad, runs[1][name].grad, atol=1e-14, rtol=1e-12, name=name)


def test_grpo_entropy_bonus_through_row_blocks(monkeypatch):
    """The entropy-bonus gradient (fused_grpo's own row function, whose per-row factors ride
    as the "grad_logp" argument) gives the same result in small row x column blocks of the
    cap as in one block (that one is checked against TRL's head in test_trl_loss_parity)."""
    case = scaled_case(torch.float64, seed=4)
    targets, mask = case["target_ids"].clamp(min=0), case["mask"]
    advantages = case["rewards"].to(case["old_logp"].dtype)
    runs = []
    for columns, elements in ((16, 80), (4096, 1 << 22)):
        monkeypatch.setattr(logit_transform, "SLICE_COLUMNS", columns)
        monkeypatch.setattr(logit_transform, "SLICE_ELEMENTS", elements)
        p = leaves(case)
        loss, _ = fused_linear_grpo_loss(p["hidden"], p["weight"], targets, mask, advantages, bias=p["bias"],
                                         temperature=1.1, old_logp=case["old_logp"], chunk_tokens=12,
                                         backend="torch", softcap=2.0, logit_scale=1.7, loss_type="dapo",
                                         entropy_coef=0.3)
        loss.backward()
        runs.append((loss.detach(), p))
    assert_close(runs[0][0], runs[1][0], atol=1e-13, rtol=1e-12, name="loss")
    assert_head_grads_close(runs[0][1], runs[1][1], 1e-13, 1e-11)
