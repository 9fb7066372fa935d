"""Groups split across calls: records of the other calls (group_stats=) must give exactly
the whole-batch loss and, summed over calls, the whole-batch gradient."""

from __future__ import annotations

import pytest
import torch

from lpo_kernels import lpo_loss
from lpo_kernels.fused_linear import fused_linear_lpo_group_stats, fused_linear_lpo_loss
from lpo_kernels.group_stats import (LPOGroupStats, combine_group_stats, lpo_group_stats,
                                     lpo_loss_with_group_stats)
from lpo_kernels.options import DIVERGENCES, TARGETS

from .test_fused_linear import leaves, make_head_case
from .utils import assert_close, make_listwise_case


def split_rows(n_seqs, n_parts, seed):
    """A random assignment of sequences to calls, every call non-empty; groups straddle calls."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_seqs, generator=g)
    return [torch.sort(order[i::n_parts]).values for i in range(n_parts)]


def padded_part(case, rows):
    out = dict(case)
    for key in ("logp", "old_logp", "mask", "group_ids", "rewards", "advantages"):
        if out.get(key) is not None:
            out[key] = case[key].detach()[rows]
    return out


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("target", TARGETS)
def test_split_groups_equal_whole_groups(divergence, target):
    case = make_listwise_case(n_groups=3, group_sizes=[4, 3, 5], shuffle=True, sparse_ids=True,
                              target=target, empty_prob=0.15, seed=TARGETS.index(target),
                              dtype=torch.float64)
    if target == "maxrl":
        case["rewards"] = case["rewards"].abs() + 0.1
    options = dict(divergence=divergence, target=target, clip="ppo", alpha=0.7)
    logp = case["logp"].detach().clone().requires_grad_()
    whole, whole_stats = lpo_loss(logp, case["old_logp"], case["mask"], case["group_ids"],
                                  case.get("rewards"), case.get("advantages"), backend="torch", **options)
    whole.backward()
    parts = split_rows(case["group_ids"].numel(), 3, seed=DIVERGENCES.index(divergence))
    records = []
    for rows in parts:
        p = padded_part(case, rows)
        records.append(lpo_group_stats(p["logp"], p["old_logp"], p["mask"], p["group_ids"],
                                       p.get("rewards"), p.get("advantages"), target=target))
    for i, rows in enumerate(parts):
        p = padded_part(case, rows)
        others = combine_group_stats([r for j, r in enumerate(records) if j != i])
        part_logp = p["logp"].clone().requires_grad_()
        loss, stats = lpo_loss_with_group_stats(
            part_logp, p["old_logp"], p["mask"], p["group_ids"], p.get("rewards"), p.get("advantages"),
            group_stats=others, **options)
        loss.backward()
        assert_close(loss, whole, atol=1e-12, rtol=1e-10, name="loss")
        assert_close(stats.n_groups, whole_stats.n_groups, atol=0, rtol=0, name="n_groups")
        assert_close(stats.divergence, whole_stats.divergence, atol=1e-12, rtol=1e-10, name="divergence")
        assert_close(stats.listwise_entropy, whole_stats.listwise_entropy, atol=1e-12, rtol=1e-10,
                     name="listwise_entropy")
        assert_close(part_logp.grad, logp.grad[rows], atol=1e-12, rtol=1e-10, name="grad")


@pytest.mark.parametrize("mode", ["fast", "low_memory"])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_split_groups_sum_to_whole(mode, packed):
    case = make_head_case(n_groups=3, seed=51, bias=True, shuffle=True, packed=packed)
    options = dict(divergence="reverse_kl", temperature=0.8, mode=mode, chunk_tokens=11, backend="torch")
    p = leaves(case)
    whole, _ = fused_linear_lpo_loss(p["hidden"], p["weight"], case["target_ids"], case["mask"],
                                     case["group_ids"], case["rewards"], bias=p["bias"],
                                     old_logp=case["old_logp"], cu_seqlens=case["cu_seqlens"], **options)
    whole.backward()
    n_seqs = case["group_ids"].numel()
    parts = split_rows(n_seqs, 2, seed=3)

    def part_inputs(rows):
        if not packed:
            keys = ("hidden", "target_ids", "mask", "old_logp")
            out = {k: case[k][rows] for k in keys}
            out["cu_seqlens"], out["tokens"] = None, rows
            return out
        cu = case["cu_seqlens"]
        tokens = torch.cat([torch.arange(int(cu[s]), int(cu[s + 1])) for s in rows.tolist()])
        lengths = (cu[1:] - cu[:-1])[rows]
        sub_cu = torch.zeros(rows.numel() + 1, dtype=torch.long)
        sub_cu[1:] = torch.cumsum(lengths, 0)
        out = {k: case[k][tokens] for k in ("hidden", "target_ids", "mask", "old_logp")}
        out["cu_seqlens"], out["tokens"] = sub_cu, tokens
        return out

    inputs = [part_inputs(rows) for rows in parts]
    records = [fused_linear_lpo_group_stats(
        x["hidden"], case["weight"], x["target_ids"].clamp(min=0), x["mask"], case["group_ids"][rows],
        case["rewards"][rows], bias=case["bias"], temperature=0.8, old_logp=x["old_logp"],
        cu_seqlens=x["cu_seqlens"], backend="torch") for x, rows in zip(inputs, parts)]
    weight_grad = torch.zeros_like(case["weight"])
    bias_grad = torch.zeros_like(case["bias"])
    for i, (x, rows) in enumerate(zip(inputs, parts)):
        q = leaves({**case, "hidden": x["hidden"]})
        loss, stats = fused_linear_lpo_loss(
            q["hidden"], q["weight"], x["target_ids"], x["mask"], case["group_ids"][rows],
            case["rewards"][rows], bias=q["bias"], old_logp=x["old_logp"], cu_seqlens=x["cu_seqlens"],
            group_stats=records[1 - i], **options)
        loss.backward()
        assert_close(loss, whole, atol=1e-12, rtol=1e-10, name="loss")
        assert_close(q["hidden"].grad, p["hidden"].grad[x["tokens"]], atol=1e-12, rtol=1e-10, name="grad hidden")
        weight_grad += q["weight"].grad
        bias_grad += q["bias"].grad
    assert_close(weight_grad, p["weight"].grad, atol=1e-12, rtol=1e-10, name="grad weight")
    assert_close(bias_grad, p["bias"].grad, atol=1e-12, rtol=1e-10, name="grad bias")


def test_records_and_errors():
    case = make_listwise_case(n_groups=2, seed=5, packed=True)
    rec = lpo_group_stats(case["logp"], case["old_logp"], case["mask"], case["group_ids"],
                          case["rewards"], cu_seqlens=case["cu_seqlens"])
    assert isinstance(rec, LPOGroupStats) and len(rec) == case["group_ids"].numel()
    assert not rec.scores.requires_grad
    both = combine_group_stats([rec, rec])
    assert len(both) == 2 * len(rec)
    with pytest.raises(ValueError, match="at least one"):
        combine_group_stats([])
    with pytest.raises(TypeError, match="parts"):
        combine_group_stats([rec, "x"])
    with pytest.raises(TypeError, match="group_stats"):
        lpo_loss_with_group_stats(case["logp"], case["old_logp"], None, case["group_ids"],
                                  case["rewards"], cu_seqlens=case["cu_seqlens"], group_stats={})
    with pytest.raises(ValueError, match="group_ids"):
        lpo_group_stats(case["logp"], case["old_logp"], None, None, case["rewards"],
                        cu_seqlens=case["cu_seqlens"])
    with pytest.raises(ValueError, match="reduction"):
        lpo_loss_with_group_stats(case["logp"], case["old_logp"], None, case["group_ids"],
                                  case["rewards"], cu_seqlens=case["cu_seqlens"], group_stats=rec,
                                  reduction="none")
