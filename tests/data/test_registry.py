"""The entry point: every split of a named set, unknown names, the seeded choice of images."""

from pathlib import Path

import pytest
import torch

from torchglow.data import DatasetError, check_dataset_name, is_folder, load_dataset, pick_indices, user_path

from tool_checks import write_image

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_split_of_a_named_data_set(tmp_path):
    train, test, every = (load_dataset("digits", split) for split in ("train", "test", "all"))
    assert len(every) == len(train) + len(test) == 1797
    assert torch.equal(every.images, torch.cat([train.images, test.images])) and every.class_names == train.class_names
    with pytest.raises(DatasetError, match="digits has no val split"):
        load_dataset("digits", "val")


def test_unknown_name():
    with pytest.raises(DatasetError,
                       match=r"unknown data set 'no-such-set' \(and no such folder\): choose one of digits, mnist"):
        load_dataset("no-such-set")
    with pytest.raises(DatasetError, match="did you mean 'fashion-mnist'"):
        check_dataset_name("fashion_mnist")
    assert check_dataset_name("cifar10") == "cifar10"
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "valid")


def test_pick_indices_and_take(tmp_path):
    assert pick_indices(5, 0, seed=3).tolist() == [0, 1, 2, 3, 4]  # 0: all, in order
    assert pick_indices(5, 9, seed=3).tolist() == [0, 1, 2, 3, 4]
    picked = pick_indices(100, 10, seed=3)
    assert len(set(picked.tolist())) == 10 and torch.equal(picked, pick_indices(100, 10, seed=3))
    assert not torch.equal(picked, pick_indices(100, 10, seed=4))
    with pytest.raises(ValueError, match=">= 0"):
        pick_indices(5, -1, seed=0)
    digits = load_dataset("digits", "test")
    images, labels = digits.take(torch.tensor([4, 0]))
    assert torch.equal(images, digits.images[[4, 0]]) and torch.equal(labels, digits.labels[[4, 0]])
    for i in range(3):
        write_image(tmp_path / f"{i}.png", value=50 * i)
    folder = load_dataset(str(tmp_path), "all", image_size=4)
    images, labels = folder.take([2, 0])
    assert images.shape == (2, 3, 4, 4) and images[0, 0, 0, 0] == 100 and images[1, 0, 0, 0] == 0
    assert labels.tolist() == [-1, -1]
    assert folder.take([])[0].shape == (0, 3, 4, 4)


def test_a_home_of_no_user_is_a_missing_path_not_a_crash():
    """``~name`` of a user that does not exist is a path that is not there (``Path.expanduser``
    raises RuntimeError for it), wherever the data code expands a user path."""
    assert user_path("~no_such_user_here/x") == Path("~no_such_user_here/x")
    assert not is_folder("~no_such_user_here")
    with pytest.raises(DatasetError, match="no such folder"):
        check_dataset_name("~no_such_user_here/images")
