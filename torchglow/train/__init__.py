"""Training: the step, the loop, checkpoints and run folders."""

from ..config import train_preset
from .loop import TrainingError, train

__all__ = ["TrainingError", "train", "train_preset"]
