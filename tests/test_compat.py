"""Files written by earlier versions load and score as they did: a run folder, its checkpoints and
pretrained folder, and a Hub folder, all written by commit c6995f4 (before the layout of issue 23;
``tests/fixtures/v0_1_c6995f4/README.md`` says how). Each is read through a public path, the CLI
or ``Glow.from_pretrained``, and scored against the bits/dim the old code recorded."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from torchglow import Glow, GlowConfig
from torchglow.data import load_dataset

from conftest import cli

FIXTURE = Path(__file__).parent / "fixtures" / "v0_1_c6995f4"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tmp_path):
    """A copy of the old run folder: the commands write into it."""
    return Path(shutil.copytree(FIXTURE / "run", tmp_path / "run"))


def stored_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def assert_scores(model: Glow, expected: list[float], y: torch.Tensor | None = None) -> None:
    """The bits/dim of the first digits test images, scored as the old code scored them."""
    images, _ = load_dataset("digits", "test").take(range(len(expected)))
    model.eval()
    with torch.no_grad():
        bpd = model.bits_per_dim(images, y, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bpd, torch.tensor(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize("source", ["run", "run/last.pt", "run/best.pt"])
def test_evaluate_scores_as_before(capsys, run, source):
    """``torchglow evaluate`` of the run folder and of each checkpoint file: the run's test set,
    the same bits/dim as the old code's ``torchglow evaluate``."""
    target = run.parent / source
    rc, out, err = cli(capsys, "evaluate", target, "--device", "cpu", "--out", run.parent / "evaluate.json")
    assert rc == 0, err
    result = json.loads((run.parent / "evaluate.json").read_text())
    assert result["images"] == EXPECTED["evaluate"]["images"]
    assert result["bits_per_dim"] == pytest.approx(EXPECTED["evaluate"]["bits_per_dim"], abs=1e-5)


def test_sample_from_the_run_folder(capsys, run):
    rc, out, err = cli(capsys, "sample", run, "--device", "cpu", "--n", "4", "--temperatures", "0.7")
    assert rc == 0, err
    assert any(p.suffix == ".png" for p in (run / "samples").rglob("*"))


def test_checkpoint_loads_and_scores_as_before():
    from torchglow.train.checkpoint import load_model

    model = load_model(FIXTURE / "run" / "last.pt")
    assert model.config.to_dict() == stored_config(FIXTURE / "run")["model"]
    assert_scores(model, EXPECTED["bits_per_dim"]["run/last.pt"])


def test_resume_continues_the_old_run(capsys, run):
    """``torchglow train --resume`` reads the old run's config and checkpoint and trains on with
    the model config it was started with."""
    stored = stored_config(run)
    rc, out, err = cli(capsys, "train", "--resume", run, "--epochs", "2", "--device", "cpu")
    assert rc == 0, err
    assert stored_config(run)["model"] == stored["model"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["epochs"] == 2 and summary["steps"] == 2 * stored_summary_steps()


def stored_summary_steps() -> int:
    return json.loads((FIXTURE / "run" / "summary.json").read_text())["steps"]


@pytest.mark.parametrize("folder,labelled", [("run/model", False), ("pretrained", True)])
def test_pretrained_folder_loads_and_scores_as_before(folder, labelled):
    """``Glow.from_pretrained`` of the run's pretrained folder and of a class-conditional Hub folder
    (edge padding, linear_zeros class layers, shuffle permutation): the stored config, the old
    bits/dim of a fixed batch."""
    model = Glow.from_pretrained(FIXTURE / folder)
    assert model.config == GlowConfig.from_dict(stored_config(FIXTURE / folder))
    assert model.config.to_dict() == stored_config(FIXTURE / folder)
    if folder.startswith("run/"):
        assert model.config.to_dict() == stored_config(FIXTURE / "run")["model"]
    y = torch.tensor(EXPECTED["test_labels"]) if labelled else None
    assert_scores(model, EXPECTED["bits_per_dim"][folder], y)
