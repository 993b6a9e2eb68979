"""``torchglow evaluate`` (:mod:`torchglow.cli.evaluate`) on a tiny trained run."""

import json

import pytest

from conftest import cli as call
from cli_checks import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> str:
    return tiny_run(tmp_path_factory)


def test_evaluate(run, capsys, tmp_path):
    from torchglow.train.checkpoint import load_model
    from torchglow.data import load_dataset
    from torchglow.tools.ood import scores_bpd

    code, out, _ = call(capsys, "evaluate", run, "--device", "cpu", "--out", tmp_path / "eval.json")
    assert code == 0
    result = json.loads(out)
    assert result["dataset"] == "digits/test" and result["images"] == 300
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    # the mean of per-image bits/dim computed through log_prob, with other noise draws: 300 x 64
    # dimensions of U(0, 1/32) noise move the mean by far less than 0.01
    per_image = scores_bpd(load_model(run), load_dataset("digits", "test").images, seed=1)
    assert result["bits_per_dim"] == pytest.approx(float(per_image.mean()), abs=0.01)


def test_fast_on_the_cpu_says_when_it_pays(run, capsys, tmp_path):
    """One note line saying that --fast pays only on a GPU."""
    for command in (["sample", run, "--temperatures", "0", "--out", tmp_path], ["evaluate", run]):
        code, _, err = call(capsys, *command, "--device", "cpu", "--fast")
        assert code == 0
        notes = [line for line in err.splitlines() if "--fast" in line]
        assert len(notes) == 1 and "pays off only on a GPU" in notes[0], err
