"""One chunk of the fused loss head: the logits GEMM into a reused buffer, the in-place
logits-gradient, and the gradient GEMMs. The heads (``fused_linear.py``,
``fused_grpo.py``) and the vocabulary-blocked gradient pass (``vocab_blocks.py``) are
built from these; none of them ever holds a ``[tokens x vocab]`` tensor.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from .logit_transform import softcap_grad_inplace, softcap_inplace

VOCAB_SLICE = 8192  # rows of grad-weight summed per GEMM when accumulating in fp32
# fp16 logits overflow above 65504: an fp16 chunk buffer holds logits * 2^-8 (applied in
# the GEMM's fp32 epilogue; a power of two, so only values in fp16's subnormal range, |z|
# < 0.016, lose bits, < 1e-5 absolute) and the row kernels read it back with 2^8 / T.
_FP16_LOGIT_STORAGE_SCALE = 2.0 ** -8
# grad_weight_fp32="auto": a whole-group chunk plan with at most this many chunks adds its
# chunks' grad-weight in the weight's dtype (one rounding per added chunk); more chunks
# use the fp32 accumulator. Measured (benchmarks/grad_weight_rounding.py, bf16): error vs
# fp64 over plain PyTorch's single-GEMM error 1.00x at 1 chunk, <= 1.12x at 2 chunks,
# 1.31x at 4 and 1.65x at 8 (flat logits, std 1; less with sharper logits).
AUTO_WEIGHT_DTYPE_MAX_CHUNKS = 2


class Head(NamedTuple):
    """Checked loss-head tensors, flattened to token rows."""

    hidden: Tensor       # [N, H]
    weight: Tensor       # [V, H]
    bias: Tensor | None  # [V]
    targets: Tensor      # [N] int64
    token_shape: tuple   # [B, T] or [N]
    inv_temperature: float
    backend: str
    logp_dtype: torch.dtype
    softcap: float | None = None  # logits f(u) = softcap*tanh(logit_scale*u/softcap) / T
    logit_scale: float = 1.0      # (without a cap, folded into inv_temperature)


def check_grad_weight_fp32(value):
    """``grad_weight_fp32``: True, False or "auto"."""
    if value is True or value is False or (isinstance(value, str) and value == "auto"):
        return value
    raise ValueError(f"grad_weight_fp32 must be True, False or 'auto', got {value!r}")


def weight_accumulates_fp32(grad_weight_fp32, n_chunks: int) -> bool:
    """Whether a one-pass head that adds the grad-weight of ``n_chunks`` chunks keeps an
    fp32 V x H accumulator: "auto" does above ``AUTO_WEIGHT_DTYPE_MAX_CHUNKS`` chunks."""
    if grad_weight_fp32 == "auto":
        return n_chunks > AUTO_WEIGHT_DTYPE_MAX_CHUNKS
    return bool(grad_weight_fp32)


def labelled(targets: Tensor, vocab) -> Tensor:
    """Tokens whose target is a vocabulary id in [0, ``vocab``) (an int or a 0-dim tensor).
    Elsewhere (-100, ...) logp is the constant 0, so its gradient must be 0 whatever
    d loss / d logp says: the heads zero it there (the row kernels alone would still write
    -softmax). ``vocab`` None (unknown: a tensor-parallel shard given ``vocab_start``): only
    negative ids count as unlabelled (ids >= V are an input error, named under ``validate``)."""
    return targets >= 0 if vocab is None else (targets >= 0) & (targets < vocab)


# --------------------------------------------------------------------------- one chunk
class Grads:
    """Gradient buffers of a one-pass head (``fast``, the GRPO head), allocated only for
    tensors that need them; grad-weight is summed over the chunks (``add_chunk``)."""

    def __init__(self, head: Head, hidden_req: bool, weight_req: bool, bias_req: bool,
                 grad_weight_fp32: bool):
        w = head.weight
        self.hidden = torch.empty_like(head.hidden) if hidden_req else None
        acc = torch.float32 if grad_weight_fp32 and w.dtype != torch.float64 else w.dtype
        self.weight = torch.zeros(w.shape, dtype=acc, device=w.device) if weight_req else None
        self.bias = (torch.zeros(w.shape[0], dtype=acc, device=w.device)
                     if bias_req and head.bias is not None else None)

    def add_chunk(self, grad_logits: Tensor, head: Head, rows, row_grad: Tensor | None = None) -> None:
        """grad_logits [n, V] (overwritten logits) -> grad-hidden rows, += grad-weight/bias.

        ``row_grad`` [n]: the chunk's d loss / d logp. Rows where it is 0 (padding, masked
        or clipped tokens) contribute exactly nothing: the row kernels write zeros there
        and their hidden states are zeroed for the grad-weight GEMM, so a NaN hidden
        state at a padding token cannot reach grad-weight through 0 * NaN."""
        h = head.hidden[rows]
        if self.weight is not None and row_grad is not None:
            h = zero_rows_without_gradient(h, row_grad)
        # d/du = s * d/d(stored) for logits stored times s (fp16: 2^-8, exact), applied in
        # the GEMMs' fp32 epilogues (alpha)
        s = logit_storage_scale(head.hidden.dtype, head.softcap)
        if self.hidden is not None:
            if isinstance(rows, slice):
                write_product(self.hidden[rows], grad_logits, head.weight, s)
            else:
                part = torch.empty(grad_logits.shape[0], head.weight.shape[1], dtype=self.hidden.dtype,
                                   device=self.hidden.device)
                write_product(part, grad_logits, head.weight, s)
                self.hidden.index_copy_(0, rows, part)
        if self.weight is not None:
            add_product(self.weight, grad_logits.t(), h, s)
        if self.bias is not None:
            self.bias.add_(grad_logits.sum(0, dtype=self.bias.dtype), alpha=s)


def zero_rows_without_gradient(h: Tensor, row_grad: Tensor) -> Tensor:
    """``h`` with the rows whose d loss / d logp is 0 (padding, masked, clipped tokens)
    zeroed, for the grad-weight GEMM: their logits-gradient is exactly 0, and a NaN hidden
    state there must not reach grad-weight through 0 * NaN."""
    return torch.where((row_grad != 0)[:, None], h, torch.zeros((), dtype=h.dtype, device=h.device))


def slice_targets(targets: Tensor, start, size: int) -> Tensor:
    """Ids -> ids in the vocabulary rows [start, start + size) (``start`` an int or a 0-dim
    tensor); -1 where the id lies outside (no one-hot there, by the row kernels' contract)."""
    local = targets - start
    return torch.where((local >= 0) & (local < size), local, torch.full_like(local, -1))


def add_product(acc: Tensor, a: Tensor, b: Tensor, alpha: float) -> None:
    """``acc += alpha * a @ b`` with the product summed in ``acc``'s precision (fp32 for
    half-precision operands), not rounded to the operands' dtype first."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, alpha=alpha)
    elif gemm_accumulates_fp32(a.device, a.dtype):  # cuBLAS: half operands, fp32 C, no temporary
        torch.addmm(acc, a, b, out_dtype=acc.dtype, alpha=alpha, out=acc)
    else:  # by row slices, so the temporary is VOCAB_SLICE rows: on the CPU the operands are
        # upcast (the product summed in fp32); a CUDA torch without fp32-output GEMMs rounds
        # each slice's product once, alpha applied in the GEMM's epilogue (an fp16 tile holds
        # 2^8 x the gradient)
        upcast = a.device.type == "cpu"
        b = b.to(acc.dtype) if upcast else b
        zero = torch.zeros((), dtype=a.dtype, device=a.device)
        for r0 in range(0, a.shape[0], VOCAB_SLICE):
            rows = slice(r0, r0 + VOCAB_SLICE)
            if upcast:
                acc[rows].addmm_(a[rows].to(acc.dtype), b, alpha=alpha)
            else:
                acc[rows].add_(torch.addmm(zero, a[rows], b, beta=0.0, alpha=alpha))


def write_product(out: Tensor, a: Tensor, b: Tensor, alpha: float) -> None:
    """``out = alpha * a @ b``: one GEMM, one rounding to ``out``'s dtype."""
    if alpha == 1.0:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(torch.zeros((), dtype=out.dtype, device=out.device), a, b, beta=0.0, alpha=alpha,
                    out=out)


def gemm_accumulates_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(fp32, half, half, out_dtype=fp32, out=fp32)`` works here
    (CUDA, recent torch). Probed once per (device type, dtype) on a tiny problem."""
    return device.type == "cuda" and _probe_fp32_accumulating_gemm(device, dtype)


@functools.lru_cache(maxsize=None)
def _probe_fp32_accumulating_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        a = torch.randn(16, 8, device=device).to(dtype)
        b = torch.randn(8, 32, device=device).to(dtype)
        acc = torch.ones(16, 32, device=device)
        torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=0.5, out=acc)  # alpha: as used
        return bool(torch.allclose(acc, 1.0 + 0.5 * (a.float() @ b.float()), rtol=1e-2, atol=1e-2))
    except (RuntimeError, TypeError):
        return False


def chunk_logits(buffer: Tensor, head: Head, rows, n: int) -> Tensor:
    """One GEMM into the reused buffer: logits = h W^T (+ b) for the chunk's rows, then
    soft-capped in place when the head has a cap (``logit_transform.py``); fp16 logits
    are stored times ``logit_storage_scale`` (``head.inv_temperature`` undoes it)."""
    logits = buffer[:n]
    h = head.hidden[rows]
    scale = logit_storage_scale(head.hidden.dtype, head.softcap)
    if scale != 1.0:
        bias = head.bias if head.bias is not None else torch.zeros((), dtype=h.dtype, device=h.device)
        torch.addmm(bias, h, head.weight.t(), beta=scale if head.bias is not None else 0.0,
                    alpha=scale, out=logits)
    elif head.bias is None:
        torch.mm(h, head.weight.t(), out=logits)
    else:
        torch.addmm(head.bias, h, head.weight.t(), out=logits)
    if head.softcap is not None:
        softcap_inplace(logits, head.softcap, head.logit_scale)
    return logits


def logit_storage_scale(dtype: torch.dtype, softcap: float | None) -> float:
    """What ``chunk_logits`` multiplies the logits by in the buffer: 2^-8 for fp16 without
    a soft-cap (a cap bounds what it stores, and saturates to +-cap on a GEMM output of
    +-inf: finite either way), else 1. ``head.inv_temperature`` maps stored values to z
    (so it holds 2^8 / T then): the row kernels see true z, and the logits-gradient they
    write is d/d(stored) = 2^8 d/du, which ``Grads.add_chunk`` scales back."""
    return _FP16_LOGIT_STORAGE_SCALE if dtype == torch.float16 and softcap is None else 1.0


def logits_grad(grad_inplace, logits: Tensor, head: Head, targets, lse, grad_logp) -> None:
    """Overwrite a chunk's (transformed) logits with d loss / d (h W^T + b): the row
    kernel's softmax gradient, chained through the soft-cap when there is one."""
    if head.softcap is None:
        grad_inplace(logits, targets, lse, grad_logp, head.inv_temperature)
    else:
        softcap_grad_inplace(grad_inplace, logits, targets, lse, grad_logp, head.inv_temperature,
                             head.softcap, head.logit_scale)


def new_buffer(head: Head, rows: int) -> Tensor:
    return torch.empty(max(rows, 1), head.weight.shape[0], dtype=head.hidden.dtype,
                       device=head.hidden.device)


