"""lpo-kernels: fused kernels for Listwise Policy Optimization (LPO) and GRPO losses."""

from .functional import lpo_loss
from .fused_grpo import fused_linear_grpo_loss
from .fused_linear import (FusedLinearLPOLoss, HeadOutputs, fused_linear_logprobs,
                           fused_linear_lpo_group_stats, fused_linear_lpo_loss)
from .grpo import GRPOOptions, GRPOStats, grpo_loss, vllm_importance_sampling_ratio
from .group_stats import LPOGroupStats, combine_group_stats, lpo_group_stats
from .inputs import InputDTypeError
from .modules import GRPOLoss, LPOLoss
from .options import LPOOptions
from .stats import LPOStats

__version__ = "0.1.0"

__all__ = [
    "lpo_loss", "grpo_loss", "LPOLoss", "GRPOLoss", "LPOOptions", "GRPOOptions",
    "LPOStats", "GRPOStats", "InputDTypeError",
    "fused_linear_lpo_loss", "fused_linear_grpo_loss", "fused_linear_logprobs",
    "fused_linear_lpo_group_stats", "FusedLinearLPOLoss", "HeadOutputs",
    "lpo_group_stats", "combine_group_stats", "LPOGroupStats", "vllm_importance_sampling_ratio",
]
