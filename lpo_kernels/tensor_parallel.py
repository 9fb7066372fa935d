"""Vocabulary-parallel loss head: the fused head on an LM head sharded by vocabulary over a
tensor-parallel group (Megatron's ``ColumnParallelLinear`` / vocab-parallel cross-entropy
layout), without gathering the weight or the logits.

Layout (``tp_group=`` on the fused-head functions): ``weight`` ``[V_r, H]`` (and ``bias``
``[V_r]``) is this rank's contiguous slice of the vocabulary; the slices lie in rank order
and may differ in size. ``hidden``, ``target_ids`` (global ids), mask, rewards, group ids
and every option are the same on every rank. ``vocab_start`` (the first global id of this
rank's slice) is all-gathered from the slice sizes once per call, or given by the caller
(e.g. Megatron's ``VocabUtility``), which saves that collective.

Math, per chunk of tokens (spec section 4, ``z = logits / T``): each rank runs the ordinary
row kernel on its slice of the logits with the target shifted into its slice (-1 where
another rank owns it: no one-hot, logp 0) and gets, per token, its slice's log-sum-exp
``lse_r``, the target's z if it owns the target (else 0), an owns-the-target flag and, for
the entropy, ``E_r[z] = lse_r - entropy_r`` (the softmax-weighted mean of z over the
slice). One all-gather of these 3 (4 with entropy) numbers per token gives every rank

    lse     = logsumexp_r lse_r
    logp    = z_target - lse                                 (0 if no rank owns the target)
    entropy = lse - sum_r exp(lse_r - lse) * E_r[z]

reduced in rank order from the same gathered numbers, so they are bitwise identical on
every rank. The in-place logits-gradient kernel then runs with the *global* lse and the
shifted target: ``(onehot - softmax) * g / T`` restricted to this slice, no communication.
grad-weight/bias are then exactly this slice's rows of the full gradient; grad-hidden is
this slice's part ``dlogits_r @ W_r``, summed over the group by one all-reduce in the
backward (the autograd Function ``_CopyToVocabParallel``: identity forward, all-reduce
backward, as Megatron's ``copy_to_tensor_model_parallel_region`` does for the input of a
column-parallel linear). The fused head forms its gradients in the forward but the sum is
taken in the backward, after the ``grad_output`` scaling: no collective when no backward
runs, and ranks that scale their losses differently get Megatron's sum of their parts.

Communication per call, ``n`` tokens, ``W`` ranks, ``c`` chunks of the row-stats pass,
``k`` = 3 (4 with entropy) numbers in the log-prob dtype (fp32; fp64 for fp64 input):
``c`` all-gathers of ``k·n_chunk`` numbers per rank (each rank receives ``W·k·n`` numbers
in all, e.g. 8·3·8192·4 B = 786 KB per 8192-token chunk at TP=8), plus one all-gather of
``W`` int64 (the slice sizes; skipped with ``vocab_start=``), plus one all-reduce of the
``n x H`` grad-hidden in the backward when hidden needs a gradient. Never logits.
low_memory's second pass and the log-probs' backward reuse the stored global lse: no
collective. With ``validate`` (default: CPU tensors) two more small all-gathers check the
layout and that hidden/targets agree across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .head_chunk import labelled, slice_targets
from .inputs import check_targets_in_vocab, resolve_validate
from .ops.loss_head import row_kernels as _plain_row_kernels


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary in a tensor-parallel group."""

    group: object            # torch.distributed ProcessGroup
    world: int
    rank: int
    shard_size: int          # V_r, rows of this rank's weight
    vocab_start: object      # int, or an int64 0-dim tensor (all-gathered: no host sync)
    vocab_size: object = None  # the global V (0-dim tensor) when the sizes were all-gathered

    def local_targets(self, targets: Tensor) -> Tensor:
        """Global ids -> ids in this slice; -1 where another rank (or none) owns the id."""
        return slice_targets(targets, self.vocab_start, self.shard_size)

    def gather(self, pack: Tensor) -> Tensor:
        """[k, n] per rank -> [W, k, n] on every rank (rank order)."""
        out = torch.empty((self.world,) + tuple(pack.shape), dtype=pack.dtype, device=pack.device)
        dist.all_gather(list(out.unbind(0)), pack.contiguous(), group=self.group)
        return out

    def check_inputs(self, head, mask, validate) -> None:
        """The slices tile [0, V) in rank order, counted tokens have a target in [0, V) of
        the global vocabulary, and hidden/targets agree on every rank (two checksums).
        Host syncs and two small collectives: behind ``validate``."""
        if not resolve_validate(validate, head.hidden.device):
            return
        device = head.hidden.device
        layout = torch.tensor([int(self.vocab_start), self.shard_size], dtype=torch.long, device=device)
        starts, sizes = self.gather(layout).t().tolist()
        expected = [sum(sizes[:r]) for r in range(self.world)]
        if starts != expected:
            raise ValueError(f"vocab_start: the ranks' slices must tile the vocabulary in rank "
                             f"order; got starts {starts} for sizes {sizes} (expected {expected})")
        rows = head.hidden.double().sum(1)
        position = torch.arange(1, rows.shape[0] + 1, dtype=torch.float64, device=device)
        sums = torch.stack([torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=device),
                            rows.sum(), (rows * position).sum(), (head.targets.double() * position).sum()])
        everyone = self.gather(sums)
        if not torch.allclose(everyone, everyone[:1].expand_as(everyone), rtol=1e-9, atol=1e-9):
            raise ValueError("hidden and target_ids must be the same on every rank of tp_group "
                             "(with sequence parallelism, gather the sequence first)")
        check_targets_in_vocab(head.targets, mask, sum(sizes),
                               " (the global vocabulary of the tensor-parallel group)")


