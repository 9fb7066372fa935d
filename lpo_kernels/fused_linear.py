"""The fused loss head: hidden states x LM head -> LPO (or GRPO) loss and gradients,
never a [tokens x vocab] tensor.

``logp[t] = log_softmax((h_t W^T + b) / T)[y_t]`` (spec section 4). Tokens are processed
in chunks; one reused buffer holds a chunk's logits. Per chunk the row kernels
(``ops/loss_head.py``) give the log-sum-exp, the target log-prob and the entropy, then
overwrite the logits with d loss / d logits, and two GEMMs give grad-hidden and
grad-weight. Gradients are formed in the forward; backward only scales them by
``grad_output`` (the ``_AttachHeadGrads`` Function).

Modes (both exact; the listwise math is ``functional.listwise_forward_impl`` /
``group_stats`` — never re-derived here):

- ``fast``: chunks hold *whole groups*, so a chunk's listwise coefficients are known as
  soon as its log-probs are: GEMM, row stats, listwise step, in-place logits-gradient,
  grad GEMMs. 6·N·H·V FLOPs (the floor). Extra memory: grads + one chunk of logits
  (``chunk x V`` in the hidden dtype) + O(N) vectors. The per-chunk step runs with
  ``reduction="sum"``; the 1/G of ``reduction="mean"`` uses the total G of the final
  whole-batch step and is folded into the backward scale. Padded input with
  ``group_size`` plans chunks from shapes (no host sync); packed input or bare
  ``group_ids`` read B-sized metadata once per call (one small host sync) to sort
  sequences by group and cut on group boundaries. ``low_memory`` never syncs.
- ``low_memory``: pass 1 over token chunks (``chunk_tokens``, default 1024) computes
  lse/logp only; the whole-batch listwise step computes every token's gradient; pass 2
  recomputes the logits by vocabulary blocks and forms the gradients
  (``vocab_blocks.py``: each grad-weight row from one GEMM over every token). 8·N·H·V
  FLOPs. Extra memory: grads + a ``chunk_tokens x V`` tile + an fp32 N x H grad-hidden
  accumulator + a copy of hidden with its zero-gradient rows zeroed (2·N·H bytes in bf16),
  whatever the group length.

grad-weight (fast mode, and the GRPO head: one pass, the chunks' parts are added):
``grad_weight_fp32="auto"`` (default) adds them in the weight's dtype while the plan has at
most ``head_chunk.AUTO_WEIGHT_DTYPE_MAX_CHUNKS`` (2) chunks, one rounding per added chunk
(bf16 error <= 1.12x plain PyTorch's, measured), and in an fp32 V x H accumulator (4·V·H
bytes) above that; True / False force the accumulator / the weight's dtype. low_memory and
the log-probs' backward form each grad-weight row in one GEMM over every token
(``vocab_blocks.py``): one rounding whatever the flag, and no V x H accumulator.

``backend``: ``torch`` (plain PyTorch row functions; the default on CPU), ``triton``
(default on CUDA), ``cuda`` (``lpo_kernels/cuda.py``). The GEMMs are torch (cuBLAS).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from . import padding_free  # padded input: the GEMMs run over the real tokens only
from . import reference
from . import tensor_parallel  # tp_group=: the vocabulary-parallel hooks
from .functional import first_order_only, listwise_forward_impl, resolve_backend
from .group_stats import (LPOGroupStats, check_group_stats, listwise_forward_with_group_stats,
                          lpo_group_stats)
from .head_chunk import (Grads, Head, VOCAB_SLICE, check_grad_weight_fp32, chunk_logits,
                         logit_storage_scale, logits_grad, new_buffer, weight_accumulates_fp32)
from .ops.loss_head import row_kernels as plain_row_kernels
from .ops.scale import scale_inplace
from .vocab_blocks import vocab_blocked_grads
from .logit_transform import check_logit_transform
from .inputs import (InputDTypeError, check_finite, check_listwise_inputs, check_same_device,
                     check_targets_in_vocab, check_tensor, malformed_offsets, malformed_offsets_error,
                     resolve_validate)
from .options import LPOOptions, check_divisor

MODES = ("fast", "low_memory")
DEFAULT_CHUNK_TOKENS = {"fast": 8192, "low_memory": 1024}


class HeadOutputs(NamedTuple):
    """Detached per-token outputs asked for with ``return_logp`` / ``return_entropy``, in
    the token layout of the input (``[B, T]`` padded or ``[N]`` packed); None if not asked.
    fp32 (fp64 for fp64 inputs)."""

    logp: Tensor | None
    entropy: Tensor | None


# --------------------------------------------------------------------------- inputs
def _check_head(hidden, weight, target_ids, bias, temperature, packed, backend,
                softcap=None, logit_scale=1.0) -> Head:
    check_tensor("hidden", hidden, floating=True, dim=2 if packed else 3)
    check_tensor("weight", weight, floating=True, dim=2)
    check_tensor("target_ids", target_ids, floating=False, dim=1 if packed else 2)
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise InputDTypeError(f"hidden must be fp16, bf16, fp32 or fp64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise InputDTypeError(f"weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one vocabulary row")
    if target_ids.shape != hidden.shape[:-1]:
        raise ValueError(f"target_ids shape {tuple(target_ids.shape)} != hidden token shape "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None:
        check_tensor("bias", bias, floating=True, dim=1)
        if bias.shape != weight.shape[:1] or bias.dtype != weight.dtype:
            raise ValueError(f"bias must be [{weight.shape[0]}] of dtype {weight.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
    temperature = check_divisor("temperature", temperature)  # 1/T finite in fp32 (issue 13.7)
    softcap, logit_scale = check_logit_transform(softcap, logit_scale)
    check_same_device("hidden", hidden, weight=weight, target_ids=target_ids, bias=bias)
    backend = resolve_backend(backend, hidden.device, hidden.dtype)
    if hidden.dtype == torch.float64 and backend != "torch":
        raise InputDTypeError(f"fp64 hidden states need backend='torch', got {backend!r}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return Head(flat, weight.contiguous(), None if bias is None else bias.contiguous(),
                target_ids.reshape(-1).long(), tuple(hidden.shape[:-1]),
                (1.0 if softcap is not None else logit_scale) / float(temperature)
                / logit_storage_scale(hidden.dtype, softcap),
                backend, reference.compute_dtype(hidden.dtype), softcap, logit_scale)


def _vocab_shard_checked(head: Head, mask: Tensor | None, validate, tp_group, vocab_start):
    """The call's vocabulary shard (None: one process), after the value checks behind
    ``validate``: counted targets in the (global) vocabulary, finite head inputs."""
    shard = tensor_parallel.vocab_shard(tp_group, head.weight, vocab_start)
    if shard is not None:
        shard.check_inputs(head, mask, validate)
    elif resolve_validate(validate, head.hidden.device):
        check_targets_in_vocab(head.targets, mask, head.weight.shape[0])
    _check_head_finite(head, mask, validate)
    return shard


def _check_head_finite(head: Head, mask: Tensor | None, validate) -> None:
    """Counted tokens need a finite hidden state; weight and bias must be finite (bias may
    be -inf: banned tokens). Host sync: behind ``validate``. Hidden states of tokens that
    do not count may be anything (they get no gradient, see ``Grads.add_chunk``)."""
    if not resolve_validate(validate, head.hidden.device):
        return
    counted = None if mask is None else (mask.reshape(-1) != 0)[:, None]
    check_finite("hidden", head.hidden, counted)
    check_finite("weight", head.weight)
    check_finite("bias", head.bias, allow_neg_inf=True)


def _check_chunk_tokens(chunk_tokens, mode) -> int:
    if chunk_tokens is None:
        return DEFAULT_CHUNK_TOKENS[mode]
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    return chunk_tokens


# --------------------------------------------------------------------------- chunk plans
class _Chunk(NamedTuple):
    tokens: object          # slice or LongTensor of flat token rows
    seqs: object            # slice or LongTensor of sequences
    n_tokens: int
    cu_seqlens: Tensor | None  # packed offsets of the chunk's sequences (None: padded rows)


def _token_chunks(n_tokens: int, chunk_tokens: int) -> list[_Chunk]:
    """Fixed-size token chunks (from shapes only)."""
    return [_Chunk(slice(a, min(a + chunk_tokens, n_tokens)), None,
                   min(a + chunk_tokens, n_tokens) - a, None)
            for a in range(0, n_tokens, chunk_tokens)]


def _group_chunks(batch, token_shape, chunk_tokens: int, device) -> list[_Chunk]:
    """Chunks of whole groups. Padded + group_size: from shapes. Otherwise one host read
    of B-sized metadata (sequence lengths and group slots) to cut on group boundaries."""
    n_seqs = batch.n_seqs
    if batch.cu_seqlens is None and batch.group_size is not None:
        seq_len = token_shape[1]
        per_group = batch.group_size * seq_len
        groups = max(1, chunk_tokens // max(per_group, 1))
        step = groups * batch.group_size
        return [_Chunk(slice(a * seq_len, min(a + step, n_seqs) * seq_len), slice(a, min(a + step, n_seqs)),
                       (min(a + step, n_seqs) - a) * seq_len, None)
                for a in range(0, n_seqs, step)]
    if batch.cu_seqlens is None:
        offsets = [i * token_shape[1] for i in range(n_seqs + 1)]
    else:  # the one host sync of this plan (none when padding_free made the offsets)
        offsets = padding_free.host_offsets(batch.cu_seqlens)
        if offsets[0] != 0 or offsets[-1] != token_shape[0] or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise malformed_offsets_error(int(malformed_offsets(batch.cu_seqlens, token_shape[0])),
                                          token_shape[0])  # on the host already: cheap to check
    if batch.group_ids is None:  # consecutive groups of group_size: slots from shapes
        slots = [seq // batch.group_size for seq in range(n_seqs)]
    else:
        slots = reference.group_slots(batch.group_ids, batch.group_size, n_seqs, device).tolist()
    members: dict[int, list[int]] = {}
    for seq, slot in enumerate(slots):
        members.setdefault(slot, []).append(seq)
    chunks, current, current_tokens = [], [], 0
    for slot in sorted(members):
        seqs = members[slot]
        size = sum(offsets[s + 1] - offsets[s] for s in seqs)
        if current and current_tokens + size > chunk_tokens:
            chunks.append(current)
            current, current_tokens = [], 0
        current += seqs
        current_tokens += size
    if current:
        chunks.append(current)
    plan = []
    for seqs in chunks:
        lengths = [offsets[s + 1] - offsets[s] for s in seqs]
        cu = torch.zeros(len(seqs) + 1, dtype=torch.long)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
        n = sum(lengths)  # host ints: no tensor read
        if seqs == list(range(seqs[0], seqs[-1] + 1)):  # contiguous: views, no gathers
            tokens, seq_index = slice(offsets[seqs[0]], offsets[seqs[-1] + 1]), slice(seqs[0], seqs[-1] + 1)
        else:
            tokens = torch.cat([torch.arange(offsets[s], offsets[s + 1]) for s in seqs]).to(device)
            seq_index = torch.tensor(seqs, dtype=torch.long, device=device)
        plan.append(_Chunk(tokens, seq_index, n, cu.to(device)))
    return plan


def _chunk_batch(batch, chunk: _Chunk, logp_chunk: Tensor, slots: Tensor | None):
    """The listwise sub-batch of a whole-group chunk (its sequences only)."""
    values = batch.scores_source[chunk.seqs]
    if chunk.cu_seqlens is None:  # padded rows, groups of group_size
        rows = chunk.seqs
        seq_len = batch.logp.shape[1]
        n_rows = rows.stop - rows.start  # not numel // seq_len: T may be 0
        return dataclasses.replace(
            batch, logp=logp_chunk.view(n_rows, seq_len),
            old_logp=None if batch.old_logp is None else batch.old_logp[rows],
            mask=None if batch.mask is None else batch.mask[rows],
            group_ids=None if batch.group_ids is None else batch.group_ids[rows],
            rewards=None if batch.rewards is None else values,
            advantages=None if batch.advantages is None else values,
            n_seqs=n_rows)
    flat_old = None if batch.old_logp is None else batch.old_logp.reshape(-1)[chunk.tokens]
    flat_mask = None if batch.mask is None else batch.mask.reshape(-1)[chunk.tokens]
    return dataclasses.replace(
        batch, logp=logp_chunk, old_logp=flat_old, mask=flat_mask,
        group_ids=slots[chunk.seqs], rewards=None if batch.rewards is None else values,
        advantages=None if batch.advantages is None else values,
        cu_seqlens=chunk.cu_seqlens, group_size=None, n_seqs=chunk.cu_seqlens.numel() - 1)


# --------------------------------------------------------------------------- autograd
class _AttachHeadGrads(torch.autograd.Function):
    """Returns ``loss``; backward hands hidden/weight/bias the gradients formed in the
    forward, times ``grad_output * scale`` (scale folds 1/G in without another pass)."""

    @staticmethod
    def forward(ctx, loss, scale, grad_hidden, grad_weight, grad_bias, hidden, weight, bias):
        ctx.save_for_backward(scale, grad_hidden, grad_weight, grad_bias)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
        ctx.consumed = False
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        # The saved gradients are scaled in place (no second V x H buffer), so a second
        # backward through the same graph (retain_graph=True) cannot be answered.
        if ctx.consumed:
            raise RuntimeError("the fused loss head's backward can run once per forward: its "
                               "gradients are formed in the forward and scaled in place "
                               "(call the loss function again instead of retain_graph=True)")
        ctx.consumed = True
        scale, gh, gw, gb = ctx.saved_tensors
        hidden_shape, hidden_dtype, weight_dtype = ctx.shapes
        with torch.no_grad():
            s = grad_loss * scale
            out_h = None if gh is None else _scaled_cast(gh, s, hidden_dtype).view(hidden_shape)
            out_w = None if gw is None else _scaled_cast(gw, s, weight_dtype)
            out_b = None if gb is None else _scaled_cast(gb, s, weight_dtype)
        return (None, None, None, None, None,
                *first_order_only("the fused loss head", out_h, out_w, out_b))


def _scaled_cast(grad: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    """grad * s in ``dtype``, the product formed in fp32 (fp64 for fp64) and rounded once:
    s rounded to bf16 first would bias every element alike (1/3 -> 0.33398, +0.2%). In place
    when the dtypes agree (half precision: ``ops/scale.py``); else (an fp32 accumulator) into
    a new ``dtype`` tensor by row slices, never a second V x H temporary."""
    math = reference.compute_dtype(dtype)
    s = s.to(math)
    if grad.dtype == dtype == math:
        return grad.mul_(s)
    if grad.dtype == dtype:  # half precision, in place (ops/scale.py: one launch on CUDA)
        return scale_inplace(grad, s)
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    for v0 in range(0, grad.shape[0], VOCAB_SLICE):  # an fp32 accumulator: fp32 product
        torch.mul(grad[v0:v0 + VOCAB_SLICE], s, out=out[v0:v0 + VOCAB_SLICE])
    return out


def _attach(loss, scale, grads, hidden, weight, bias):  # Grads or vocab_blocks.BlockGrads
    if grads.hidden is None and grads.weight is None and grads.bias is None:
        return loss
    return _AttachHeadGrads.apply(loss, scale, grads.hidden, grads.weight, grads.bias,
                                  hidden, weight, bias)


def _check_token_grad_weights(weights, head: Head, device) -> Tensor | None:
    """``token_grad_weights`` broadcast to the token shape and flattened (None: all 1)."""
    if weights is None:
        return None
    check_tensor("token_grad_weights", weights, floating=True)
    check_same_device("hidden", head.hidden, token_grad_weights=weights)
    try:
        expanded = torch.broadcast_to(weights, head.token_shape)
    except RuntimeError as error:
        raise ValueError(f"token_grad_weights shape {tuple(weights.shape)} does not broadcast to the token "
                         f"shape {head.token_shape}") from error
    return expanded.reshape(-1).to(head.logp_dtype)


def _needs_grad(*tensors):
    return [torch.is_grad_enabled() and t is not None and t.requires_grad for t in tensors]


def _vocab_blocked_grads(head: Head, needs, shard, lse: Tensor, token_grad: Tensor, chunk_tokens: int):
    """The two-pass head's gradients (``vocab_blocks.py``), with a tile of ``chunk_tokens x V``
    elements; on a tensor-parallel shard, targets in the shard's own rows."""
    targets = head.targets if shard is None else shard.local_targets(head.targets)
    return vocab_blocked_grads(head, needs, targets, lse, token_grad, chunk_tokens * head.weight.shape[0],
                               plain_row_kernels(head.backend)[1])


