"""``nn.Module`` wrappers: options fixed at construction, tensors at call time."""

from __future__ import annotations

import torch

from .functional import BACKENDS, lpo_loss
from .grpo import grpo_loss, grpo_options
from .options import LPOOptions


class LPOLoss(torch.nn.Module):
    """Module form of :func:`lpo_kernels.lpo_loss`; options as keyword arguments
    (``target``, ``divergence``, ..., ``group_size``, ``backend``, ``validate``)."""

    def __init__(self, *, group_size=None, backend="auto", validate=None, **options):
        super().__init__()
        LPOOptions(**options)  # fail at construction on a bad option
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.options = dict(options)
        self.group_size = group_size
        self.backend = backend
        self.validate = validate

    def forward(self, logp, old_logp, mask, group_ids, rewards=None, advantages=None,
                cu_seqlens=None):
        return lpo_loss(logp, old_logp, mask, group_ids, rewards, advantages,
                        cu_seqlens=cu_seqlens, group_size=self.group_size,
                        backend=self.backend, validate=self.validate, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class GRPOLoss(torch.nn.Module):
    """Module form of :func:`lpo_kernels.grpo_loss` (options: :class:`GRPOOptions`)."""

    def __init__(self, **options):
        super().__init__()
        grpo_options(**options)  # fail at construction on a bad option
        self.options = dict(options)

    def forward(self, logp, old_logp, mask, advantages, ref_logp=None, **tensors):
        """``tensors``: entropy, sampling_logp, importance_sampling_ratio, num_items_in_batch."""
        return grpo_loss(logp, old_logp, mask, advantages, ref_logp=ref_logp, **tensors,
                         **self.options)
