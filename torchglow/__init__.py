"""torchglow: Glow normalizing flows (Kingma & Dhariwal 2018) in PyTorch, exact and fast.

``torchglow.preprocess`` is the module of pixel <-> model-space maps (its function of the same
name is ``torchglow.preprocess.preprocess``).
"""

from .config import PRESETS, TRAIN_PRESETS, ConfigError, GlowConfig, TrainConfig, preset, train_preset
from .model import FlowOutput, Glow
from .preprocess import bits_per_dim_from_log_prob, dequantize, to_uint8

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "TRAIN_PRESETS",
    "ConfigError",
    "FlowOutput",
    "Glow",
    "GlowConfig",
    "TrainConfig",
    "bits_per_dim_from_log_prob",
    "dequantize",
    "preset",
    "to_uint8",
    "train_preset",
]
