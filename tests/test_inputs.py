"""Every bad input of lpo_loss / grpo_loss / the options raises a ValueError or TypeError
whose message names the offending argument (spec section 3), before any math runs."""

from __future__ import annotations

import math

import pytest
import torch

from lpo_kernels import GRPOLoss, GRPOOptions, InputDTypeError, LPOLoss, LPOOptions, grpo_loss, lpo_loss
from lpo_kernels.inputs import check_listwise_inputs
from tests.utils import make_listwise_case

ERRORS = (ValueError, TypeError)


def good_case(packed=False):
    case = make_listwise_case(group_sizes=[3, 3], packed=packed, seed=0)
    case["logp"] = case["logp"].detach()
    return case


def call(case, **options):
    case = dict(case)
    return lpo_loss(case.pop("logp"), case.pop("old_logp"), case.pop("mask"), case.pop("group_ids"),
                    **case, backend="torch", **options)


def expect_error(name, fn, *args, **kwargs):
    with pytest.raises(ERRORS) as info:
        fn(*args, **kwargs)
    assert name in str(info.value), f"message {str(info.value)!r} does not name {name!r}"
    return info.value


def test_good_cases_pass():
    for packed in (False, True):
        loss, _ = call(good_case(packed))
        assert torch.isfinite(loss)


BAD_OPTIONS = [
    ("tau", dict(tau=0.0)), ("tau", dict(tau=-1.0)), ("tau", dict(tau=math.inf)),
    ("alpha", dict(alpha=0.0)), ("alpha", dict(alpha=1.0)), ("alpha", dict(alpha=1.5)),
    ("alpha", dict(alpha=-0.2)), ("alpha", dict(alpha=math.nan)),
    ("eps", dict(eps=-1e-6)), ("eps", dict(eps=1.0)), ("eps", dict(eps=2.0)),
    ("eps", dict(eps=math.nan)),
    ("clip_eps_low", dict(clip_eps_low=-0.1)), ("clip_eps_low", dict(clip_eps_low=1.5)),
    ("clip_eps_high", dict(clip_eps_high=-0.1)),
    ("target", dict(target="ppo")), ("target", dict(target=None)),
    ("divergence", dict(divergence="kl")), ("divergence", dict(divergence="Forward_KL")),
    ("seq_reduce", dict(seq_reduce="max")), ("clip", dict(clip="clip")), ("clip", dict(clip=True)),
    ("reduction", dict(reduction="avg")), ("backend", dict(backend="jax")),
    ("tau", dict(tau="1.0")), ("alpha", dict(alpha=True)), ("eps", dict(eps=torch.tensor(0.1))),
]


@pytest.mark.parametrize("name,options", BAD_OPTIONS, ids=[f"{n}={list(o.values())[0]!r}" for n, o in BAD_OPTIONS])
def test_bad_options(name, options):
    expect_error(name, call, good_case(), **options)
    expect_error(name, LPOLoss, **options)  # the module fails at construction
    if name != "backend":
        expect_error(name, LPOOptions, **options)


def bad_tensor_cases():
    """(argument named in the message, case modifier) pairs on a padded case."""
    B, T = 6, 7
    return [
        ("logp", lambda c: c.update(logp=c["logp"][0])),                              # 1-D without cu_seqlens
        ("logp", lambda c: c.update(logp=c["logp"][None])),                           # 3-D
        ("logp", lambda c: c.update(logp=c["logp"].to(torch.int64))),                 # integer log-probs
        ("logp", lambda c: c.update(logp=c["logp"].tolist())),                        # not a tensor
        ("old_logp", lambda c: c.update(old_logp=c["old_logp"][:, :-1])),
        ("old_logp", lambda c: c.update(old_logp=c["old_logp"].to(torch.int32))),
        ("old_logp", lambda c: c.update(old_logp=c["old_logp"].to(torch.complex64))),
        ("mask", lambda c: c.update(mask=c["mask"][:-1])),
        ("mask", lambda c: c.update(mask=c["mask"].tolist())),
        ("group_ids", lambda c: c.update(group_ids=c["group_ids"][:-1])),
        ("group_ids", lambda c: c.update(group_ids=c["group_ids"].float())),
        ("group_ids", lambda c: c.update(group_ids=c["group_ids"][:, None])),
        ("group_ids", lambda c: c.update(group_ids=None)),                            # and no group_size
        ("rewards", lambda c: c.update(rewards=c["rewards"][:-1])),
        ("rewards", lambda c: c.update(rewards=c["rewards"][:, None].expand(B, T))),
        ("rewards", lambda c: c.update(rewards=None)),
        ("rewards", lambda c: c.update(rewards=c["rewards"].tolist())),
        ("rewards", lambda c: c.__setitem__("rewards", torch.where(torch.arange(B) == 2, math.nan, c["rewards"]))),
        ("rewards", lambda c: c.__setitem__("rewards", torch.where(torch.arange(B) == 4, math.inf, c["rewards"]))),
        ("rewards", lambda c: c.__setitem__("rewards", torch.where(torch.arange(B) == 0, -math.inf, c["rewards"]))),
    ]


