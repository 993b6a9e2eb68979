"""Training: the step, the loop, checkpoints and run folders."""

from ..config import train_preset
from .loop import TrainResult, train
from .training import TrainingError

__all__ = ["TrainResult", "TrainingError", "train", "train_preset"]
