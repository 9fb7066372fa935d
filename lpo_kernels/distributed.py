"""Combining split-group records (``LPOGroupStats``) over ``torch.distributed``.

Each rank computes its records with ``lpo_group_stats`` (or
``fused_linear_lpo_group_stats``); one all-gather gives every rank the records of the
others, which it passes as ``group_stats=``. Records are per sequence (B << tokens), so
the message is a few KiB. Ranks may hold different numbers of sequences: the sizes are
exchanged first, records padded to the largest, and the padding dropped after.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .group_stats import LPOGroupStats, combine_group_stats


def all_gather_group_stats(local: LPOGroupStats, group=None, *,
                           exclude_self: bool = True) -> LPOGroupStats:
    """Records of every rank in ``group`` (rank order), without this rank's own by default
    (the form ``group_stats=`` expects). A collective: every rank must call it."""
    if not isinstance(local, LPOGroupStats):
        raise TypeError(f"local must be an LPOGroupStats, got {type(local).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_gather_group_stats needs an initialised torch.distributed process group")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    device = local.scores.device
    dtype = torch.float64  # ids and token counts are exact integers in fp64 up to 2**53
    n = len(local)
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]  # one tiny sync: the message length
    longest = max(sizes)
    packed = torch.zeros(4, longest, dtype=dtype, device=device)
    packed[0, :n] = local.group_ids.to(dtype)
    packed[1, :n] = local.scores.to(dtype)
    packed[2, :n] = local.values.to(dtype)
    packed[3, :n] = local.n_tokens.to(dtype)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    parts = []
    for r, (block, k) in enumerate(zip(gathered, sizes)):
        if exclude_self and r == rank:
            continue
        parts.append(LPOGroupStats(block[0, :k].long(), block[1, :k].to(local.scores.dtype),
                                   block[2, :k].to(local.values.dtype),
                                   block[3, :k].to(local.n_tokens.dtype),
                                   local.seq_reduce, local.values_kind))
    if not parts:  # a world of one: no other records
        empty = packed[:, :0]
        return LPOGroupStats(empty[0].long(), empty[1].to(local.scores.dtype),
                             empty[2].to(local.values.dtype), empty[3].to(local.n_tokens.dtype),
                             local.seq_reduce, local.values_kind)
    return combine_group_stats(parts)
