"""Split groups over torch.distributed: two CPU processes (gloo) each holding part of every
group, records all-gathered, must reproduce the single-process whole-batch result."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lpo_kernels.distributed import all_gather_group_stats
from lpo_kernels.fused_linear import fused_linear_lpo_group_stats, fused_linear_lpo_loss
from lpo_kernels.group_stats import LPOGroupStats

from .test_fused_linear import leaves, make_head_case
from .utils import assert_close

WORLD = 2
OPTIONS = dict(divergence="alpha", alpha=0.4, target="rloo", temperature=0.9,
               mode="fast", chunk_tokens=12, backend="torch")


def _case():
    return make_head_case(n_groups=3, group_size=4, seed=61, bias=True, shuffle=True)


def _rank_rows(rank):
    # rank r holds sequences r, r+2, ...: every group (shuffled ids) straddles both ranks
    return torch.arange(rank, 12, WORLD)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        case = _case()
        rows = _rank_rows(rank)
        x = {k: case[k][rows] for k in ("hidden", "target_ids", "mask", "old_logp", "group_ids", "rewards")}
        local = fused_linear_lpo_group_stats(
            x["hidden"], case["weight"], x["target_ids"], x["mask"], x["group_ids"], x["rewards"],
            bias=case["bias"], temperature=OPTIONS["temperature"], old_logp=x["old_logp"],
            target=OPTIONS["target"], backend="torch")
        others = all_gather_group_stats(local)
        everyone = all_gather_group_stats(local, exclude_self=False)
        q = leaves({**case, "hidden": x["hidden"]})
        loss, stats = fused_linear_lpo_loss(
            q["hidden"], q["weight"], x["target_ids"], x["mask"], x["group_ids"], x["rewards"],
            bias=q["bias"], old_logp=x["old_logp"], group_stats=others, **OPTIONS)
        loss.backward()
        torch.save(dict(loss=loss.detach(), n_groups=stats.n_groups, hidden=q["hidden"].grad,
                        weight=q["weight"].grad, bias=q["bias"].grad, n_others=len(others),
                        n_everyone=len(everyone)), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_ranks_equal_single_process():
    case = _case()
    ids = case["group_ids"]
    shared = set(ids[_rank_rows(0)].tolist()) & set(ids[_rank_rows(1)].tolist())
    assert shared, "the split must cut through groups"
    p = leaves(case)
    whole, whole_stats = fused_linear_lpo_loss(
        p["hidden"], p["weight"], case["target_ids"], case["mask"], case["group_ids"], case["rewards"],
        bias=p["bias"], old_logp=case["old_logp"], **OPTIONS)
    whole.backward()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    weight_grad = sum(r["weight"] for r in results)
    bias_grad = sum(r["bias"] for r in results)
    for rank, r in enumerate(results):
        assert r["n_others"] == 6 and r["n_everyone"] == 12
        assert_close(r["loss"], whole, atol=1e-12, rtol=1e-10, name=f"loss rank {rank}")
        assert_close(r["n_groups"], whole_stats.n_groups, atol=0, rtol=0, name="n_groups")
        assert_close(r["hidden"], p["hidden"].grad[_rank_rows(rank)], atol=1e-12, rtol=1e-10,
                     name=f"grad hidden rank {rank}")
    assert_close(weight_grad, p["weight"].grad, atol=1e-12, rtol=1e-10, name="grad weight")
    assert_close(bias_grad, p["bias"].grad, atol=1e-12, rtol=1e-10, name="grad bias")


def test_all_gather_needs_a_process_group():
    rec = LPOGroupStats(torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.zeros(1), torch.ones(1))
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="process group"):
        all_gather_group_stats(rec)
    with pytest.raises(TypeError, match="local"):
        all_gather_group_stats("records")
