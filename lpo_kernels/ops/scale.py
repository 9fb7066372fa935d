"""``x <- x * s`` in place for a half-precision tensor and a 0-dim device scalar, the
product formed in fp32 and rounded once.

The fused heads form their gradients in the forward and scale them in the backward by
``grad_output`` (times 1/G). In eager PyTorch a bf16 tensor times an fp32 0-dim CUDA tensor
computes in bf16: s is rounded first (1/3 -> 0.33398), which biases every element alike
(+0.18%). One Triton launch keeps the fp32 math at the traffic of the plain ``mul_`` (read
and write the tensor once). Elsewhere (CPU, no Triton), plain PyTorch does the same math
through fp32 copies of row slices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 4096
SLICE_ELEMENTS = 1 << 25  # elements per fp32 temporary on the plain-PyTorch path (128 MiB)


@triton.jit
def _scale_inplace_kernel(x_ptr, s_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)  # upcast at the load
    s = tl.load(s_ptr).to(tl.float32)
    tl.store(x_ptr + offs, (x * s).to(x_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=inside)


def scale_inplace_triton(x: Tensor, s: Tensor) -> Tensor:
    """The one-launch path (x contiguous, fp16/bf16; s a 0-dim float tensor on x's device)."""
    n = x.numel()
    if n:
        _scale_inplace_kernel[(triton.cdiv(n, _BLOCK),)](x, s, n, BLOCK=_BLOCK, num_warps=8)
    return x


def scale_inplace_torch(x: Tensor, s: Tensor) -> Tensor:
    """The same math in plain PyTorch, by slices of ``SLICE_ELEMENTS`` (fp32 temporaries)."""
    s = s.to(torch.float32)
    if not x.is_contiguous():
        return x.copy_(x.float().mul_(s))
    flat = x.view(-1)
    for e0 in range(0, flat.numel(), SLICE_ELEMENTS):
        part = flat[e0:e0 + SLICE_ELEMENTS]
        part.copy_(part.float().mul_(s))
    return x


def scale_inplace(x: Tensor, s: Tensor) -> Tensor:
    """``x * s`` in place, fp32 math, one rounding: Triton on CUDA, PyTorch elsewhere."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"scale_inplace is for fp16/bf16 tensors, got {x.dtype}")
    if s.numel() != 1 or not s.is_floating_point():
        raise ValueError(f"s must be one floating-point number (a 0-dim tensor), got shape "
                         f"{tuple(s.shape)} {s.dtype}")
    if x.is_cuda and x.is_contiguous() and s.is_cuda:
        return scale_inplace_triton(x, s)
    return scale_inplace_torch(x, s)


__all__ = ["scale_inplace", "scale_inplace_torch", "scale_inplace_triton"]
