"""``torchglow sample`` (:mod:`torchglow.cli.sample`) on a tiny trained run."""

import json
from pathlib import Path

import pytest

from conftest import cli as call
from cli_checks import tiny_run
from tool_checks import open_png

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> str:
    return tiny_run(tmp_path_factory)


def test_sample(run, capsys, tmp_path):
    code, out, _ = call(capsys, "sample", run, "--device", "cpu", "--temperatures", 0, 0.7, "--n", 3,
                        "--max-level", 12, "--out", tmp_path)
    assert code == 0
    summary = json.loads(out)
    assert summary["temperatures"] == [0.0, 0.7] and summary["max_level"] == 12
    assert summary["files"] == [str(tmp_path / "samples_T0-0.7_n3_seed0.png")]
    assert (tmp_path / "samples_T0-0.7_n3_seed0.json").is_file()


def test_sample_white_level_is_the_same_from_the_run_and_its_model_folder(run, capsys):
    """The digits use bins 0..16 of 32: from the run folder, a checkpoint in it or its model/ folder,
    the samples show bin 16 as white, as the trainer's grids; each call writes its own files."""
    levels, files = [], []
    for source in (run, Path(run) / "last.pt", Path(run) / "model"):
        code, out, _ = call(capsys, "sample", source, "--device", "cpu", "--n", 2, "--temperatures", 0.5,
                            "--name", f"from_{Path(source).name}")
        assert code == 0
        summary = json.loads(out)
        levels.append(summary["max_level"])
        files += summary["files"]
    assert levels == [16, 16, 16]
    assert all(Path(f).parent == Path(run) / "samples" for f in files)
    assert len({open_png(f).tobytes() for f in files}) == 1  # the same model (EMA weights) and seed


def test_sample_outside_a_run_shows_the_top_bin(run, capsys, tmp_path):
    from torchglow.train.checkpoint import load_model

    load_model(run).save_pretrained(tmp_path / "pre")
    code, out, _ = call(capsys, "sample", tmp_path / "pre", "--device", "cpu", "--n", 2)
    assert code == 0 and json.loads(out)["max_level"] == 31
    assert Path(json.loads(out)["files"][0]).parent == tmp_path / "pre" / "samples"
