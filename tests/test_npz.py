"""``.npz`` data sets (torchglow.data.load_npz): uint8 images ``x`` (N, H, W) or (N, H, W, C) and
labels ``y``; the split from a ``split`` array, a ``NAME_test.npz`` beside ``NAME_train.npz``, or
seeded. (Its own file to keep clear of test_data.py's owner this round; it belongs there.)"""

import numpy as np
import pytest
import torch

from torchglow.data import DatasetError, load_dataset


def test_npz_with_a_split_array_rgb(tmp_path):
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", x=x, y=np.arange(6, dtype=np.uint8), split=np.array([0, 1, 0, 0, 1, 0]))
    train, test = (load_dataset(str(tmp_path / "s.npz"), split) for split in ("train", "test"))
    assert torch.equal(train.images, torch.from_numpy(x[[0, 2, 3, 5]]).permute(0, 3, 1, 2))
    assert test.labels.tolist() == [1, 4] and test.images.shape == (2, 3, 4, 4)


def test_npz_train_and_test_files_grey_padded(tmp_path):
    for name, n in (("m_train", 5), ("m_test", 2)):
        np.savez(tmp_path / f"{name}.npz", x=np.full((n, 6, 6), n, dtype=np.uint8), y=np.zeros(n, dtype=np.uint8))
    test = load_dataset(str(tmp_path / "m_train.npz"), "test", image_size=8)
    assert test.images.shape == (2, 1, 8, 8) and int(test.images[0, 0, 1, 1]) == 2  # the test file, padded
    assert len(load_dataset(str(tmp_path / "m_train.npz"), "train")) == 5


def test_npz_seeded_split_and_bad_files(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((40, 4, 4), dtype=np.uint8), y=np.arange(40))
    train, test = (load_dataset(str(tmp_path / "a.npz"), split, seed=1) for split in ("train", "test"))
    assert len(test) == 2 and sorted(train.labels.tolist() + test.labels.tolist()) == list(range(40))
    np.savez(tmp_path / "b.npz", images=np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"b.npz: a .npz data set needs arrays x .* and y"):
        load_dataset(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 4, 4), dtype=np.float32), y=np.zeros(2))
    with pytest.raises(DatasetError, match="x must be uint8"):
        load_dataset(str(tmp_path / "c.npz"))
    (tmp_path / "d.npz").write_text("not a zip")
    with pytest.raises(DatasetError, match="cannot read .npz data set"):
        load_dataset(str(tmp_path / "d.npz"))
