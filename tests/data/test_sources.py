"""Where data set files are found, what a missing file says, and downloads through torchvision."""

import numpy as np
import pytest

from torchglow.cli.errors import in_flags
from torchglow.data import DATASETS, DatasetError, load_dataset

from data_checks import write_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fashion_mnist_system_folder_when_no_data_dir(tmp_path, monkeypatch):
    from torchglow.data import sources

    write_mnist(tmp_path / "debian", compress=True)
    monkeypatch.setenv("TORCHGLOW_DATA", str(tmp_path / "empty"))
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion-mnist", tmp_path / "debian")
    assert len(load_dataset("fashion-mnist", "train")) == 5


@pytest.mark.parametrize("name", [name for name in DATASETS if name != "digits"])
def test_missing_files_give_one_line_dataset_error(tmp_path, name):
    with pytest.raises(DatasetError) as error:
        load_dataset(name, data_dir=tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message and "\n" not in message
    downloadable = not name.startswith(("imagenet", "lsun"))
    assert ("add `download` to fetch them" in message) == downloadable  # the parameter, for the CLI to word
    assert ("add --download to fetch them" in in_flags(message)) == downloadable
    assert "--" not in message


def test_default_data_dir_follows_torchglow_data(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHGLOW_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match=str(tmp_path / "cifar10")):
        load_dataset("cifar10")


def test_download_fetches_through_torchvision_then_parses(tmp_path, monkeypatch):
    import torchvision.datasets
    from scipy.io import savemat

    def fake_svhn(root, split, download):  # writes what torchvision's download would, without the network
        assert download
        savemat(f"{root}/{split}_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1))})

    monkeypatch.setattr(torchvision.datasets, "SVHN", fake_svhn)
    assert len(load_dataset("svhn", "train", data_dir=tmp_path, download=True)) == 2


def test_failed_download_is_a_one_line_dataset_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(**kwargs):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\nTried https://...")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DatasetError, match="download failed") as error:
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    assert "\n" not in str(error.value)


def test_failed_download_leaves_no_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    def half_done(root, **kwargs):  # as torchvision: the folder and a partial archive, then an error
        (tmp_path / "data" / "cifar10").mkdir(parents=True)
        (tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise RuntimeError("connection reset")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", half_done)
    with pytest.raises(DatasetError, match="connection reset"):
        load_dataset("cifar10", data_dir=tmp_path / "data" / "cifar10", download=True)
    assert list(tmp_path.iterdir()) == []  # data/ was created by the download: it is gone
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("kept")
    with pytest.raises(DatasetError):
        load_dataset("cifar10", data_dir=tmp_path / "data" / "cifar10", download=True)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["mine.txt"]  # only what the download made goes
