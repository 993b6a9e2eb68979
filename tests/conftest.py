import pytest
import torch

from torchglow import GlowConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> GlowConfig:
    """A model small enough for full Jacobians: 1x4x4 images, 2 levels of 2 steps."""
    fields = dict(image_shape=(1, 4, 4), n_levels=2, n_steps=2, hidden_channels=8, n_bits=5)
    fields.update(overrides)
    return GlowConfig(**fields)
