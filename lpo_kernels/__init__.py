"""lpo-kernels: fused kernels for Listwise Policy Optimization (LPO) and GRPO losses."""

from .functional import grpo_loss, lpo_loss
from .fused_linear import (FusedLinearLPOLoss, HeadOutputs, fused_linear_grpo_loss,
                           fused_linear_logprobs, fused_linear_lpo_group_stats,
                           fused_linear_lpo_loss)
from .group_stats import LPOGroupStats, combine_group_stats, lpo_group_stats
from .inputs import InputDTypeError
from .functional import DoubleBackwardError
from .inputs import NonFiniteInputError
from .modules import GRPOLoss, LPOLoss
from .options import GRPOOptions, LPOOptions
from .stats import GRPOStats, LPOStats

__version__ = "0.1.0"

__all__ = [
    "lpo_loss", "grpo_loss", "LPOLoss", "GRPOLoss", "LPOOptions", "GRPOOptions",
    "LPOStats", "GRPOStats", "InputDTypeError",
    "fused_linear_lpo_loss", "fused_linear_grpo_loss", "fused_linear_logprobs",
    "fused_linear_lpo_group_stats", "FusedLinearLPOLoss", "HeadOutputs",
    "lpo_group_stats", "combine_group_stats", "LPOGroupStats",
    "NonFiniteInputError", "DoubleBackwardError",
]