@pytest.mark.parametrize("index", range(len(bad_tensor_cases())))
def test_bad_tensors(index):
    name, modify = bad_tensor_cases()[index]
    case = good_case()
    modify(case)
    expect_error(name, call, case)


def test_dtype_errors_are_both_type_and_value_errors():
    case = good_case()
    case["logp"] = case["logp"].to(torch.int64)
    with pytest.raises(TypeError):
        call(case)
    with pytest.raises(ValueError):
        call(case)
    assert issubclass(InputDTypeError, TypeError) and issubclass(InputDTypeError, ValueError)


def test_missing_advantages():
    case = good_case()
    expect_error("advantages", call, case, target="advantages")
    case["advantages"] = case.pop("rewards")
    case["advantages"] = torch.where(torch.arange(6) == 1, math.nan, case["advantages"])
    expect_error("advantages", call, case, target="advantages")


def test_maxrl_needs_nonnegative_rewards():
    case = good_case()
    case["rewards"] = case["rewards"].abs() * torch.tensor([1, 1, -1, 1, 1, 1])
    expect_error("rewards", call, case, target="maxrl")
    case["rewards"] = case["rewards"].abs()
    assert torch.isfinite(call(case, target="maxrl")[0])


def test_integer_and_bool_rewards_are_accepted():
    case = good_case()
    for rewards in (torch.tensor([1, 0, 0, 1, 1, 0]), torch.tensor([True, False, False, True, True, True])):
        loss, _ = call(dict(case, rewards=rewards))
        want, _ = call(dict(case, rewards=rewards.double()))
        assert torch.isfinite(loss) and abs(float(loss) - float(want)) < 1e-6


@pytest.mark.parametrize("group_size,name", [(4, "group_size"), (0, "group_size"), (-3, "group_size"),
                                             (2.0, "group_size"), (True, "group_size")])
def test_bad_group_size(group_size, name):
    expect_error(name, call, good_case(), group_size=group_size)


def test_group_ids_inconsistent_with_group_size():
    case = good_case()
    case["group_ids"] = torch.tensor([0, 0, 1, 1, 1, 1])           # row 2 crosses a block
    expect_error("group_ids", call, case, group_size=3)
    case["group_ids"] = torch.tensor([5, 5, 5, 5, 5, 5])           # two blocks, one id
    expect_error("group_ids", call, case, group_size=3)
    case["group_ids"] = torch.tensor([9, 9, 9, 2, 2, 2])           # consistent, any ids
    assert torch.isfinite(call(case, group_size=3)[0])
    assert torch.isfinite(call(dict(case, group_ids=None), group_size=2)[0])


def test_bad_cu_seqlens():
    case = good_case(packed=True)
    cu = case["cu_seqlens"]
    N = case["logp"].shape[0]
    for bad in (cu[1:],                                   # does not start at 0 (and wrong count)
                torch.cat([cu[:-1], cu[-1:] + 1]),        # ends past N
                torch.cat([cu[:-1], cu[-1:] - 1]),        # ends before N
                torch.tensor([0, 4, 2, 9, 11, 14, N][:cu.numel()], dtype=torch.int32),  # decreasing
                cu.float(),                               # not integer
                cu[None],                                 # 2-D
                cu[:0]):                                  # empty
        bad_case = dict(case, cu_seqlens=bad)
        if bad.dim() == 1 and bad.numel() >= 1 and bad.numel() - 1 != case["group_ids"].numel():
            bad_case["group_ids"] = torch.arange(max(bad.numel() - 1, 0)) // 3
            bad_case["rewards"] = torch.randn(max(bad.numel() - 1, 0))
        expect_error("cu_seqlens", call, bad_case)
    # packed logp must be 1-D; group_ids counted against cu_seqlens
    expect_error("logp", call, dict(case, logp=case["logp"][None]))
    expect_error("group_ids", call, dict(case, group_ids=case["group_ids"][:-1]))


