"""Row kernels of the fused loss head: per-row statistics of a logits chunk, and the
logits-gradient written over the logits in place.

Both functions exist three times with one contract (``_torch`` here, ``_triton`` here,
``_cuda`` in ``lpo_kernels/cuda.py``); ``lpo_kernels/fused_linear.py`` picks one:

- ``logits_row_stats(logits [M, V], targets [M] int64, inv_temperature, return_entropy)
  -> (lse [M] fp32, logp [M] fp32, entropy [M] fp32 | None)`` with ``z = logits *
  inv_temperature``, ``lse = logsumexp(z)``, ``logp = z[target] - lse``, ``entropy = lse -
  sum softmax(z) z``. A target outside [0, V) gives logp = 0 (callers mask those tokens).
- ``logits_grad_inplace(logits, targets, lse, grad_logp, inv_temperature) -> None``:
  ``logits <- grad_logp * (onehot(target) - softmax(z)) * inv_temperature`` in the
  logits' dtype (an out-of-range target has no one-hot term; grad_logp = 0 gives exact
  zeros, even over NaN logits). Entropy counts 0 * log 0 = 0 (logits of -inf).

``logits`` is row-contiguous (unit column stride); its row stride may exceed V (a view
into a larger reused buffer). The math is fp32 whatever the storage dtype; the
log-sum-exp is computed online over blocks of V, so V need not be a multiple of a block.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_row_inputs(logits: Tensor, targets: Tensor, allow_fp64: bool = False) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a 2-D row-contiguous tensor, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    allowed = (torch.float32, torch.float16, torch.bfloat16) + ((torch.float64,) if allow_fp64 else ())
    if logits.dtype not in allowed:
        raise TypeError(f"logits must be fp32, fp16 or bf16, got {logits.dtype}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be [{logits.shape[0]}], got {tuple(targets.shape)}")


# --------------------------------------------------------------------------- torch
def _math_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def logits_row_stats_torch(logits: Tensor, targets: Tensor, inv_temperature: float,
                           return_entropy: bool = False):
    """Plain-PyTorch row statistics (the reference of the kernels and the CPU backend).
    fp64 logits are also accepted here (outputs then fp64), for fp64 parity tests."""
    _check_row_inputs(logits, targets, allow_fp64=True)
    z = logits.to(_math_dtype(logits)) * inv_temperature
    # Shift by the row max (a finite stand-in on all -inf rows) as the kernels do.
    row_max = z.amax(dim=-1) if z.shape[1] else z.new_zeros(z.shape[0])
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = z - row_max[:, None]
    e = torch.exp(shifted)
    sum_e = e.sum(-1)
    lse = row_max + torch.log(sum_e)
    vocab = logits.shape[1]
    in_range = (targets >= 0) & (targets < vocab)
    safe = torch.where(in_range, targets, torch.zeros_like(targets)).long()
    target_z = z.gather(1, safe[:, None]).squeeze(1) if vocab else torch.zeros_like(lse)
    logp = torch.where(in_range, target_z - lse, torch.zeros_like(lse))
    entropy = None
    if return_entropy:
        # Renormalised by the computed sum (not 1), and 0 * log 0 = 0 at banned (-inf)
        # logits: H = log S - sum e * shifted / S.
        e_z = torch.where(e > 0, e * shifted, torch.zeros_like(e))
        entropy = torch.log(sum_e) - e_z.sum(-1) / sum_e
    return lse, logp, entropy


def logits_grad_inplace_torch(logits: Tensor, targets: Tensor, lse: Tensor, grad_logp: Tensor,
                              inv_temperature: float) -> None:
    """Plain-PyTorch in-place logits gradient (fp32 math, stored in the logits' dtype)."""
    _check_row_inputs(logits, targets, allow_fp64=True)
    dtype = _math_dtype(logits)
    scale = grad_logp.to(dtype) * inv_temperature
    grad = torch.exp(logits.to(dtype) * inv_temperature - lse[:, None].to(dtype)) * (-scale[:, None])
    vocab = logits.shape[1]
    in_range = (targets >= 0) & (targets < vocab)
    safe = torch.where(in_range, targets, torch.zeros_like(targets)).long()
    grad.scatter_add_(1, safe[:, None], torch.where(in_range, scale, torch.zeros_like(scale))[:, None])
    # Rows with grad_logp = 0 are exact zeros whatever their logits (NaN at padding).
    grad = torch.where(scale[:, None] != 0, grad, torch.zeros((), dtype=dtype, device=grad.device))
    logits.copy_(grad)


# --------------------------------------------------------------------------- triton
@triton.jit
def _row_stats_kernel(logits_ptr, targets_ptr, lse_ptr, logp_ptr, entropy_ptr,
                      n_rows, vocab, row_stride, inv_temperature,
                      RETURN_ENTROPY: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    row_base = logits_ptr + rows.to(tl.int64) * row_stride
    inv_t = tl.cast(inv_temperature, tl.float32)
    # A finite "minus infinity": exp(-inf - (-inf)) would be NaN on fully masked rows.
    running_max = tl.full((BLOCK_M,), -1e30, tl.float32)
    sum_exp = tl.zeros((BLOCK_M,), tl.float32)
    sum_exp_z = tl.zeros((BLOCK_M,), tl.float32)  # sum exp(z - max) * z, for the entropy
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < vocab)[None, :]
        z = tl.load(row_base[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32) * inv_t
        z = tl.where(ok, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        rescale = tl.exp(running_max - new_max)
        e = tl.exp(z - new_max[:, None])
        sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
        if RETURN_ENTROPY:  # 0 * log 0 = 0: banned (-inf) logits add nothing
            sum_exp_z = sum_exp_z * rescale + tl.sum(e * tl.where(e > 0.0, z, 0.0), axis=1)
        running_max = new_max
    sum_exp = tl.where(row_ok, sum_exp, 1.0)  # rows past the end: keep log() finite
    lse = running_max + tl.log(sum_exp)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    hit = row_ok & (targets >= 0) & (targets < vocab)
    target_z = tl.load(row_base + targets, mask=hit, other=0.0).to(tl.float32) * inv_t
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, tl.where(hit, target_z - lse, 0.0), mask=row_ok)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + rows, lse - sum_exp_z / sum_exp, mask=row_ok)


@triton.jit
def _grad_inplace_kernel(logits_ptr, targets_ptr, lse_ptr, grad_logp_ptr,
                         n_rows, vocab, row_stride, inv_temperature,
                         BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    row_base = logits_ptr + rows.to(tl.int64) * row_stride
    inv_t = tl.cast(inv_temperature, tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0) * inv_t
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < vocab)[None, :]
        ptrs = row_base[:, None] + cols[None, :]
        z = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) * inv_t
        probs = tl.exp(z - lse[:, None])
        onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
        # rows with grad_logp = 0: exact zeros whatever their logits (NaN at padding)
        grad = tl.where(scale[:, None] != 0.0, (onehot - probs) * scale[:, None], 0.0)
        tl.store(ptrs, grad.to(logits_ptr.dtype.element_ty), mask=ok)


