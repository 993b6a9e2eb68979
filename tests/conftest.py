import pytest
import torch

from torchglow import Glow, GlowConfig
from torchglow.cli import main


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


def amplifying_model() -> Glow:
    """One level, one step, no channel mixing; the ActNorm's inverse multiplies by e^85 (float32 overflows above
    3.4e38 ≈ 41·e^85): decode(T·ε) is finite for |ε|·T < 41 and inf beyond."""
    model = Glow(tiny_config(n_levels=1, n_steps=1, coupling="additive", permutation="reverse", learn_top=False))
    with torch.no_grad():
        model.levels[0][0].actnorm.logs.fill_(-85 / 3)  # stored divided by the log-scale factor 3
        model.levels[0][0].actnorm.initialized.fill_(True)
    return model


@pytest.fixture
def run_cli(capsys):
    """``torchglow.cli.main`` in-process: ``run_cli(*args) -> (exit code, stdout, stderr)``."""

    def run(*args):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        out, err = capsys.readouterr()
        return rc, out, err

    return run
