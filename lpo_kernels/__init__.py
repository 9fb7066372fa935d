"""lpo-kernels: fused kernels for Listwise Policy Optimization (LPO) and GRPO losses."""

from .functional import grpo_loss, lpo_loss
from .inputs import InputDTypeError
from .modules import GRPOLoss, LPOLoss
from .options import GRPOOptions, LPOOptions
from .stats import GRPOStats, LPOStats

__version__ = "0.1.0"

__all__ = [
    "lpo_loss", "grpo_loss", "LPOLoss", "GRPOLoss", "LPOOptions", "GRPOOptions",
    "LPOStats", "GRPOStats", "InputDTypeError",
]