# --------------------------------------------------------------------------- LPO
def fused_linear_lpo_loss(hidden, weight, target_ids, mask, group_ids, rewards=None,
                          advantages=None, *, bias=None, temperature=1.0, old_logp=None,
                          group_size=None, cu_seqlens=None, group_stats=None, mode="fast",
                          chunk_tokens=None, return_logp=False, return_entropy=False,
                          backend="auto", grad_weight_fp32="auto", validate=None, softcap=None,
                          logit_scale=1.0, token_grad_weights=None, tp_group=None,
                          vocab_start=None, **lpo_options):
    """LPO loss from hidden states and the LM head, without materialising the logits.

    Args:
        hidden: ``[B, T, H]`` (with ``mask``/``old_logp``/``target_ids`` ``[B, T]``) or
            packed ``[N, H]`` with ``cu_seqlens`` (token tensors ``[N]``).
        weight: LM head ``[V, H]``, same dtype as hidden (bf16/fp16/fp32; fp64 with
            backend='torch'); ``bias``: optional ``[V]``.
        target_ids: the sampled tokens (labels already shifted); outside ``[0, V)`` only
            where ``mask`` is 0.
        group_ids, rewards, advantages, old_logp, group_size, lpo_options: as
            :func:`lpo_kernels.lpo_loss` (``target``, ``divergence``, ``clip``, ...).
            ``reduction`` must be 'mean' or 'sum'.
        temperature: sampling temperature T: ``logp = log_softmax((h W^T + b)/T)[y]``.
        softcap, logit_scale: logits ``softcap * tanh(logit_scale * (h W^T + b) / softcap) / T``
            (Gemma-2 style cap; ``softcap=None``: ``logit_scale * (h W^T + b) / T``), the
            order of TRL's fused LM head (``lpo_kernels/logit_transform.py``).
        token_grad_weights: optional per-token factors on ``d loss / d logp`` (token shape, or
            ``[B, 1]`` per sequence), e.g. importance weights of a sampler: the gradient of
            token t is multiplied by its weight; loss value and stats are unchanged.
        group_stats: records of the *other* calls' sequences of split groups
            (:class:`LPOGroupStats`); the call then returns the whole-batch loss and this
            call's part of its gradient (see ``lpo_kernels/group_stats.py``).
        mode: 'fast' (whole-group chunks, 6NHV) or 'low_memory' (two passes, 8NHV).
        chunk_tokens: tokens per chunk (fast: a target, rounded to whole groups, default
            8192; low_memory: default 1024).
        grad_weight_fp32: fast mode's grad-weight sum over chunks: "auto" (default: the
            weight's dtype for <= 2 chunks, else fp32), True (fp32) or False (the weight's
            dtype). No effect in low_memory (one rounding per grad-weight row).
        tp_group, vocab_start: vocabulary-parallel head: ``weight``/``bias`` are this rank's
            slice of the vocabulary (see ``lpo_kernels/tensor_parallel.py``).

    Returns ``(loss, stats)``, or ``(loss, stats, HeadOutputs(logp, entropy))`` when
    ``return_logp`` or ``return_entropy`` is set (detached, input token layout).
    """
    if padding_free.eligible(hidden, mask, cu_seqlens, exact=(target_ids, old_logp),
                             broadcast=(token_grad_weights,)):
        comp = padding_free.compaction(mask, tuple(hidden.shape[:2]))
        if comp is not None:  # the packed call on the real tokens, outputs scattered back
            out = fused_linear_lpo_loss(
                padding_free.gather_hidden(hidden, comp), weight, padding_free.gather(target_ids, comp),
                padding_free.gather(mask, comp), group_ids, rewards, advantages, bias=bias,
                temperature=temperature, old_logp=padding_free.gather(old_logp, comp),
                group_size=group_size, cu_seqlens=comp.cu_seqlens, group_stats=group_stats,
                mode=mode, chunk_tokens=chunk_tokens, return_logp=return_logp,
                return_entropy=return_entropy, backend=backend, grad_weight_fp32=grad_weight_fp32,
                validate=validate, softcap=softcap, logit_scale=logit_scale,
                token_grad_weights=padding_free.gather(token_grad_weights, comp), tp_group=tp_group,
                vocab_start=vocab_start, **lpo_options)
            if len(out) == 3:
                out = (*out[:2], HeadOutputs(*(padding_free.scatter(x, comp) for x in out[2])))
            return out
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    chunk_tokens = _check_chunk_tokens(chunk_tokens, mode)
    grad_weight_fp32 = check_grad_weight_fp32(grad_weight_fp32)
    options = LPOOptions(**lpo_options)
    if options.reduction == "none":
        raise ValueError("reduction='none' is not supported by the fused loss head (its "
                         "gradients are formed in the forward); use 'mean' or 'sum'")
    head = _check_head(hidden, weight, target_ids, bias, temperature, cu_seqlens is not None, backend,
                       softcap, logit_scale)
    logp = torch.zeros(head.token_shape, dtype=head.logp_dtype, device=head.hidden.device)
    batch = check_listwise_inputs(logp, old_logp, mask, group_ids, rewards, advantages,
                                  options=options, cu_seqlens=cu_seqlens, group_size=group_size,
                                  validate=validate)
    check_same_device("hidden", hidden, mask=mask, old_logp=old_logp, group_ids=group_ids)
    shard = _vocab_shard_checked(head, mask, validate, tp_group, vocab_start)  # None: one process
    if group_stats is not None:
        others = check_group_stats(group_stats, hidden.device, options, validate)
        if group_ids is None:
            raise ValueError("group_ids is required with group_stats (ids must name the same "
                             "prompts in every call)")

        def step(b, o):
            return listwise_forward_with_group_stats(b, o, others)
    else:
        step = listwise_forward_impl(head.backend)
    row_stats, grad_inplace = tensor_parallel.row_kernels(head.backend, shard)
    flat_weights = _check_token_grad_weights(token_grad_weights, head, hidden.device)
    needs = _needs_grad(hidden, weight, bias)
    entropy = torch.zeros_like(logp) if return_entropy else None
    flat_logp = logp.view(-1)
    flat_entropy = None if entropy is None else entropy.view(-1)

    with torch.no_grad():
        want_grad = any(needs)
        # tokens without a vocabulary id: logp is the constant 0, so no gradient
        has_label = tensor_parallel.labelled_tokens(head.targets, head.weight.shape[0], shard) if want_grad else None
        if mode == "fast":
            plan = _group_chunks(batch, head.token_shape, chunk_tokens, hidden.device)
            grads = Grads(head, *needs, grad_weight_fp32=weight_accumulates_fp32(grad_weight_fp32, len(plan)))
            # Group ids of the chunk sub-batches: the real ids with group_stats (they must
            # match the other calls' records), else dense slots (also when ids are None).
            slots = batch.group_ids if group_stats is not None else reference.group_slots(
                batch.group_ids, batch.group_size, batch.n_seqs, hidden.device)
            chunk_options = dataclasses.replace(options, reduction="sum")
            buffer = new_buffer(head, max((c.n_tokens for c in plan), default=1))
            for chunk in plan:
                logits = chunk_logits(buffer, head, chunk.tokens, chunk.n_tokens)
                targets = head.targets[chunk.tokens]
                lse, lp, ent = row_stats(logits, targets, head.inv_temperature, return_entropy)
                flat_logp[chunk.tokens] = lp.to(logp.dtype)
                if flat_entropy is not None:
                    flat_entropy[chunk.tokens] = ent.to(logp.dtype)
                if want_grad:
                    sub = _chunk_batch(batch, chunk, lp.to(logp.dtype), slots)
                    chunk_result = step(sub, chunk_options)
                    token_grad = torch.where(has_label[chunk.tokens], chunk_result.token_grad.reshape(-1), 0.0)
                    if chunk_result.grad_scale is not None:
                        token_grad = token_grad * chunk_result.grad_scale
                    if flat_weights is not None:
                        token_grad = token_grad * flat_weights[chunk.tokens]
                    logits_grad(grad_inplace, logits, head, targets, lse, token_grad)
                    grads.add_chunk(logits, head, chunk.tokens, token_grad)
            result = step(batch, options)
        else:  # low_memory
            plan = _token_chunks(head.hidden.shape[0], chunk_tokens)
            buffer = new_buffer(head, min(chunk_tokens, head.hidden.shape[0]))
            lse_all = torch.empty(head.hidden.shape[0], dtype=head.logp_dtype, device=hidden.device)
            for chunk in plan:
                logits = chunk_logits(buffer, head, chunk.tokens, chunk.n_tokens)
                lse, lp, ent = row_stats(logits, head.targets[chunk.tokens], head.inv_temperature,
                                         return_entropy)
                lse_all[chunk.tokens], flat_logp[chunk.tokens] = lse, lp
                if flat_entropy is not None:
                    flat_entropy[chunk.tokens] = ent
            buffer = logits = None  # freed: pass 2 has its own tile (vocab_blocks.py)
            result = step(batch, options)
            if want_grad:
                token_grad = torch.where(has_label, result.token_grad.reshape(-1), 0.0)
                if flat_weights is not None:
                    token_grad = token_grad * flat_weights
                grads = _vocab_blocked_grads(head, needs, shard, lse_all, token_grad, chunk_tokens)
            else:
                grads = Grads(head, *needs, grad_weight_fp32=False)  # holds nothing
        if mode == "fast" and options.reduction == "mean":
            scale = 1.0 / result.stats.n_groups.clamp(min=1).to(result.loss.dtype)
        elif mode == "low_memory" and result.grad_scale is not None:
            scale = result.grad_scale.to(result.loss.dtype)  # the backend's deferred factor
        else:
            scale = torch.ones((), dtype=result.loss.dtype, device=hidden.device)
    hidden = tensor_parallel.copy_to_vocab_parallel(hidden, shard)  # all-reduce in backward
    loss = _attach(result.loss, scale, grads, hidden, weight, bias)
    if return_logp or return_entropy:
        return loss, result.stats, HeadOutputs(logp if return_logp else None, entropy)
    return loss, result.stats


class FusedLinearLPOLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_lpo_loss`: options at construction
    (``mode``, ``chunk_tokens``, ``temperature``, ``group_size``, ``backend``,
    ``grad_weight_fp32``, ``validate``, ``tp_group``, ``vocab_start`` and the LPO
    options), tensors at call time."""

    def __init__(self, *, mode="fast", chunk_tokens=None, temperature=1.0, group_size=None,
                 backend="auto", grad_weight_fp32="auto", validate=None, softcap=None, logit_scale=1.0,
                 tp_group=None, vocab_start=None, **lpo_options):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _check_chunk_tokens(chunk_tokens, mode)
        LPOOptions(**lpo_options)  # fail at construction on a bad option
        check_logit_transform(softcap, logit_scale)
        self.head_options = dict(mode=mode, chunk_tokens=chunk_tokens, temperature=temperature,
                                 group_size=group_size, backend=backend,
                                 grad_weight_fp32=grad_weight_fp32, validate=validate,
                                 softcap=softcap, logit_scale=logit_scale)
        if tp_group is not None or vocab_start is not None:
            self.head_options.update(tp_group=tp_group, vocab_start=vocab_start)
        self.lpo_options = dict(lpo_options)

    def forward(self, hidden, weight, target_ids, mask, group_ids, rewards=None, advantages=None,
                *, bias=None, old_logp=None, cu_seqlens=None, group_stats=None,
                return_logp=False, return_entropy=False, token_grad_weights=None):
        return fused_linear_lpo_loss(hidden, weight, target_ids, mask, group_ids, rewards, advantages,
                                     bias=bias, old_logp=old_logp, cu_seqlens=cu_seqlens,
                                     group_stats=group_stats, return_logp=return_logp,
                                     token_grad_weights=token_grad_weights,
                                     return_entropy=return_entropy, **self.head_options,
                                     **self.lpo_options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**self.head_options, **self.lpo_options}.items())


# --------------------------------------------------------------------------- log-probs
class _FusedLinearLogprobs(torch.autograd.Function):
    """Per-token log-probs (+ entropy, not differentiated) in chunks; backward recomputes
    the logits by vocabulary blocks (``vocab_blocks.py``; no N x V saved)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head: Head, chunk_tokens: int, return_entropy: bool,
                shard=None):
        row_stats, _ = tensor_parallel.row_kernels(head.backend, shard)
        n = head.hidden.shape[0]
        logp = torch.empty(n, dtype=head.logp_dtype, device=hidden.device)
        lse_all = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if return_entropy else None
        buffer = new_buffer(head, min(chunk_tokens, n))
        for chunk in _token_chunks(n, chunk_tokens):
            logits = chunk_logits(buffer, head, chunk.tokens, chunk.n_tokens)
            lse, lp, ent = row_stats(logits, head.targets[chunk.tokens], head.inv_temperature,
                                     return_entropy)
            lse_all[chunk.tokens], logp[chunk.tokens] = lse, lp
            if return_entropy:
                entropy[chunk.tokens] = ent
        ctx.head, ctx.chunk_tokens = head, chunk_tokens
        ctx.shard = shard
        ctx.save_for_backward(lse_all)
        logp = logp.view(head.token_shape)
        if return_entropy:
            entropy = entropy.view(head.token_shape)
            ctx.mark_non_differentiable(entropy)
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, *unused):
        with torch.no_grad():  # out= GEMMs; create_graph=True is first-order only
            grads = _FusedLinearLogprobs._grads(ctx, grad_logp)
        return (*first_order_only("fused_linear_logprobs", *grads), None, None, None, None)

    @staticmethod
    def _grads(ctx, grad_logp):
        (lse_all,) = ctx.saved_tensors
        head = ctx.head
        has_label = tensor_parallel.labelled_tokens(head.targets, head.weight.shape[0], ctx.shard)
        token_grad = torch.where(has_label, grad_logp.reshape(-1).to(head.logp_dtype), 0.0)
        grads = _vocab_blocked_grads(head, ctx.needs_input_grad[:3], ctx.shard, lse_all, token_grad,
                                     ctx.chunk_tokens)
        hidden = grads.hidden
        if hidden is not None:
            hidden = hidden.to(head.hidden.dtype).view(*head.token_shape, hidden.shape[-1])
        return hidden, grads.weight, grads.bias


def fused_linear_logprobs(hidden, weight, target_ids, *, bias=None, temperature=1.0,
                          return_entropy=False, chunk_tokens=None, backend="auto",
                          grad_weight_fp32="auto", softcap=None, logit_scale=1.0, tp_group=None,
                          vocab_start=None, mask=None):
    """``log_softmax((h W^T + b)/T)[target]`` per token without full logits.

    ``hidden`` ``[..., H]``, ``target_ids`` ``[...]``; returns logp ``[...]`` (fp32; fp64
    for fp64 inputs), differentiable w.r.t. hidden/weight/bias (backward recomputes the
    logits by vocabulary blocks of ``chunk_tokens x V`` elements, ``vocab_blocks.py``: each
    grad-weight row rounded once, so ``grad_weight_fp32`` has no effect), and with
    ``return_entropy`` also the tempered entropy (detached: trainers log it). Targets outside [0, V) give logp = 0 and no gradient.
    ``softcap``/``logit_scale``: as :func:`fused_linear_lpo_loss`.
    ``tp_group``/``vocab_start``: vocabulary-parallel head (``lpo_kernels/tensor_parallel.py``).
    ``mask`` (``[B, T]`` with ``[B, T, H]`` hidden): only tokens with ``mask != 0`` are
    computed (``lpo_kernels/padding_free.py``); logp/entropy are 0 elsewhere, and so is the
    gradient there."""
    check_tensor("hidden", hidden, floating=True, dim=(2, 3))  # [N, H] or [B, T, H]
    check_grad_weight_fp32(grad_weight_fp32)
    if mask is not None and not padding_free.eligible(hidden, mask, exact=(target_ids,)):
        raise ValueError("mask must be a [B, T] tensor on hidden's device with [B, T, H] hidden "
                         "and [B, T] target_ids")
    comp = None if mask is None else padding_free.compaction(mask, tuple(hidden.shape[:2]))
    if comp is not None:
        out = fused_linear_logprobs(
            padding_free.gather_hidden(hidden, comp), weight, padding_free.gather(target_ids, comp),
            bias=bias, temperature=temperature, return_entropy=return_entropy,
            chunk_tokens=chunk_tokens, backend=backend, grad_weight_fp32=grad_weight_fp32,
            softcap=softcap, logit_scale=logit_scale, tp_group=tp_group, vocab_start=vocab_start)
        if return_entropy:
            return tuple(padding_free.scatter(x, comp) for x in out)
        return padding_free.scatter(out, comp)
    head = _check_head(hidden, weight, target_ids, bias, temperature, hidden.dim() == 2, backend,
                       softcap, logit_scale)
    chunk_tokens = _check_chunk_tokens(chunk_tokens, "low_memory")
    shard = tensor_parallel.vocab_shard(tp_group, head.weight, vocab_start)  # None: one process
    hidden = tensor_parallel.copy_to_vocab_parallel(hidden, shard)  # all-reduce in backward
    return _FusedLinearLogprobs.apply(hidden, weight, bias, head, chunk_tokens, return_entropy, shard)


@torch.no_grad()
def fused_linear_lpo_group_stats(hidden, weight, target_ids, mask, group_ids, rewards=None,
                                 advantages=None, *, bias=None, temperature=1.0, old_logp=None,
                                 cu_seqlens=None, target="grpo", seq_reduce="mean",
                                 chunk_tokens=None, backend="auto", validate=None, softcap=None,
                                 logit_scale=1.0, tp_group=None, vocab_start=None) -> LPOGroupStats:
    """:func:`lpo_group_stats` from hidden states (one no-grad log-prob pass; on padded
    input over the counted tokens only, ``padding_free.py``)."""
    real_only = cu_seqlens is None and padding_free.eligible(hidden, mask, exact=(target_ids,))
    logp = fused_linear_logprobs(hidden, weight, target_ids, bias=bias, temperature=temperature,
                                 chunk_tokens=chunk_tokens, backend=backend, softcap=softcap,
                                 logit_scale=logit_scale, tp_group=tp_group,
                                 vocab_start=vocab_start, mask=mask if real_only else None)
    return lpo_group_stats(logp, old_logp, mask, group_ids, rewards, advantages,
                           cu_seqlens=cu_seqlens, target=target, seq_reduce=seq_reduce,
                           validate=validate)


def __getattr__(name):  # the GRPO head moved to fused_grpo.py; old imports keep working
    if name == "fused_linear_grpo_loss":
        from .fused_grpo import fused_linear_grpo_loss

        return fused_linear_grpo_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["fused_linear_lpo_loss", "FusedLinearLPOLoss", "fused_linear_logprobs",
           "fused_linear_grpo_loss", "fused_linear_lpo_group_stats", "HeadOutputs", "MODES"]
