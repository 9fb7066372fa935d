"""Detached per-call statistics returned next to every loss. Fields are 0-dim tensors on
the input's device, so producing them never synchronises; ``to_dict`` (which does) is
for logging."""

from __future__ import annotations

from dataclasses import dataclass, fields

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


def __getattr__(name):  # GRPOStats moved to grpo.py; old imports keep working
    if name == "GRPOStats":
        from . import grpo

        return grpo.GRPOStats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