def test_validate_switch():
    """Value checks (host sync) can be switched off; shape checks cannot."""
    case = good_case()
    case["rewards"] = torch.where(torch.arange(6) == 2, math.nan, case["rewards"])
    expect_error("rewards", call, case, validate=True)
    call(case, validate=False)  # no check, no crash
    shaped = dict(good_case(), rewards=good_case()["rewards"][:-1])
    expect_error("rewards", call, shaped, validate=False)


def test_device_mismatch():
    case = good_case()
    try:
        meta = torch.empty(6, device="meta")
    except Exception:  # pragma: no cover
        pytest.skip("no meta device")
    for name in ("old_logp", "mask", "group_ids", "rewards"):
        bad = dict(case)
        bad[name] = case[name].to("meta")
        expect_error(name, call, bad)
    expect_error("cu_seqlens", call, dict(good_case(packed=True), cu_seqlens=good_case(packed=True)["cu_seqlens"].to("meta")))
    assert meta.device.type == "meta"


def test_check_listwise_inputs_normalises():
    case = good_case()
    batch = check_listwise_inputs(case["logp"], case["old_logp"], case["mask"], case["group_ids"],
                                  torch.tensor([1, 0, 0, 1, 1, 0]), None, options=LPOOptions())
    assert batch.rewards.dtype == torch.float32 and batch.n_seqs == 6 and not batch.packed
    assert batch.scores_source is batch.rewards


# --------------------------------------------------------------------------- GRPO
def grpo_case():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 5, generator=g)
    return dict(logp=logp, old_logp=logp + 0.1 * torch.randn(4, 5, generator=g),
                mask=torch.ones(4, 5, dtype=torch.bool), advantages=torch.randn(4, generator=g))


GRPO_BAD = [
    ("logp", lambda c: c.update(logp=c["logp"][0])),
    ("logp", lambda c: c.update(logp=c["logp"].long())),
    ("old_logp", lambda c: c.update(old_logp=c["old_logp"][:, 1:])),
    ("mask", lambda c: c.update(mask=c["mask"][1:])),
    ("advantages", lambda c: c.update(advantages=c["advantages"][1:])),
    ("advantages", lambda c: c.update(advantages=torch.randn(4, 4))),
    ("ref_logp", lambda c: c.update(ref_logp=c["logp"][:, 1:])),
    ("ref_logp", lambda c: c.update(beta=0.1)),                       # beta > 0 needs ref_logp
    ("beta", lambda c: c.update(beta=-0.1)),
    ("loss_type", lambda c: c.update(loss_type="ppo")),
    ("clip_eps_low", lambda c: c.update(clip_eps_low=1.2)),
    ("clip_eps_high", lambda c: c.update(clip_eps_high=-0.2)),
    ("max_completion_length", lambda c: c.update(max_completion_length=0)),
    ("max_completion_length", lambda c: c.update(max_completion_length=3.5)),
    ("advantages", lambda c: c.update(advantages=c["advantages"].to("meta"))),
]


@pytest.mark.parametrize("index", range(len(GRPO_BAD)))
def test_grpo_bad_inputs(index):
    name, modify = GRPO_BAD[index]
    case = grpo_case()
    modify(case)
    expect_error(name, lambda c: grpo_loss(c.pop("logp"), c.pop("old_logp"), c.pop("mask"),
                                           c.pop("advantages"), **c), case)


def test_grpo_options_fail_at_construction():
    expect_error("loss_type", GRPOOptions, loss_type="x")
    expect_error("loss_type", GRPOLoss, loss_type="x")
    expect_error("beta", GRPOLoss, beta=-1.0)
