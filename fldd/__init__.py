"""Forward-Learned Discrete Diffusion (Bartosh et al., ICLR 2026) in plain PyTorch.

This package holds the method only: it imports nothing from Ray, MLflow or FastAPI.
"""

from fldd.config import ConfigError, FLDDConfig
from fldd.model import CheckpointError, FLDDModel, ForwardCollapseWarning
from fldd.objective import NELBOEstimate, evaluate_nelbo
from fldd.sampler import sample
from fldd.train import NonFiniteLossError, fit, train_loop

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "FLDDConfig", "FLDDModel", "ForwardCollapseWarning", "NELBOEstimate",
    "NonFiniteLossError", "evaluate_nelbo", "fit", "sample", "train_loop",
]
