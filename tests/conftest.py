import pytest
import torch

from torchglow import GlowConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread start-up and contention cost more than the work, so one intra-op thread
    is faster and steadier (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**overrides) -> GlowConfig:
    """A model small enough for full Jacobians: 1x4x4 images, 2 levels of 2 steps."""
    fields = dict(image_shape=(1, 4, 4), n_levels=2, n_steps=2, hidden_channels=8, n_bits=5)
    fields.update(overrides)
    return GlowConfig(**fields)
