"""Issue 13 (reliability), the loss head and the API: one regression test (or a small group)
per item, named after it. Triton runs through its interpreter, the CUDA row kernels
through their CPU emulation (csrc/emulate, fixtures of tests/test_cuda.py)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lpo_kernels
from lpo_kernels import (LPOGroupStats, combine_group_stats, fused_linear_grpo_loss,
                         fused_linear_logprobs, fused_linear_lpo_group_stats,
                         fused_linear_lpo_loss, grpo_loss, lpo_group_stats, lpo_loss, reference)
from lpo_kernels import cuda as cuda_backend
from lpo_kernels import DoubleBackwardError, NonFiniteInputError
from lpo_kernels.group_stats import lpo_loss_with_group_stats
from lpo_kernels.ops.loss_head import logits_row_stats_torch, logits_row_stats_triton

from .test_cuda import emulated_module, on_emulator  # noqa: F401  (fixtures)
from .test_fused_linear import leaves, make_head_case
from .utils import assert_close

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "triton")
F64 = torch.float64


def _head_kwargs(case, **extra):
    rest = {k: v for k, v in case.items() if k not in ("hidden", "weight", "bias")}
    return {**rest, **extra}


def _fused(case, p, **options):
    kw = _head_kwargs(case)
    return fused_linear_lpo_loss(p["hidden"], p["weight"], kw.pop("target_ids"), kw.pop("mask"),
                                 kw.pop("group_ids"), bias=p["bias"], **kw, **options)


# --------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fast", "low_memory"])
def test_item2_zero_length_responses_give_zero_loss_and_zero_grads(backend, mode):
    B, H, V = 4, 8, 16
    for layout in ("padded", "packed"):
        if layout == "padded":  # [B, 0, H] with group_size: the reported reshape error
            hidden = torch.randn(B, 0, H, requires_grad=True)
            ids, mask, extra = torch.zeros(B, 0, dtype=torch.long), None, dict(group_size=2)
            group_ids = None
        else:  # packed, every response empty
            hidden = torch.randn(0, H, requires_grad=True)
            ids, mask = torch.zeros(0, dtype=torch.long), None
            extra = dict(cu_seqlens=torch.zeros(B + 1, dtype=torch.long))
            group_ids = torch.tensor([0, 0, 1, 1])
        weight = torch.randn(V, H, requires_grad=True)
        loss, stats, out = fused_linear_lpo_loss(
            hidden, weight, ids, mask, group_ids, torch.randn(B), mode=mode, backend=backend,
            return_logp=True, return_entropy=True, **extra)
        loss.backward()
        assert loss.item() == 0.0 and int(stats.n_groups) == 0 and int(stats.n_tokens) == 0
        assert hidden.grad.shape == hidden.shape
        assert torch.count_nonzero(weight.grad) == 0
        assert out.logp.shape == hidden.shape[:-1] and out.entropy.shape == hidden.shape[:-1]
    logp = fused_linear_logprobs(torch.randn(3, 0, H), torch.randn(V, H), torch.zeros(3, 0, dtype=torch.long),
                                 backend=backend)
    assert logp.shape == (3, 0)


# --------------------------------------------------------------------------- item 8
def _banned_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    N, H, V = 12, 8, 40
    hidden = torch.randn(N, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64)
    bias = torch.randn(V, generator=g, dtype=F64)
    bias[5:17] = -float("inf")  # banned tokens
    targets = torch.randint(17, V, (N,), generator=g)
    return hidden, weight, bias, targets


def test_item8_reference_entropy_counts_zero_log_zero_as_zero():
    hidden, weight, bias, targets = _banned_case()
    logp, entropy = reference.naive_linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True)
    allowed = torch.ones(40, dtype=torch.bool)
    allowed[5:17] = False
    z = (hidden @ weight.t() + bias)[:, allowed]  # the same distribution without the banned tokens
    lp = torch.log_softmax(z, -1)
    assert torch.isfinite(entropy).all()
    assert_close(entropy, -(lp.exp() * lp).sum(-1), atol=1e-12, rtol=1e-12, name="entropy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_item8_entropy_with_banned_tokens_is_finite(backend, dtype):
    hidden, weight, bias, targets = _banned_case(seed=1)
    want_logp, want_entropy = reference.naive_linear_logprobs(
        hidden.to(dtype).double(), weight.to(dtype).double(), targets, bias=bias.to(dtype).double(),
        return_entropy=True)
    logp, entropy = fused_linear_logprobs(hidden.to(dtype), weight.to(dtype), targets, bias=bias.to(dtype),
                                          return_entropy=True, backend=backend)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert torch.isfinite(entropy).all() and torch.isfinite(want_entropy).all()
    assert_close(entropy, want_entropy, atol=tol, rtol=tol, name="entropy")
    assert_close(logp, want_logp, atol=tol, rtol=tol, name="logp")


def test_item8_entropy_with_banned_tokens_on_the_emulated_cuda_kernel(on_emulator):
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(3, 1003, generator=g) * 3).to(dtype)
        logits[:, 100:700] = -float("inf")
        logits[1, 1:] = -float("inf")  # one allowed token: entropy 0
        targets = torch.tensor([0, 0, 900])
        _, logp, entropy = cuda_backend.logits_row_stats_cuda(logits, targets, 1.0, True)
        want = logits_row_stats_torch(logits.double(), targets, 1.0, True)
        assert torch.isfinite(entropy).all() and entropy[1].item() == 0.0
        assert_close(entropy, want[2], atol=1e-4, rtol=1e-5, name="entropy")
        assert_close(logp, want[1], atol=1e-4, rtol=1e-5, name="logp")


# --------------------------------------------------------------------------- item 9
@pytest.mark.parametrize("backend", BACKENDS)
def test_item9_fp16_logits_above_fp16_max_stay_finite_and_exact(backend):
    g = torch.Generator().manual_seed(3)
    case = make_head_case(seed=3, hidden_size=16, vocab=48, dtype=F64)
    case["hidden"] = (case["hidden"] * 30).half()
    case["weight"] = (torch.randn(48, 16, generator=g, dtype=F64) * 200).half()
    z = case["hidden"].double() @ case["weight"].double().t()
    assert z.abs().max() > 65504  # the fp16 buffer would overflow without the scaling
    targets = case["target_ids"].clamp(min=0)
    want = reference.naive_linear_logprobs(case["hidden"].double(), case["weight"].double(), targets)
    logp = fused_linear_logprobs(case["hidden"], case["weight"], targets, backend=backend)
    # fp16 stores logits with a relative error of 2^-11: compare at that scale
    assert_close(logp, want, atol=2 ** -10 * z.abs().max().item(), rtol=0, name="logp")
    p = leaves(case)
    case["old_logp"] = (want + 0.1 * torch.randn(want.shape, generator=g, dtype=F64)).float()
    loss, stats = _fused(case, p, backend=backend, group_size=4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p["hidden"].grad).all() and torch.isfinite(p["weight"].grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_item9_fp16_storage_scale_keeps_normal_range_parity(backend):
    case = make_head_case(seed=4, dtype=F64, bias=True)
    want, _, pw = _naive(case)
    half = dict(case, hidden=case["hidden"].half(), weight=case["weight"].half(), bias=case["bias"].half())
    p = leaves(half)
    loss, _ = _fused(half, p, backend=backend, group_size=4)
    loss.backward()
    assert_close(loss, want, atol=2e-3, rtol=2e-3, name="loss")
    assert_close(p["weight"].grad, pw["weight"].grad, atol=2e-3, rtol=2e-2, name="grad weight")
    assert_close(p["bias"].grad, pw["bias"].grad, atol=2e-3, rtol=2e-2, name="grad bias")
    assert_close(p["hidden"].grad, pw["hidden"].grad, atol=2e-3, rtol=2e-2, name="grad hidden")
    # every caller of the scaled buffer: log-probs backward and the GRPO head
    ids = case["target_ids"].clamp(min=0)
    for fused, naive in ((lambda q: fused_linear_logprobs(q["hidden"], q["weight"], ids, bias=q["bias"],
                                                          backend=backend),
                          lambda q: reference.naive_linear_logprobs(q["hidden"], q["weight"], ids, bias=q["bias"])),
                         (lambda q: fused_linear_grpo_loss(q["hidden"], q["weight"], ids, case["mask"],
                                                           case["rewards"], bias=q["bias"], backend=backend)[0],
                          lambda q: reference.naive_linear_grpo_loss(q["hidden"], q["weight"], ids, case["mask"],
                                                                     case["rewards"], bias=q["bias"])[0])):
        p, q = leaves(half), leaves(case)
        for out in (fused(p), naive(q)):
            (out * case["mask"]).sum().backward() if out.dim() else out.backward()
        for name in ("hidden", "weight", "bias"):
            assert_close(p[name].grad, q[name].grad, atol=5e-3, rtol=2e-2, name=f"grad {name}")


def _naive(case, **options):
    p = leaves(case)
    kw = _head_kwargs(case)
    loss, stats = reference.naive_linear_lpo_loss(
        p["hidden"], p["weight"], kw.pop("target_ids").clamp(min=0), kw.pop("mask"), kw.pop("group_ids"),
        bias=p["bias"], **kw, **options)
    loss.backward()
    return loss.detach(), stats, p


# --------------------------------------------------------------------------- item 10
def _listwise_args():
    g = torch.Generator().manual_seed(5)
    return dict(logp=torch.randn(4, 3, generator=g), old_logp=torch.randn(4, 3, generator=g),
                mask=torch.ones(4, 3), group_ids=torch.tensor([0, 0, 1, 1]),
                rewards=torch.randn(4, generator=g))


def _poisoned(x, value, where=None):
    x = x.clone()
    x[(0,) * x.dim() if where is None else where] = value
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["logp", "old_logp", "mask", "rewards"])
def test_item10_validate_rejects_non_finite_listwise_inputs(name, value):
    args = _listwise_args()
    args[name] = _poisoned(args[name], value, (0,) if name == "rewards" else (0, 0))
    with pytest.raises(ValueError, match=name):
        lpo_loss(**args, validate=True)
    lpo_loss(**args, validate=False)  # no value check (and no host sync) when not validating
    adv = dict(_listwise_args(), advantages=_poisoned(torch.randn(4), value, (1,)), rewards=None)
    with pytest.raises(NonFiniteInputError, match="advantages"):
        lpo_loss(**adv, target="advantages", validate=True)


def test_item10_values_at_tokens_that_do_not_count_are_not_checked():
    args = _listwise_args()
    args["mask"][0, 2] = 0
    args["logp"][0, 2] = -float("inf")  # e.g. a banned pad token
    args["old_logp"][0, 2] = float("nan")
    loss, _ = lpo_loss(**args, validate=True)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["hidden", "weight", "bias", "old_logp", "mask"])
def test_item10_validate_rejects_non_finite_head_inputs(name):
    case = make_head_case(seed=6, bias=True, dtype=torch.float32)
    clean_bias = case["bias"]
    case[name] = _poisoned(case[name].float() if name == "mask" else case[name], float("nan"))
    p = leaves(case)
    with pytest.raises(NonFiniteInputError, match=name):
        _fused(case, p, validate=True)
    if name == "bias":  # -inf bans a token: legal; +inf is not
        case["bias"] = _poisoned(clean_bias, -float("inf"), (3,))
        _fused(case, leaves(case), validate=True)
        case["bias"] = _poisoned(case["bias"], float("inf"), (3,))
        with pytest.raises(NonFiniteInputError, match="bias"):
            _fused(case, leaves(case), validate=True)


@pytest.mark.parametrize("name", ["logp", "old_logp", "ref_logp", "advantages", "mask"])
def test_item10_grpo_losses_reject_non_finite_inputs(name):
    g = torch.Generator().manual_seed(7)
    args = dict(logp=torch.randn(4, 3, generator=g), old_logp=torch.randn(4, 3, generator=g),
                mask=torch.ones(4, 3), advantages=torch.randn(4, generator=g),
                ref_logp=torch.randn(4, 3, generator=g))
    args[name] = _poisoned(args[name], float("nan"), (1,) if name == "advantages" else (1, 1))
    with pytest.raises(ValueError, match=name):
        grpo_loss(args["logp"], args["old_logp"], args["mask"], args["advantages"], ref_logp=args["ref_logp"])
    if name == "logp":
        return
    case = make_head_case(seed=7, dtype=torch.float32)
    head = dict(mask=case["mask"].float(), advantages=torch.randn(8, generator=g),
                old_logp=case["old_logp"], ref_logp=case["old_logp"] + 0.1)
    head[name] = _poisoned(head[name], float("nan"), (1,) if name == "advantages" else (1, 1))
    ids = case["target_ids"].clamp(min=0)
    with pytest.raises(ValueError, match=name):
        fused_linear_grpo_loss(case["hidden"], case["weight"], ids, head["mask"], head["advantages"],
                               old_logp=head["old_logp"], ref_logp=head["ref_logp"])
    hidden = _poisoned(case["hidden"], float("inf"), (0, 0, 0))
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_grpo_loss(hidden, case["weight"], ids, case["mask"], torch.randn(8))


@pytest.mark.parametrize("field", ["scores", "values", "n_tokens"])
def test_item10_validate_rejects_non_finite_group_stats(field):
    args = _listwise_args()
    rec = lpo_group_stats(args["logp"], args["old_logp"], args["mask"], args["group_ids"] + 10, args["rewards"])
    rec = LPOGroupStats(**{**rec.__dict__, field: _poisoned(getattr(rec, field), float("nan"), (2,))})
    with pytest.raises(NonFiniteInputError, match=f"group_stats.{field}"):
        lpo_loss_with_group_stats(**args, group_stats=rec, validate=True)


# --------------------------------------------------------------------------- item 11
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fast", "low_memory"])
@pytest.mark.parametrize("packed", [False, True])  # padded input also runs padding-free
def test_item11_nan_hidden_at_padding_contributes_exactly_nothing(backend, mode, packed):
    case = make_head_case(seed=8, bias=True, dtype=torch.float32, packed=packed)
    pad = (~case["mask"]).nonzero()
    assert len(pad) >= 2
    extra = {} if packed else dict(group_size=4)
    clean = leaves(case)
    loss, _ = _fused(case, clean, backend=backend, mode=mode, **extra)
    loss.backward()
    poisoned = dict(case, hidden=case["hidden"].clone())
    poisoned["hidden"][tuple(pad[0])] = float("nan")
    poisoned["hidden"][tuple(pad[1])] = float("inf")
    p = leaves(poisoned)
    loss2, _ = _fused(poisoned, p, backend=backend, mode=mode, validate=True, **extra)
    loss2.backward()
    assert torch.equal(loss, loss2)
    for name in ("weight", "bias"):
        assert torch.equal(p[name].grad, clean[name].grad), name
    counted = case["mask"]
    assert torch.equal(p["hidden"].grad[counted], clean["hidden"].grad[counted])
    assert torch.count_nonzero(p["hidden"].grad[~counted]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_item11_logprobs_backward_ignores_nan_rows_with_zero_gradient(backend):
    case = make_head_case(seed=9, dtype=torch.float32)
    hidden = case["hidden"].clone()
    hidden[~case["mask"]] = float("nan")
    p = leaves(dict(case, hidden=hidden))
    logp = fused_linear_logprobs(p["hidden"], p["weight"], case["target_ids"].clamp(min=0), backend=backend)
    (logp * case["mask"]).sum().backward()  # the usual masked use: 0 gradient at padding
    q = leaves(case)
    want = reference.naive_linear_logprobs(q["hidden"], q["weight"], case["target_ids"].clamp(min=0))
    (want * case["mask"]).sum().backward()
    assert torch.isfinite(p["weight"].grad).all()
    assert_close(p["weight"].grad, q["weight"].grad, atol=1e-5, rtol=1e-5, name="grad weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_item11_grpo_head_ignores_nan_hidden_at_padding(backend):
    case = make_head_case(seed=18, bias=True, dtype=torch.float32)
    ids, adv = case["target_ids"].clamp(min=0), torch.randn(8, generator=torch.Generator().manual_seed(18))
    poisoned = case["hidden"].clone()
    poisoned[~case["mask"]] = float("nan")
    grads = []
    for hidden in (case["hidden"], poisoned):
        p = leaves(dict(case, hidden=hidden))
        loss, _ = fused_linear_grpo_loss(p["hidden"], p["weight"], ids, case["mask"], adv, bias=p["bias"],
                                         old_logp=case["old_logp"], backend=backend, validate=True)
        loss.backward()
        grads.append(p)
    for name in ("weight", "bias"):
        assert torch.equal(grads[0][name].grad, grads[1][name].grad), name
    assert torch.equal(grads[0]["hidden"].grad[case["mask"]], grads[1]["hidden"].grad[case["mask"]])


def test_item11_emulated_cuda_grad_kernel_writes_zeros_over_nan_rows(on_emulator):
    logits = torch.randn(4, 515)
    logits[1] = float("nan")
    lse = torch.logsumexp(logits, -1)
    grad = torch.tensor([0.5, 0.0, -1.0, 0.0])
    cuda_backend.logits_grad_inplace_cuda(logits, torch.tensor([1, 2, 3, 4]), lse, grad, 1.0)
    assert torch.count_nonzero(logits[1]) == 0 and torch.count_nonzero(logits[3]) == 0
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------- item 12
def _records(seq_reduce="mean", target="grpo"):
    args = _listwise_args()
    if target == "advantages":
        return lpo_group_stats(args["logp"], args["old_logp"], args["mask"], args["group_ids"], None,
                               args["rewards"], target=target, seq_reduce=seq_reduce)
    return lpo_group_stats(args["logp"], args["old_logp"], args["mask"], args["group_ids"], args["rewards"],
                           target=target, seq_reduce=seq_reduce)


def test_item12_records_reject_bad_ids_and_counts():
    rec = _records()
    with pytest.raises(ValueError, match="group_ids must be 1-D"):
        LPOGroupStats(rec.group_ids[:, None], rec.scores, rec.values, rec.n_tokens)
    with pytest.raises(TypeError, match="group_ids must be an integer tensor"):
        LPOGroupStats(rec.group_ids.double() + 0.5, rec.scores, rec.values, rec.n_tokens)
    with pytest.raises(ValueError, match="n_tokens has 3 entries"):
        LPOGroupStats(rec.group_ids, rec.scores, rec.values, rec.n_tokens[:3])
    with pytest.raises(TypeError, match="parts must be a sequence"):
        combine_group_stats(rec)
    negative = LPOGroupStats(rec.group_ids, rec.scores, rec.values, -rec.n_tokens)
    with pytest.raises(ValueError, match="n_tokens must be >= 0"):
        lpo_loss_with_group_stats(**_listwise_args(), group_stats=negative, validate=True)


def test_item12_records_carry_what_built_them():
    mean, summed, adv = _records("mean"), _records("sum"), _records(target="advantages")
    assert (mean.seq_reduce, mean.values_kind) == ("mean", "rewards")
    assert (summed.seq_reduce, adv.values_kind) == ("sum", "advantages")
    part = mean[torch.tensor([0, 2])]
    assert len(part) == 2 and (part.seq_reduce, part.values_kind) == ("mean", "rewards")
    assert torch.equal(part.scores, mean.scores[[0, 2]])
    both = combine_group_stats([mean, mean.to(dtype=F64)])
    assert (both.seq_reduce, both.values_kind) == ("mean", "rewards")
    with pytest.raises(ValueError, match="different seq_reduce"):
        combine_group_stats([mean, summed])
    with pytest.raises(ValueError, match="different values_kind"):
        combine_group_stats([mean, adv])
    args = _listwise_args()
    with pytest.raises(ValueError, match="seq_reduce='sum'"):
        lpo_loss_with_group_stats(**args, group_stats=summed)
    with pytest.raises(ValueError, match="carry rewards but target='advantages'"):
        lpo_loss_with_group_stats(**dict(args, rewards=None), advantages=torch.randn(4),
                                  target="advantages", group_stats=mean)
    case = make_head_case(seed=10, dtype=torch.float32)
    head_rec = fused_linear_lpo_group_stats(case["hidden"], case["weight"], case["target_ids"].clamp(min=0),
                                            case["mask"], case["group_ids"] + 100, case["rewards"],
                                            old_logp=case["old_logp"], seq_reduce="sum")
    with pytest.raises(ValueError, match="seq_reduce"):
        _fused(case, leaves(case), group_stats=head_rec)
    # hand-built records (kinds unknown) keep working, and mix with any
    bare = LPOGroupStats(mean.group_ids + 10, mean.scores, mean.values, mean.n_tokens)
    loss, _ = lpo_loss_with_group_stats(**args, group_stats=combine_group_stats([bare, summed]), seq_reduce="sum")
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- item 13
def test_item13_create_graph_keeps_first_order_and_raises_on_double_backward():
    case = make_head_case(seed=11, dtype=F64)
    p = leaves(case)
    loss, _ = _fused(case, p, group_size=4)
    gh, gw = torch.autograd.grad(loss, (p["hidden"], p["weight"]), create_graph=True)
    q = leaves(case)
    _fused(case, q, group_size=4)[0].backward()
    assert torch.equal(gh.detach(), q["hidden"].grad) and torch.equal(gw.detach(), q["weight"].grad)
    with pytest.raises(DoubleBackwardError, match="fused loss head supports first-order"):
        (loss + gw.square().sum()).backward()

    ids = case["target_ids"].clamp(min=0)
    r = leaves(case)
    logp = fused_linear_logprobs(r["hidden"], r["weight"], ids)  # failed with mm(out=) before
    (gh,) = torch.autograd.grad((logp * case["mask"]).sum(), r["hidden"], create_graph=True)
    s = leaves(case)
    want = reference.naive_linear_logprobs(s["hidden"], s["weight"], ids)
    (want_gh,) = torch.autograd.grad((want * case["mask"]).sum(), s["hidden"])
    assert_close(gh, want_gh, atol=1e-12, rtol=1e-10, name="grad hidden")
    with pytest.raises(DoubleBackwardError, match="fused_linear_logprobs"):
        gh.square().sum().backward()

    args = _listwise_args()
    logp = args.pop("logp").requires_grad_()
    loss, _ = lpo_loss(logp, **args)
    (g,) = torch.autograd.grad(loss, logp, create_graph=True)
    with pytest.raises(DoubleBackwardError, match="lpo_loss"):
        (loss + g.square().sum()).backward()

    grpo_case = make_head_case(seed=12, dtype=F64)
    t = leaves(grpo_case)
    loss, _ = fused_linear_grpo_loss(t["hidden"], t["weight"], ids, grpo_case["mask"], torch.randn(8, dtype=F64))
    (gw,) = torch.autograd.grad(loss, t["weight"], create_graph=True)
    with pytest.raises(DoubleBackwardError):
        gw.sum().backward()


# --------------------------------------------------------------------------- item 14
def _public_calls():
    a = _listwise_args()
    case = make_head_case(seed=13, dtype=torch.float32)
    ids = case["target_ids"].clamp(min=0)
    head = dict(hidden=case["hidden"], weight=case["weight"], target_ids=ids, mask=case["mask"],
                group_ids=case["group_ids"], rewards=case["rewards"])
    rec = _records()
    return {
        "lpo_loss": (lpo_loss, a, {}),
        "grpo_loss": (grpo_loss, dict(logp=a["logp"], old_logp=a["old_logp"], mask=a["mask"],
                                      advantages=a["rewards"]), {"ref_logp": a["logp"]}),
        "fused_linear_lpo_loss": (fused_linear_lpo_loss, head, {"bias": torch.zeros(50), "old_logp": case["old_logp"]}),
        "fused_linear_logprobs": (fused_linear_logprobs, dict(hidden=case["hidden"], weight=case["weight"],
                                                              target_ids=ids), {"bias": torch.zeros(50)}),
        "fused_linear_grpo_loss": (fused_linear_grpo_loss, dict(hidden=case["hidden"], weight=case["weight"],
                                                                target_ids=ids, mask=case["mask"],
                                                                advantages=case["rewards"]),
                                   {"bias": torch.zeros(50), "old_logp": case["old_logp"]}),
        "fused_linear_lpo_group_stats": (fused_linear_lpo_group_stats, head, {"old_logp": case["old_logp"]}),
        "lpo_group_stats": (lpo_group_stats, a, {}),
        "lpo_loss_with_group_stats": (lpo_loss_with_group_stats, dict(a, group_ids=a["group_ids"] + 10),
                                      {"group_stats": rec}),
    }


@pytest.mark.parametrize("function", list(_public_calls()))
def test_item14_non_tensor_inputs_raise_type_error_naming_the_argument(function):
    fn, positional, keywords = _public_calls()[function]
    fn(*positional.values(), **keywords)  # the well-formed call works
    for name in [*positional, *keywords]:
        pos, kw = dict(positional), dict(keywords)
        target = pos if name in pos else kw
        target[name] = target[name].tolist() if isinstance(target[name], torch.Tensor) else [1.0]
        with pytest.raises(TypeError, match=name):
            fn(*pos.values(), **kw)


# --------------------------------------------------------------------------- item 15
def test_item15_triton_backend_on_cpu_without_interpreter_says_what_to_do():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, lpo_kernels\n"
            "for call in (lambda: lpo_kernels.lpo_loss(torch.randn(2, 3), None, None, torch.tensor([0, 0]),"
            " torch.randn(2), backend='triton'),\n"
            "             lambda: lpo_kernels.fused_linear_logprobs(torch.randn(2, 4), torch.randn(5, 4),"
            " torch.tensor([1, 2]), backend='triton')):\n"
            "    try:\n        call()\n    except ValueError as e:\n        print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERR")]
    assert len(lines) == 2, out.stdout + out.stderr[-2000:]
    for line in lines:
        assert "TRITON_INTERPRET=1" in line and "backend='torch'" in line


# --------------------------------------------------------------------------- item 16
def test_item16_negative_or_nan_mask_weights_are_rejected_when_validating():
    args = _listwise_args()
    args["mask"][0, :2] = torch.tensor([1.0, -1.0])  # weights that cancel
    with pytest.raises(ValueError, match="mask must be >= 0"):
        lpo_loss(**args, validate=True)
    args["mask"][0, :2] = torch.tensor([1.0, float("nan")])
    with pytest.raises(NonFiniteInputError, match="mask"):
        lpo_loss(**args, validate=True)
    case = make_head_case(seed=14, dtype=torch.float32)
    case["mask"] = case["mask"].float()
    case["mask"][0, 0] = -0.5
    with pytest.raises(ValueError, match="mask must be >= 0"):
        _fused(case, leaves(case), validate=True)


def _weighted_case():
    g = torch.Generator().manual_seed(15)
    logp = -torch.rand(8, 5, generator=g) * 3
    mask = torch.tensor([[1.0, 0.5, 2.0, 0.0, 0.0]] * 4 + [[0.0] * 5] + [[0.25, 0.0, 1.0, 3.0, 0.0]] * 3)
    return dict(logp=logp, old_logp=logp + 0.2 * torch.randn(8, 5, generator=g), mask=mask,
                group_ids=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), rewards=torch.randn(8, generator=g))


def _run_weighted(backend):
    args = _weighted_case()
    logp = args.pop("logp").clone().requires_grad_()
    loss, stats = lpo_loss(logp, **args, backend=backend, divergence="reverse_kl", validate=True)
    loss.backward()
    return loss.detach(), stats, logp.grad


def test_item16_token_weights_agree_across_backends(on_emulator):
    want = _run_weighted("torch")
    assert int(want[1].n_tokens) == 21 and int(want[1].n_seqs) == 7  # tokens with weight != 0
    for backend in ("triton", "cuda"):  # "cuda": the kernels compiled for the CPU
        loss, stats, grad = _run_weighted(backend)
        assert_close(loss, want[0], atol=1e-6, rtol=1e-5, name=f"{backend} loss")
        assert_close(grad, want[2], atol=1e-7, rtol=1e-5, name=f"{backend} grad")
        for field in ("n_tokens", "n_seqs", "n_groups"):
            assert int(getattr(stats, field)) == int(getattr(want[1], field)), (backend, field)
        assert_close(stats.clip_fraction, want[1].clip_fraction, atol=1e-6, rtol=0, name="clip fraction")


# --------------------------------------------------------------------------- item 17
def test_item17_torch_entropy_is_renormalised():
    g = torch.Generator().manual_seed(16)
    logits = torch.randn(64, 32000, generator=g) * 16
    targets = torch.randint(0, 32000, (64,), generator=g)
    lp = torch.log_softmax(logits.double(), -1)
    want = -(lp.exp() * lp).sum(-1)
    _, _, entropy = logits_row_stats_torch(logits, targets, 1.0, True)
    assert (entropy.double() - want).abs().max() < 2e-6  # was 2.7e-4 before renormalising
    _, _, entropy_t = logits_row_stats_triton(logits[:16, :4000], targets[:16] % 4000, 1.0, True)
    lp = torch.log_softmax(logits[:16, :4000].double(), -1)
    assert (entropy_t.double() + (lp.exp() * lp).sum(-1)).abs().max() < 5e-5


def test_item17_cpu_grad_weight_accumulates_chunks_in_fp32():
    from lpo_kernels.head_chunk import Grads as _Grads, Head as _Head

    g = torch.Generator().manual_seed(17)
    n_chunks, rows, H, V = 16, 8, 32, 40
    hidden = torch.randn(n_chunks * rows, H, generator=g).bfloat16()
    weight = torch.randn(V, H, generator=g).bfloat16()
    head = _Head(hidden, weight, None, torch.zeros(n_chunks * rows, dtype=torch.long), (n_chunks * rows,), 1.0,
                 "torch", torch.float32)
    grads = _Grads(head, False, True, False, grad_weight_fp32=True)
    want = torch.zeros(V, H, dtype=F64)
    for c in range(n_chunks):
        gl = torch.randn(rows, V, generator=g).bfloat16()
        sl = slice(c * rows, (c + 1) * rows)
        grads.add_chunk(gl, head, sl, torch.ones(rows))
        want += gl.double().t() @ hidden[sl].double()
    err = (grads.weight.double() - want).abs().max() / want.abs().max()
    assert err < 1e-5, err  # a bf16 rounding per chunk gives ~4e-3


# --------------------------------------------------------------------------- item 18
def test_item18_readme_commands_install_what_the_tests_need():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^    (\S.*)$", readme, flags=re.M)
    install = next(b for b in blocks if "pip install" in b and "lpo_kernels.demo" in b)
    test = next(b for b in blocks if "pytest" in b and "pip" not in b)
    assert test.strip() == "python3 -m pytest -q"
    assert re.search(r"\bpytest\b", install), install  # the test command's own dependency
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == test.strip()
    assert any(re.search(r"\bpytest\b", line) and "pip" in line for line in ci)


# --------------------------------------------------------------------------- item 20
def _package_imports(module: str) -> set[str]:
    """lpo_kernels modules that ``module`` imports (at module level or inside functions)."""
    tree = ast.parse((ROOT / "lpo_kernels" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:  # from . import x
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lpo_kernels."):
            found.add(node.module.split(".")[1])
    return {m for m in found if (ROOT / "lpo_kernels" / f"{m}.py").is_file()}


def test_item20_reference_does_not_import_functional():
    reached, todo = set(), ["reference"]
    while todo:  # every module reference.py reaches, directly or through others
        for m in _package_imports(todo.pop()) - reached:
            reached.add(m)
            todo.append(m)
    assert "functional" not in reached, reached
    assert "functional" in _package_imports("fused_linear")  # the check sees real imports
    assert lpo_kernels.reference is reference
