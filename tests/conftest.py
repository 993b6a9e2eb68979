import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from torchglow import Glow

from torchglow import GlowConfig

from torchglow import preset
from torchglow.cli import main
from torchglow.config import TrainConfig
from torchglow.train.loop import train

from flow_checks import perturb
from tool_checks import make_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread start-up and contention cost more than the work, so one intra-op thread
    is faster and steadier (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    with _single_thread():
        yield


# The tiny training runs: a 2-step digits model on the CPU, a run of 2 epochs.
TINY = ["--n-steps", "2", "--hidden-channels", "16", "--device", "cpu", "--num-workers", "0"]


def tiny_model_config(**overrides):
    return preset("digits", **{"n_steps": 2, "hidden_channels": 16, **overrides})


def tiny_train_config(out, **overrides) -> TrainConfig:
    fields = dict(dataset="digits", out=str(out), epochs=2, batch_size=32, eval_batch_size=300,
                  warmup_images=500, init_images=64, log_every=5, device="cpu", num_workers=0,
                  sample_temperatures=(0.0, 1.0))
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder of a tiny digits model after 3 steps (config.json, last.pt, init/, model/); read it,
    do not change it (every module that asks shares it)."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    with _single_thread():
        train(tiny_model_config(), tiny_train_config(out, max_steps=3), progress=False)
    return out


# TORCHGLOW_FUZZ_EXAMPLES raises the number of examples of the fuzz tests for a longer local search.
FUZZ = settings(max_examples=int(os.environ.get("TORCHGLOW_FUZZ_EXAMPLES", "50")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def aot_eager(monkeypatch) -> list:
    """The fast paths' compiled code (:data:`torchglow.graphs.COMPILE_BACKEND`) under the aot_eager
    backend: the traced graph run with eager kernels, no code generation, so a test compiles in
    seconds and differs from eager only by float rounding. Returns the list of the graphs compiled
    (so a test can tell that the fast path did not fall back to eager)."""
    from torchglow import graphs

    compiled = []

    def backend(gm, example_inputs):
        compiled.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    monkeypatch.setattr(graphs, "COMPILE_BACKEND", backend)
    return compiled


@pytest.fixture(scope="module")
def model() -> Glow:
    """The tool tests' model (:func:`tool_checks.make_model`)."""
    return make_model()


@pytest.fixture(scope="module")
def cond_model() -> Glow:
    """A class-conditional model of 3 classes."""
    return make_model(num_classes=3)


VARIANTS = {
    "affine_lu": {},
    "affine_plain": dict(lu=False),
    "additive_shuffle": dict(coupling="additive", permutation="shuffle"),
    "affine_reverse_fixedtop": dict(permutation="reverse", learn_top=False),
    "conditional": dict(num_classes=3),
}


def tiny_config(**overrides) -> GlowConfig:
    """A model small enough for full Jacobians: 1x4x4 images, 2 levels of 2 steps."""
    fields = dict(image_shape=(1, 4, 4), n_levels=2, n_steps=2, hidden_channels=8, n_bits=5)
    fields.update(overrides)
    return GlowConfig(**fields)


def tiny_glow(variant: str = "affine_lu", dtype: torch.dtype = torch.float64, **overrides) -> Glow:
    """A :func:`tiny_config` model of one of the :data:`VARIANTS`, every parameter perturbed."""
    model = Glow(tiny_config(**{**VARIANTS[variant], **overrides})).to(dtype)
    perturb(model)
    return model


def class_labels(model: Glow, n: int) -> torch.Tensor | None:
    """Labels 0, 1, 2, ... (cycling) for a class-conditional model, on its device; else None."""
    return torch.arange(n, device=model.device) % model.config.num_classes if model.config.num_classes else None


def amplifying_model() -> Glow:
    """One level, one step, no channel mixing; the ActNorm's inverse multiplies by e^85 (float32 overflows above
    3.4e38 ≈ 41·e^85): decode(T·ε) is finite for |ε|·T < 41 and inf beyond."""
    model = Glow(tiny_config(n_levels=1, n_steps=1, coupling="additive", permutation="reverse", learn_top=False))
    with torch.no_grad():
        model.levels[0][0].actnorm.logs.fill_(-85 / 3)  # stored divided by the log-scale factor 3
        model.levels[0][0].actnorm.initialized.fill_(True)
    return model


def cli(capsys, *args):
    """Run ``torchglow.cli.main`` in-process: (exit code, stdout, stderr)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc, err, *names):
    """Non-zero exit, no traceback, exactly one 'error:' line, naming every one of ``names``."""
    assert rc not in (0, None)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]
