"""Option records passed through every backend (CCE style: one frozen dataclass, not a
dozen positional arguments). Constructing one validates it, so a bad option fails before
any tensor work, with a ValueError that names the argument."""

from __future__ import annotations

import math
from dataclasses import dataclass

TARGETS = ("grpo", "dr_grpo", "rloo", "maxrl", "softmax", "advantages")
DIVERGENCES = ("forward_kl", "reverse_kl", "alpha", "js")
SEQ_REDUCES = ("mean", "sum")
CLIP_MODES = ("clamp", "ppo", "none")
REDUCTIONS = ("mean", "sum", "none")


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


# The smallest normal float32 (2**-126). The kernels compute in fp32: a smaller divisor
# (tau, a sampling temperature) flushes to 0 on GPUs and its reciprocal overflows.
SMALLEST_DIVISOR = 2.0 ** -126


def check_divisor(name: str, value) -> float:
    """A Python number that the kernels divide by: finite, > 0, and >= SMALLEST_DIVISOR
    so that 1/value is finite in float32 (tau=1e-40 would otherwise give NaN)."""
    value = _check_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if value < SMALLEST_DIVISOR:
        raise ValueError(f"{name} must be >= {SMALLEST_DIVISOR:.8g} (the smallest normal float32: "
                         f"1/{name} must be finite in the kernels' fp32 math), got {value}")
    return value


@dataclass(frozen=True)
class LPOOptions:
    """Every option of the listwise loss (spec: ../shared/docs/lpo-math.md).

    ``tau`` divides the target logits of every target; with the default ``tau=1`` each
    target is exactly the spec's table (``softmax``/``advantages`` are the two where the
    spec names it)."""

    target: str = "grpo"
    divergence: str = "forward_kl"
    alpha: float = 0.5
    tau: float = 1.0
    eps: float = 1e-6
    seq_reduce: str = "mean"
    clip: str = "clamp"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    reduction: str = "mean"

    def __post_init__(self):
        _check_choice("target", self.target, TARGETS)
        _check_choice("divergence", self.divergence, DIVERGENCES)
        _check_choice("seq_reduce", self.seq_reduce, SEQ_REDUCES)
        _check_choice("clip", self.clip, CLIP_MODES)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        for name in ("alpha", "tau", "eps", "clip_eps_low", "clip_eps_high"):
            object.__setattr__(self, name, _check_real(name, getattr(self, name)))
        check_divisor("tau", self.tau)
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        check_divisor("alpha", self.alpha)  # c_k divides by alpha (1 - alpha >= 1e-16 anyway)
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must lie in [0, 1), got {self.eps}")
        if not 0.0 <= self.clip_eps_low <= 1.0:
            raise ValueError(f"clip_eps_low must lie in [0, 1], got {self.clip_eps_low}")
        if self.clip_eps_high < 0.0:
            raise ValueError(f"clip_eps_high must be >= 0, got {self.clip_eps_high}")

    @property
    def needs_advantages(self) -> bool:
        return self.target == "advantages"

    @property
    def log_ratio_bounds(self) -> tuple[float, float]:
        """[log(1 - eps_low), log(1 + eps_high)]; eps_low = 1 means no lower bound."""
        low = -math.inf if self.clip_eps_low >= 1.0 else math.log1p(-self.clip_eps_low)
        return low, math.log1p(self.clip_eps_high)


def __getattr__(name):  # GRPOOptions moved to grpo.py; old imports keep working
    if name in ("GRPOOptions", "GRPO_LOSS_TYPES"):
        from . import grpo

        return getattr(grpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