def _launch_config(vocab: int):
    # Under the interpreter each program-iteration costs milliseconds: use big tiles.
    # On a GPU one row per program streams V in wide blocks (Liger's layout).
    if _INTERPRET:
        return 16, min(1024, triton.next_power_of_2(vocab)), 4
    return 2, min(2048, triton.next_power_of_2(vocab)), 8


def logits_row_stats_triton(logits: Tensor, targets: Tensor, inv_temperature: float,
                            return_entropy: bool = False):
    """Triton row statistics: one pass over the logits, online log-sum-exp."""
    _check_row_inputs(logits, targets)
    n_rows, vocab = logits.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    logp = torch.empty_like(lse)
    entropy = torch.empty_like(lse) if return_entropy else None
    if n_rows == 0:
        return lse, logp, entropy
    block_m, block_v, warps = _launch_config(vocab)
    _row_stats_kernel[(triton.cdiv(n_rows, block_m),)](
        logits, targets.contiguous(), lse, logp, entropy if return_entropy else lse,
        n_rows, vocab, logits.stride(0), float(inv_temperature),
        RETURN_ENTROPY=return_entropy, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=warps)
    return lse, logp, entropy


def logits_grad_inplace_triton(logits: Tensor, targets: Tensor, lse: Tensor, grad_logp: Tensor,
                               inv_temperature: float) -> None:
    """Triton in-place logits gradient: one read and one write of the logits."""
    _check_row_inputs(logits, targets)
    n_rows, vocab = logits.shape
    if n_rows == 0:
        return
    block_m, block_v, warps = _launch_config(vocab)
    _grad_inplace_kernel[(triton.cdiv(n_rows, block_m),)](
        logits, targets.contiguous(), lse.float().contiguous(), grad_logp.float().contiguous(),
        n_rows, vocab, logits.stride(0), float(inv_temperature),
        BLOCK_M=block_m, BLOCK_V=block_v, num_warps=warps)


def row_kernels(backend: str):
    """(logits_row_stats, logits_grad_inplace) of a concrete backend."""
    if backend == "torch":
        return logits_row_stats_torch, logits_grad_inplace_torch
    if backend == "triton":
        return logits_row_stats_triton, logits_grad_inplace_triton
    if backend == "cuda":
        from ..cuda import logits_grad_inplace_cuda, logits_row_stats_cuda

        return logits_row_stats_cuda, logits_grad_inplace_cuda
    raise ValueError(f"backend must be one of ('torch', 'triton', 'cuda'), got {backend!r}")
