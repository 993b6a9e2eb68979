"""Opening a run folder, a checkpoint or a pretrained folder as a model with its data."""

import json

import pytest
import torch
from PIL import Image

from torchglow import Glow

from torchglow import preset
from torchglow.config import TrainConfig
from torchglow.train.checkpoint import CheckpointError
from torchglow.data import load_dataset, pick_indices
from torchglow.train.runs import is_run_folder, open_run, read_run_config, run_folder_of

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tmp_path):
    """A run folder as the trainer leaves it, as far as the tools look: config.json with the model
    and training options, a checkpoint file and the model/ pretrained folder."""
    config = preset("digits", n_steps=1, hidden_channels=8)
    folder = tmp_path / "run"
    Glow(config).eval().save_pretrained(folder / "model")
    (folder / "config.json").write_text(json.dumps({"model": config.to_dict(), "train": {"dataset": "digits", "seed": 3}}))
    (folder / "last.pt").write_bytes(b"")
    return folder


def test_the_two_config_files_are_told_apart(run, tmp_path):
    assert read_run_config(run).train == TrainConfig(dataset="digits", seed=3)
    assert not is_run_folder(run / "model")  # a pretrained folder's config.json: the model only
    assert not is_run_folder(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a torchglow run config"):
        read_run_config(run / "model")
    assert run_folder_of(run) == run and run_folder_of(run / "last.pt") == run and run_folder_of(run / "model") == run
    assert run_folder_of(tmp_path) is None


def test_a_model_folder_in_a_run_uses_the_runs_data_split_and_folder(run):
    opened = open_run(run / "model")
    assert opened.folder == run and opened.tool_dir("samples") == run / "samples"
    test = opened.dataset("test")
    assert torch.equal(test.images, load_dataset("digits", "test", seed=3).images)  # the run's seed, not 0
    picked = opened.pick("test", 5, seed=7)
    assert torch.equal(picked.index, pick_indices(300, 5, seed=7)) and torch.equal(picked.images, test.images[picked.index])
    assert picked.y is None  # unconditional
    with pytest.raises(ValueError, match="301 images are needed but data set digits/test has 300"):
        opened.pick("test", 301, seed=0, exactly=True)
    assert opened.display_max_level() == 16  # the digits fill bins 0..16 of 32


def test_outside_a_run(run, tmp_path):
    outside = tmp_path / "pre"
    Glow(preset("digits", n_steps=1, hidden_channels=8, num_classes=10)).save_pretrained(outside)
    opened = open_run(outside)
    assert opened.folder is None and opened.train is None and opened.tool_dir("ood") == outside / "ood"
    assert opened.display_max_level() == 31
    with pytest.raises(ValueError, match="pass `dataset`"):
        opened.dataset("test")
    picked = opened.pick("test", 4, seed=0, name="digits")
    assert torch.equal(picked.y, load_dataset("digits", "test").labels[picked.index])  # conditioning labels
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (8, 8)).save(folder / f"{i}.png")
    with pytest.raises(ValueError, match="class-conditional but data set .* has no class labels"):
        opened.pick("train", 0, seed=0, name=str(folder))
    assert opened.pick("train", 0, seed=0, name=str(folder), labels=False).y is None
