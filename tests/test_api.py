"""The public surface: modules = functions, stats records, backend choice, autograd
plumbing, and the naive loss head (full logits) that fused kernels are compared with."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lpo_kernels
from lpo_kernels import GRPOStats, LPOLoss, LPOOptions, LPOStats, lpo_loss
from lpo_kernels.functional import listwise_forward_impl, resolve_backend
from lpo_kernels.reference import listwise_forward, naive_linear_logprobs, naive_linear_lpo_loss
from tests.utils import assert_close, call_lpo, make_listwise_case

F64 = torch.float64


def test_public_names():
    for name in ("lpo_loss", "grpo_loss", "LPOLoss", "GRPOLoss", "LPOOptions", "GRPOOptions",
                 "LPOStats", "GRPOStats", "InputDTypeError"):
        assert name in lpo_kernels.__all__ and hasattr(lpo_kernels, name)


@pytest.mark.parametrize("options", [
    {}, dict(divergence="js", reduction="sum", clip="ppo"),
    dict(target="softmax", tau=0.5, divergence="alpha", alpha=0.3, seq_reduce="sum", reduction="none"),
    dict(target="rloo", divergence="reverse_kl", clip="none", clip_eps_low=0.1, clip_eps_high=0.3),
])
@pytest.mark.parametrize("packed", [False, True])
def test_lpo_module_equals_function(options, packed):
    case = make_listwise_case(group_sizes=[4, 2, 3], packed=packed, empty_prob=0.1, seed=1)
    module = LPOLoss(backend="torch", **options)
    case_m = dict(case)
    logp = case_m.pop("logp").detach().clone().requires_grad_()
    loss, stats = module(logp, case_m.pop("old_logp"), case_m.pop("mask"), case_m.pop("group_ids"),
                         case_m.pop("rewards"), cu_seqlens=case_m.pop("cu_seqlens", None))
    loss.sum().backward()
    want, want_stats, _ = call_lpo(case, backend="torch", **options)
    assert torch.equal(loss.detach(), want)
    assert stats.to_dict() == want_stats.to_dict()
    assert isinstance(module, torch.nn.Module) and list(module.parameters()) == []
    for key, value in options.items():
        assert f"{key}={value!r}" in repr(module)


def test_lpo_module_group_size_and_advantages():
    case = make_listwise_case(group_sizes=[3, 3], target="advantages", seed=2)
    module = LPOLoss(target="advantages", group_size=3)
    loss, _ = module(case["logp"], case["old_logp"], case["mask"], None, advantages=case["advantages"])
    want, _ = lpo_loss(case["logp"], case["old_logp"], case["mask"], case["group_ids"],
                       advantages=case["advantages"], target="advantages")
    assert_close(loss, want, atol=0, rtol=0, name="group_size module")


def test_stats_records():
    case = make_listwise_case(group_sizes=[4, 3, 1], empty_prob=0.2, seed=3)
    _, stats, _ = call_lpo(case)
    assert isinstance(stats, LPOStats)
    names = [f.name for f in dataclasses.fields(LPOStats)]
    for required in ("divergence", "listwise_entropy", "target_entropy", "clip_fraction",
                     "mean_abs_coef", "n_groups", "n_seqs", "n_tokens"):
        assert required in names
    for name in names:
        value = getattr(stats, name)
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    logged = stats.to_dict(prefix="lpo/")
    assert set(logged) == {"lpo/" + n for n in names}
    assert all(isinstance(v, float) for v in logged.values())
    assert logged["lpo/n_tokens"] == float(case["mask"].sum())
    assert logged["lpo/n_seqs"] == float(case["mask"].any(-1).sum())
    assert 0 <= logged["lpo/clip_fraction"] <= 1
    assert logged["lpo/clip_fraction"] == pytest.approx(
        logged["lpo/clip_fraction_low"] + logged["lpo/clip_fraction_high"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.divergence = torch.tensor(0.0)
    assert {f.name for f in dataclasses.fields(GRPOStats)} >= {"kl", "clip_fraction", "n_tokens"}


def test_entropy_stats_match_definition():
    case = make_listwise_case(group_sizes=[4, 5], dtype=F64, seed=4)
    _, stats, _ = call_lpo(case, target="softmax", tau=0.5)
    ids, m = case["group_ids"], case["mask"].double()
    s = ((case["logp"].detach() - case["old_logp"]) * m).sum(-1) / m.sum(-1)
    H_p, H_w = [], []
    for gid in ids.unique():
        P = torch.softmax(s[ids == gid], 0)
        w = torch.softmax(case["rewards"][ids == gid] / 0.5, 0)
        H_p.append(-(P * P.log()).sum())
        H_w.append(-(w * w.log()).sum())
    assert_close(stats.listwise_entropy, torch.stack(H_p).mean(), atol=1e-14, rtol=1e-12, name="H(P)")
    assert_close(stats.target_entropy, torch.stack(H_w).mean(), atol=1e-14, rtol=1e-12, name="H(w*)")


def test_backend_choice(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    assert listwise_forward_impl("torch") is listwise_forward
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("numpy", torch.device("cpu"))
    # on CUDA tensors: the CUDA extension where built (fp32/bf16/fp16), else Triton
    from lpo_kernels import functional

    cuda = torch.device("cuda")
    for built, half_choice in ((True, "cuda"), (False, "triton")):
        monkeypatch.setattr(functional, "_cuda_extension_built", lambda built=built: built)
        assert resolve_backend("auto", cuda, torch.bfloat16) == half_choice
        assert resolve_backend("auto", cuda, torch.float32) == half_choice
        assert resolve_backend("auto", cuda, torch.float64) == "triton"
        assert resolve_backend("triton", cuda, torch.float32) == "triton"
    monkeypatch.undo()
    case = make_listwise_case(seed=5)
    auto, _, grad_auto = call_lpo(case)
    ref, _, grad_ref = call_lpo(case, backend="torch")
    assert torch.equal(auto, ref) and torch.equal(grad_auto, grad_ref)


def test_autograd_plumbing():
    case = make_listwise_case(group_sizes=[3, 4], seed=6)
    logp = case["logp"].detach().clone().requires_grad_()
    args = (case["old_logp"], case["mask"], case["group_ids"], case["rewards"])
    loss, _ = lpo_loss(logp, *args)
    assert loss.requires_grad and loss.dim() == 0
    # the loss composes with other terms: backward scales the token gradient
    (3.0 * loss + logp.sum() * 0).backward()
    _, _, grad = call_lpo(case)
    assert_close(logp.grad, 3.0 * grad, atol=1e-7, rtol=1e-6, name="3 * grad")
    # without grad: a plain detached value
    with torch.no_grad():
        value, _ = lpo_loss(logp, *args)
    assert not value.requires_grad and torch.equal(value, loss.detach())
    value, _ = lpo_loss(logp.detach(), *args)
    assert not value.requires_grad
    # inputs are not modified
    before = [a.clone() for a in args]
    lpo_loss(logp, *args)[0].backward()
    assert all(torch.equal(a, b) for a, b in zip(args, before))


def test_reduction_none_gradient_is_per_group():
    case = make_listwise_case(group_sizes=[3, 4, 2], dtype=F64, seed=7)
    logp = case["logp"].detach().clone().requires_grad_()
    per_group, _ = lpo_loss(logp, case["old_logp"], case["mask"], case["group_ids"], case["rewards"],
                            reduction="none")
    assert per_group.shape == (3,)
    per_group[1].backward()  # only group 1's rows get a gradient
    rows = case["group_ids"] == 1
    assert torch.all(logp.grad[~rows] == 0) and logp.grad[rows].abs().sum() > 0
    _, _, grad_sum = call_lpo(case, reduction="sum")
    logp.grad = None
    per_group, _ = lpo_loss(logp, case["old_logp"], case["mask"], case["group_ids"], case["rewards"],
                            reduction="none")
    per_group.sum().backward()
    assert_close(logp.grad, grad_sum, atol=1e-15, rtol=1e-13, name="sum of per-group = sum")


def test_options_record():
    options = LPOOptions(tau=2, alpha=0.25)
    assert isinstance(options.tau, float) and options.tau == 2.0
    low, high = LPOOptions(clip_eps_low=0.2, clip_eps_high=0.28).log_ratio_bounds
    assert low == pytest.approx(torch.log(torch.tensor(0.8, dtype=F64)).item())
    assert high == pytest.approx(torch.log(torch.tensor(1.28, dtype=F64)).item())
    assert LPOOptions(clip_eps_low=1.0).log_ratio_bounds[0] == -float("inf")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.tau = 3.0


# --------------------------------------------------------------------------- the naive loss head
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_naive_linear_logprobs(with_bias, temperature):
    g = torch.Generator().manual_seed(8)
    N, H, V = 13, 16, 37
    hidden = torch.randn(N, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64) * 0.5
    bias = torch.randn(V, generator=g, dtype=F64) if with_bias else None
    ids = torch.randint(0, V, (N,), generator=g)
    logp, entropy = naive_linear_logprobs(hidden, weight, ids, bias=bias, temperature=temperature,
                                          return_entropy=True)
    z = hidden @ weight.T
    if with_bias:
        z = z + bias
    z = z / temperature
    lse = torch.logsumexp(z, -1)
    assert_close(logp, z[torch.arange(N), ids] - lse, atol=1e-13, rtol=1e-12, name="logp")
    probs = torch.softmax(z, -1)
    assert_close(entropy, lse - (probs * z).sum(-1), atol=1e-12, rtol=1e-12, name="entropy")
    assert torch.all(logp <= 0) and torch.all(entropy >= 0) and torch.all(entropy <= torch.log(torch.tensor(V, dtype=F64)))
    # its gradient w.r.t. the logits is g_t (onehot - softmax) / T (spec section 4)
    hidden.requires_grad_()
    g_t = torch.randn(N, generator=g, dtype=F64)
    (grad_h,) = torch.autograd.grad((naive_linear_logprobs(hidden, weight, ids, bias=bias,
                                                           temperature=temperature) * g_t).sum(), hidden)
    onehot = torch.nn.functional.one_hot(ids, V).double()
    assert_close(grad_h, (g_t[:, None] * (onehot - probs) / temperature) @ weight, atol=1e-12,
                 rtol=1e-10, name="dlogp/dh")


def test_naive_linear_logprobs_half_inputs_compute_in_fp32():
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 3, 8, generator=g).to(torch.bfloat16)
    weight = torch.randn(50, 8, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 3), generator=g)
    logp = naive_linear_logprobs(hidden, weight, ids)
    assert logp.dtype == torch.float32 and logp.shape == (2, 3)
    want = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, ids[..., None])[..., 0]
    assert_close(logp, want, atol=1e-6, rtol=1e-6, name="bf16 head")


def test_naive_linear_lpo_loss():
    g = torch.Generator().manual_seed(10)
    B, T, H, V = 6, 5, 8, 19
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    group_ids = torch.arange(B) // 3
    rewards = torch.randn(B, generator=g, dtype=F64)
    old = naive_linear_logprobs(hidden, weight, ids) + 0.1 * torch.randn(B, T, generator=g, dtype=F64)
    loss, stats = naive_linear_lpo_loss(hidden, weight, ids, mask, group_ids, rewards, old_logp=old,
                                        temperature=0.8, divergence="js")
    want, want_stats = lpo_loss(naive_linear_logprobs(hidden, weight, ids, temperature=0.8), old, mask,
                                group_ids, rewards, divergence="js")
    assert_close(loss, want, atol=0, rtol=0, name="naive LPO")
    assert stats.to_dict() == want_stats.to_dict()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.uint8, torch.float32, torch.float16])
def test_mask_dtypes_are_equivalent(mask_dtype):
    case = make_listwise_case(group_sizes=[3, 4], dtype=F64, empty_prob=0.1, seed=11)
    loss, stats, grad = call_lpo(case)
    loss2, stats2, grad2 = call_lpo(dict(case, mask=case["mask"].to(mask_dtype)))
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    assert stats.to_dict() == stats2.to_dict()