def vocab_shard(tp_group, weight: Tensor, vocab_start=None) -> VocabShard | None:
    """The shard description of a fused-head call; None without ``tp_group`` (the
    single-process head, unchanged). A collective unless ``vocab_start`` is given."""
    if tp_group is None:
        if vocab_start is not None:
            raise ValueError("vocab_start needs tp_group")
        return None
    if not dist.is_available():
        raise RuntimeError("tp_group needs torch.distributed, which this torch build lacks")
    if not isinstance(tp_group, dist.ProcessGroup):
        raise TypeError(f"tp_group must be a torch.distributed ProcessGroup (e.g. Megatron's "
                        f"parallel_state.get_tensor_model_parallel_group()), got "
                        f"{type(tp_group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("tp_group needs an initialised torch.distributed process group")
    world, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    if rank < 0:
        raise ValueError("tp_group: this process is not a member of the group")
    shard_size = weight.shape[0]
    if vocab_start is None:
        size = torch.tensor([shard_size], dtype=torch.long, device=weight.device)
        sizes = torch.empty(world, 1, dtype=torch.long, device=weight.device)
        dist.all_gather(list(sizes.unbind(0)), size, group=tp_group)
        sizes = sizes.view(-1)
        return VocabShard(tp_group, world, rank, shard_size, sizes[:rank].sum(), sizes.sum())
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    return VocabShard(tp_group, world, rank, shard_size, vocab_start)


def row_kernels(backend: str, shard: VocabShard | None):
    """``(logits_row_stats, logits_grad_inplace)`` with the contract of
    ``ops/loss_head.row_kernels`` for global target ids on a vocabulary slice; the plain
    kernels when ``shard`` is None."""
    row_stats, grad_inplace = _plain_row_kernels(backend)
    if shard is None:
        return row_stats, grad_inplace

    def sharded_row_stats(logits, targets, inv_temperature, return_entropy=False):
        local = shard.local_targets(targets)
        lse_r, logp_r, entropy_r = row_stats(logits, local, inv_temperature, return_entropy)
        owned = local >= 0
        # z[target] = logp_r + lse_r by the row kernels' contract: whatever map the kernel
        # applies to the logits (temperature, ...) is the one used here; a slice of -inf
        # logits (lse_r = -inf) has z[target] = -inf, not -inf - -inf
        target_z = torch.where(torch.isneginf(lse_r), lse_r, logp_r + lse_r)
        target_z = torch.where(owned, target_z, torch.zeros_like(lse_r))
        parts = [lse_r, target_z, owned.to(lse_r.dtype)]
        if return_entropy:
            parts.append(lse_r - entropy_r)  # E_r[z], the slice's softmax-mean of z
        everyone = shard.gather(torch.stack(parts))  # [W, k, n]: the only communication
        lse = torch.logsumexp(everyone[:, 0], dim=0)
        logp = torch.where(everyone[:, 2].sum(0) > 0, everyone[:, 1].sum(0) - lse,
                           torch.zeros_like(lse))
        entropy = None
        if return_entropy:
            weight = torch.exp(everyone[:, 0] - lse)  # each slice's share of the probability
            mean_z = torch.where(weight > 0, weight * everyone[:, 3], torch.zeros_like(weight)).sum(0)
            entropy = lse - mean_z
        return lse, logp, entropy

    def sharded_grad_inplace(logits, targets, lse, grad_logp, inv_temperature):
        # lse is the global one (from sharded_row_stats): softmax over the whole vocabulary
        grad_inplace(logits, shard.local_targets(targets), lse, grad_logp, inv_temperature)

    return sharded_row_stats, sharded_grad_inplace


class _CopyToVocabParallel(torch.autograd.Function):
    """Identity forward; backward sums the slices' grad-hidden parts over the group."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()  # the head's own fresh buffer: reduced in place (as Megatron)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def labelled_tokens(targets: Tensor, weight_rows: int, shard: VocabShard | None) -> Tensor:
    """``head_chunk.labelled`` on the call's vocabulary: this process's ``weight_rows``, or a
    shard's global V. With ``vocab_start`` given that V is not known without a collective:
    only negative ids count as unlabelled then (ids >= V are an input error, named under
    ``validate``)."""
    return labelled(targets, weight_rows if shard is None else shard.vocab_size)


def copy_to_vocab_parallel(hidden: Tensor, shard: VocabShard | None) -> Tensor:
    """``hidden`` whose gradient is all-reduced over the group in the backward (only when a
    gradient is wanted; ``hidden`` itself without ``shard``)."""
    if shard is None or not (torch.is_grad_enabled() and hidden.requires_grad):
        return hidden
    return _CopyToVocabParallel.apply(hidden, shard.group)


__all__ = ["VocabShard", "vocab_shard", "row_kernels", "labelled_tokens", "copy_to_vocab_parallel"]
