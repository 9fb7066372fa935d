"""Detached per-call statistics returned next to every loss. Fields are 0-dim tensors on
the input's device, so producing them never synchronises; ``to_dict`` (which does) is
for logging."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


class _StatsMixin:
    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Python floats keyed by field name (host sync: call it when you log)."""
        return {prefix + f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class LPOStats(_StatsMixin):
    divergence: Tensor          # mean over counted groups of D(w* || P)
    listwise_entropy: Tensor    # mean over counted groups of the entropy of P
    target_entropy: Tensor      # mean over counted groups of the entropy of w*
    clip_fraction: Tensor       # share of counted tokens whose gradient the clip gate zeroed
    clip_fraction_low: Tensor   # ... below log(1 - clip_eps_low)
    clip_fraction_high: Tensor  # ... above log(1 + clip_eps_high)
    mean_abs_coef: Tensor       # mean |c_k| over non-empty sequences
    n_groups: Tensor            # groups with at least one non-empty response (G)
    n_seqs: Tensor              # non-empty responses
    n_tokens: Tensor            # counted tokens (mask != 0)
    # offsets of cu_seqlens that break 0 = cu[0] <= ... <= cu[B] = N, counted by the kernels
    # (0 = well formed, always 0 for padded input); see ``check_inputs``
    cu_seqlens_errors: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def check_inputs(self) -> None:
        """Raises the ValueError ``validate=True`` would have raised for malformed
        ``cu_seqlens`` (the kernels clamp every offset, so nothing was read or written out
        of bounds, but the loss is not meaningful). Host sync: call it where you log."""
        from .inputs import malformed_offsets_error

        errors = int(self.cu_seqlens_errors)
        if errors:
            raise malformed_offsets_error(errors)


def __getattr__(name):  # GRPOStats moved to grpo.py; old imports keep working
    if name == "GRPOStats":
        from . import grpo

        return grpo.GRPOStats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
