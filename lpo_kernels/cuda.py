"""The CUDA C++ backend: Python side of ``lpo_kernels._cuda`` (kernels in ../csrc/).

The extension is torch-free: its functions take raw device pointers (``data_ptr()``),
sizes and the current CUDA stream as integers. This module checks every tensor first
(device, dtype, contiguity, shapes), allocates the outputs, and launches on
``torch.cuda.current_stream()``; nothing here synchronises with the device (except the
documented ``reduction="none"`` with general group ids, as in the reference).

- ``listwise_forward_cuda(batch, options) -> ListwiseResult``: the listwise step, the
  contract of ``reference.listwise_forward`` (fp32 math for fp32/bf16/fp16 log-probs), in
  four launches: per-sequence sums, one warp per group, one block for the loss and stats,
  per-token gradient (general group ids add a few torch ops to sort sequences by group).
- ``logits_row_stats_cuda`` / ``logits_grad_inplace_cuda``: the loss head's row kernels
  (contract in ``lpo_kernels/ops/loss_head.py``).

Build: ``pip install --no-build-isolation -e .`` compiles the extension when nvcc is found
(``LPO_KERNELS_CUDA=1`` to require it, ``0`` to skip it); see setup.py and csrc/.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from . import reference
from .inputs import InputDTypeError, ListwiseBatch, malformed_offsets
from .options import LPOOptions
from .stats import LPOStats

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MASK_NONE, _MASK_BOOL, _MASK_F32 = 0, 1, 2
_TARGET_CODES = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "maxrl": 3, "softmax": 4, "advantages": 5}
_DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "alpha": 2, "js": 3}
_CLIP_CODES = {"clamp": 0, "ppo": 1, "none": 2}

_BUILD_HINT = ("build it with `LPO_KERNELS_CUDA=1 pip install --no-build-isolation -e . -v` "
               "(needs nvcc; the log says why a build failed)")


def cuda_extension_available() -> bool:
    """True when the compiled module ``lpo_kernels._cuda`` imports (a GPU is not needed)."""
    try:
        from . import _cuda  # noqa: F401
    except ImportError:
        return False
    return True


def _extension():
    try:
        from . import _cuda
    except ImportError as error:
        raise RuntimeError(f"backend='cuda' needs the compiled extension lpo_kernels._cuda, "
                           f"which is not installed ({error}); {_BUILD_HINT}") from error
    return _cuda


def _output(shape, dtype, device) -> Tensor:
    """Uninitialised output; NaN-poisoned under LPO_KERNELS_POISON=1 (tests) so a value the
    kernel forgot to write cannot pass for a result."""
    if os.environ.get("LPO_KERNELS_POISON") == "1" and dtype.is_floating_point:
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check_cuda(name: str, x: Tensor, device: torch.device | None = None) -> None:
    if not isinstance(x, Tensor):
        raise InputDTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors: {name} is on {x.device} "
                         f"(use backend='torch' or 'triton' on CPU)")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but logits/logp are on {device}")


def _check_float_dtype(name: str, x: Tensor) -> int:
    if x.dtype not in _DTYPE_CODES:
        raise InputDTypeError(f"{name} must be float32, bfloat16 or float16 for backend='cuda', got "
                              f"{x.dtype} (use backend='torch' for float64)")
    return _DTYPE_CODES[x.dtype]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _ptr(x: Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


# --------------------------------------------------------------------------- listwise
def _token_inputs(batch: ListwiseBatch):
    """(logp, old_logp, mask, mask kind, cu_seqlens) laid out for the kernels: contiguous,
    logp and old_logp in one dtype, mask as bool or fp32, offsets as int64."""
    logp, old, mask = batch.logp, batch.old_logp, batch.mask
    _check_float_dtype("logp", logp)
    if old is not None:
        _check_float_dtype("old_logp", old)
        if old.dtype != logp.dtype:  # mixed storage: compare in fp32, as the reference does
            logp, old = logp.float(), old.float()
    if mask is None:
        mask_kind = _MASK_NONE
    elif mask.dtype == torch.bool:
        mask_kind = _MASK_BOOL
    else:  # mask values weight tokens (reference: mask.to(dtype)); fp32 keeps them
        mask, mask_kind = mask.to(torch.float32), _MASK_F32
    cu = None if batch.cu_seqlens is None else batch.cu_seqlens.to(torch.int64).contiguous()
    logp = logp.detach().contiguous()
    old = None if old is None else old.detach().contiguous()
    mask = None if mask is None else mask.contiguous()
    return logp, old, mask, mask_kind, cu


def listwise_forward_cuda(batch: ListwiseBatch, options: LPOOptions) -> reference.ListwiseResult:
    """The listwise step on the GPU; same contract and outputs as
    ``reference.listwise_forward`` (token_grad fp32, 1/G folded in for reduction='mean')."""
    device = batch.logp.device
    _check_float_dtype("logp", batch.logp)
    if batch.old_logp is not None:
        _check_float_dtype("old_logp", batch.old_logp)
    for name in ("logp", "old_logp", "mask", "group_ids", "cu_seqlens"):
        x = getattr(batch, name)
        if x is not None:
            _check_cuda(name, x, device)
    values = batch.scores_source
    _check_cuda("advantages" if options.needs_advantages else "rewards", values, device)
    logp, old, mask, mask_kind, cu = _token_inputs(batch)
    ext = _extension()
    n = batch.n_seqs
    seq_len = 0 if batch.packed else logp.shape[1]
    dtype_code = _DTYPE_CODES[logp.dtype]
    f32, i64 = torch.float32, torch.int64

    with torch.cuda.device(device):
        stream = _stream(device)
        token_args = (logp.data_ptr(), _ptr(old), _ptr(mask), dtype_code, mask_kind, _ptr(cu), n, seq_len,
                      logp.numel())

        sum_delta, n_tokens = _output((n,), f32, device), _output((n,), f32, device)
        ext.sequence_sums(*token_args, sum_delta.data_ptr(), n_tokens.data_ptr(), stream)

        # Group slots: consecutive rows of group_size, or members sorted by slot with
        # offsets built without a sync (n_seqs slots bound the number of groups).
        if batch.group_size is not None:
            n_slots, order, offsets = n // batch.group_size, None, None
            slots = None
        else:
            slots = reference.group_slots(batch.group_ids, None, n, device)
            order = torch.argsort(slots, stable=True)
            counts = torch.zeros(n, dtype=i64, device=device).index_add_(0, slots, torch.ones_like(slots))
            offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
            n_slots = n
        values = values.to(f32).contiguous()
        coef, seq_scale = _output((n,), f32, device), _output((n,), f32, device)
        per_slot = [_output((n_slots,), f32, device) for _ in range(5)]
        divergence, entropy_p, entropy_w, abs_coef, members = per_slot
        ext.group_step(sum_delta.data_ptr(), n_tokens.data_ptr(), values.data_ptr(), _ptr(order), _ptr(offsets),
                       batch.group_size or 0, n_slots, _TARGET_CODES[options.target],
                       _DIVERGENCE_CODES[options.divergence], options.alpha, options.tau, options.eps,
                       options.seq_reduce == "mean", coef.data_ptr(), seq_scale.data_ptr(),
                       divergence.data_ptr(), entropy_p.data_ptr(), entropy_w.data_ptr(), abs_coef.data_ptr(),
                       members.data_ptr(), stream)

        # float_out: loss, divergence, listwise entropy, target entropy, mean |c|; int_out:
        # n_groups, non-empty sequences, counted tokens, clipped low, clipped high, malformed
        # cu_seqlens offsets (the kernels clamp them: validate=False never reads out of bounds).
        float_out, int_out = _output((5,), f32, device), torch.empty(6, dtype=i64, device=device)
        ext.finalize_groups(divergence.data_ptr(), entropy_p.data_ptr(), entropy_w.data_ptr(), abs_coef.data_ptr(),
                            members.data_ptr(), n_slots, options.reduction == "mean", float_out.data_ptr(),
                            int_out.data_ptr(), stream)
        token_grad = _output(logp.shape, f32, device)
        low, high = options.log_ratio_bounds
        ext.token_grad(*token_args, seq_scale.data_ptr(), coef.data_ptr(),
                       int_out.data_ptr() if options.reduction == "mean" else 0,  # n_groups: 1/G on the device
                       _CLIP_CODES[options.clip], low, high, token_grad.data_ptr(), int_out[2:].data_ptr(), stream)
        if cu is not None and n == 0:  # packed tokens but no sequence: no token launch
            token_grad.zero_()
            int_out[5] = malformed_offsets(cu, logp.shape[0])

    token_group = None
    if options.reduction == "none":
        if batch.group_size is not None:
            n_out = n_slots
            slots = torch.arange(n, device=device) // batch.group_size
        else:
            n_out = int(slots.max()) + 1 if n else 0  # the documented sync of reduction="none"
        loss = divergence[:n_out]
        seq_index = reference.token_sequence_index(batch.cu_seqlens, logp.shape[0])
        token_group = reference.per_token(slots, seq_index)
    else:
        loss = float_out[0]

    counted = int_out[2]
    clip_fractions = int_out[3:5].to(f32) / counted.clamp(min=1).to(f32)  # low, high
    stats = LPOStats(
        divergence=float_out[1],
        listwise_entropy=float_out[2],
        target_entropy=float_out[3],
        clip_fraction=clip_fractions.sum(),
        clip_fraction_low=clip_fractions[0],
        clip_fraction_high=clip_fractions[1],
        mean_abs_coef=float_out[4],
        n_groups=int_out[0],
        n_seqs=int_out[1],
        n_tokens=counted,
        cu_seqlens_errors=int_out[5],
    )
    return reference.ListwiseResult(loss, token_grad, token_group, stats)


# --------------------------------------------------------------------------- loss head rows
def _check_rows(logits: Tensor, targets: Tensor, inv_temperature) -> tuple[int, float]:
    """Type, dtype, shape and stride checks (they need no GPU; devices are checked after)."""
    for name, x in (("logits", logits), ("targets", targets)):
        if not isinstance(x, Tensor):
            raise InputDTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    dtype_code = _check_float_dtype("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [rows, vocab], got shape {tuple(logits.shape)}")
    if logits.stride(1) != 1 and logits.shape[1] > 1:
        raise ValueError(f"logits must have unit column stride (rows may be padded), got strides {logits.stride()}")
    if logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]:
        raise ValueError(f"logits rows overlap: row stride {logits.stride(0)} < vocab {logits.shape[1]}")
    if logits.shape[0] > 0 and logits.shape[1] == 0:
        raise ValueError("logits must have at least one column (vocab >= 1)")
    if targets.dtype != torch.int64:
        raise InputDTypeError(f"targets must be int64, got {targets.dtype}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be [{logits.shape[0]}] (one per logits row), got {tuple(targets.shape)}")
    if isinstance(inv_temperature, bool) or not isinstance(inv_temperature, (int, float)):
        raise TypeError(f"inv_temperature must be a Python number, got {type(inv_temperature).__name__}")
    if not (math.isfinite(inv_temperature) and inv_temperature > 0):
        raise ValueError(f"inv_temperature must be finite and > 0, got {inv_temperature}")
    return dtype_code, float(inv_temperature)


def _check_devices(**tensors: Tensor) -> None:
    """Every tensor on the GPU of the first one."""
    device = None
    for name, x in tensors.items():
        _check_cuda(name, x, device)
        device = x.device if device is None else device


def _row_vector(name: str, x: Tensor, rows: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise InputDTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputDTypeError(f"{name} must be a floating-point tensor (float32 preferred), got {x.dtype}")
    if x.shape != (rows,):
        raise ValueError(f"{name} must be [{rows}] (one per logits row), got {tuple(x.shape)}")
    return x.to(torch.float32).contiguous()  # as the Triton helper: other float dtypes are converted


def logits_row_stats_cuda(logits: Tensor, targets: Tensor, inv_temperature: float,
                          return_entropy: bool = False):
    """(lse, logp, entropy | None), fp32 [M], of z = logits * inv_temperature per row:
    lse = logsumexp(z) (online, one pass), logp = z[target] - lse (0 for a target outside
    [0, V)), entropy = lse - sum softmax(z) z."""
    dtype_code, inv_t = _check_rows(logits, targets, inv_temperature)
    _check_devices(logits=logits, targets=targets)
    rows, vocab = logits.shape
    device = logits.device
    lse, logp = _output((rows,), torch.float32, device), _output((rows,), torch.float32, device)
    entropy = _output((rows,), torch.float32, device) if return_entropy else None
    if rows == 0:
        return lse, logp, entropy
    ext = _extension()
    targets = targets.contiguous()
    with torch.cuda.device(device):
        ext.logits_row_stats(logits.data_ptr(), dtype_code, rows, vocab, logits.stride(0), targets.data_ptr(),
                             inv_t, lse.data_ptr(), logp.data_ptr(), _ptr(entropy), _stream(device))
    return lse, logp, entropy


def logits_grad_inplace_cuda(logits: Tensor, targets: Tensor, lse: Tensor, grad_logp: Tensor,
                             inv_temperature: float) -> None:
    """logits <- grad_logp * (onehot(target) - softmax(z)) * inv_temperature, in the logits'
    dtype; rows with grad_logp == 0 become zeros; an out-of-range target has no one-hot."""
    dtype_code, inv_t = _check_rows(logits, targets, inv_temperature)
    rows, vocab = logits.shape
    lse = _row_vector("lse", lse, rows)
    grad_logp = _row_vector("grad_logp", grad_logp, rows)
    _check_devices(logits=logits, targets=targets, lse=lse, grad_logp=grad_logp)
    device = logits.device
    if rows == 0 or vocab == 0:
        return
    ext = _extension()
    targets = targets.contiguous()
    with torch.cuda.device(device):
        ext.logits_grad_inplace(logits.data_ptr(), dtype_code, rows, vocab, logits.stride(0), targets.data_ptr(),
                                lse.data_ptr(), grad_logp.data_ptr(), inv_t, _stream(device))
