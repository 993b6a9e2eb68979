"""Data sets: each loader reads small files written here in the real on-disk format."""

import gzip
import io
import json
import os
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from torchglow.data import (
    DATASETS,
    DatasetError,
    ImageFileDataset,
    TensorImageDataset,
    check_dataset_name,
    folder_layout,
    infer_image_shape,
    load_dataset,
    pick_indices,
)

from conftest import FUZZ, assert_one_error_line, cli
from tool_checks import image_folder, split_folder, write_image

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.RandomState(0)


def assert_image_dataset(dataset, length, shape, labels=None):
    """Length, attributes and the (uint8 image, int64 scalar label) items of a data set."""
    assert len(dataset) == length
    assert dataset.image_shape == shape
    image, label = dataset[length - 1]
    assert image.dtype == torch.uint8 and image.shape == shape
    assert label.dtype == torch.int64 and label.ndim == 0
    if labels is not None:
        assert dataset.labels.tolist() == list(labels)


# --------------------------------------------------------------------------- digits


def test_digits_split_and_5_bit_encoding():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert isinstance(train, TensorImageDataset) and train.name == "digits/train"
    assert_image_dataset(train, 1497, (1, 8, 8))
    assert_image_dataset(test, 300, (1, 8, 8))
    assert train.num_classes == 10 and train.class_names == [str(d) for d in range(10)]
    # Pixels are level * 8: floor(x / 8) (the model's 5-bit reduction) gives the levels back.
    images = torch.cat([train.images, test.images])
    assert (images % 8 == 0).all() and images.max() == 16 * 8
    levels = torch.sort(torch.from_numpy(load_digits().images).reshape(-1, 64).long(), dim=0).values
    assert torch.equal(torch.sort((images // 8).reshape(-1, 64).long(), dim=0).values, levels)
    assert sorted(torch.cat([train.labels, test.labels]).tolist()) == sorted(load_digits().target.tolist())


def test_digits_split_is_seeded():
    first, again = load_dataset("digits", "test"), load_dataset("digits", "test")
    other = load_dataset("digits", "test", seed=1)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)


def test_padding_and_channel_conversion():
    padded = load_dataset("digits", "test", image_size=12, channels=3)
    plain = load_dataset("digits", "test")
    assert padded.image_shape == (3, 12, 12)
    assert torch.equal(padded.images[:, :, 2:10, 2:10], plain.images.expand(-1, 3, -1, -1))
    assert padded.images.sum() == 3 * plain.images.sum()  # the border is zeros
    with pytest.raises(DatasetError, match="smaller"):
        load_dataset("digits", image_size=4)
    with pytest.raises(DatasetError, match="channels"):
        load_dataset("digits", channels=2)


# --------------------------------------------------------------------------- MNIST idx files


def write_idx(path, array, compress=False):
    """An idx file: 0, 0, type 0x08 (uint8), ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with (gzip.open if compress else open)(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def write_mnist(folder, n_train=5, n_test=3, compress=False):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = RNG.randint(0, 256, (n, 28, 28)), RNG.randint(0, 10, n)
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[prefix] = images, labels
    return arrays


def test_mnist_in_torchvision_layout(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw")
    for split, prefix, n in (("train", "train", 5), ("test", "t10k", 3)):
        dataset = load_dataset("mnist", split, data_dir=tmp_path)
        images, labels = arrays[prefix]
        assert_image_dataset(dataset, n, (1, 28, 28), labels)
        assert np.array_equal(dataset.images[:, 0].numpy(), images)
        assert dataset.num_classes == 10


def test_fashion_mnist_flat_gz_folder_padded_to_32(tmp_path):
    images, labels = write_mnist(tmp_path, compress=True)["t10k"]
    dataset = load_dataset("fashion-mnist", "test", data_dir=tmp_path, image_size=32)
    assert_image_dataset(dataset, 3, (1, 32, 32), labels)
    assert np.array_equal(dataset.images[:, 0, 2:30, 2:30].numpy(), images)
    assert dataset.images[:, :, :2].sum() == 0 and dataset.images[:, :, :, 30:].sum() == 0
    assert dataset.class_names[0] == "T-shirt/top"


def test_fashion_mnist_system_folder_when_no_data_dir(tmp_path, monkeypatch):
    import torchglow.data

    write_mnist(tmp_path / "debian", compress=True)
    monkeypatch.setenv("TORCHGLOW_DATA", str(tmp_path / "empty"))
    monkeypatch.setitem(torchglow.data._SYSTEM_DIRS, "fashion-mnist", tmp_path / "debian")
    assert len(load_dataset("fashion-mnist", "train")) == 5


def test_corrupt_idx_file_is_a_dataset_error(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(DatasetError, match="idx"):
        load_dataset("mnist", data_dir=tmp_path)


# --------------------------------------------------------------------------- CIFAR-10, SVHN


def write_cifar10(folder, per_batch=2):
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": RNG.randint(0, 256, (per_batch, 3072)).astype(np.uint8),
            "labels": list(RNG.randint(0, 10, per_batch)),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def test_cifar10_pickle_batches(tmp_path):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py")
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    order = [f"data_batch_{i}" for i in range(1, 6)]
    assert_image_dataset(train, 10, (3, 32, 32), [label for name in order for label in batches[name]["labels"]])
    # Rows are R, G, B planes of 32x32, in batch order.
    assert np.array_equal(train.images[2].numpy(), batches["data_batch_2"]["data"][0].reshape(3, 32, 32))
    assert train.class_names[9] == "truck" and train.num_classes == 10
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert_image_dataset(test, 2, (3, 32, 32), batches["test_batch"]["labels"])


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    images = RNG.randint(0, 256, (4, 3, 32, 32)).astype(np.uint8)
    savemat(
        tmp_path / "test_32x32.mat",
        {"X": images.transpose(2, 3, 1, 0), "y": np.array([[10], [1], [9], [10]], np.uint8)},
    )
    dataset = load_dataset("svhn", "test", data_dir=tmp_path)
    assert_image_dataset(dataset, 4, (3, 32, 32), [0, 1, 9, 0])
    assert np.array_equal(dataset.images.numpy(), images)


# --------------------------------------------------------------------------- ImageNet npz


def write_imagenet_npz(path, labels, size=32, mean=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    # Image i is filled with the value 10 * i + channel, so order and CHW layout are visible.
    data = (np.arange(len(labels))[:, None, None] * 10 + np.arange(3)[None, :, None]).repeat(size * size, 2)
    arrays = {"data": data.reshape(len(labels), -1).astype(np.uint8), "labels": np.array(labels)}
    if mean:  # the real training batches also hold the mean image
        arrays["mean"] = np.zeros(3 * size * size)
    np.savez_compressed(path, **arrays)


def test_imagenet32_npz_batches(tmp_path):
    train_dir = tmp_path / "Imagenet32_train_npz"
    for number, labels in ((1, [1, 2]), (2, [3]), (10, [1000, 5, 6])):
        write_imagenet_npz(train_dir / f"train_data_batch_{number}.npz", labels, mean=True)
    write_imagenet_npz(tmp_path / "Imagenet32_val_npz" / "val_data.npz", [7, 8])
    train = load_dataset("imagenet32", "train", data_dir=tmp_path)
    assert isinstance(train, TensorImageDataset) and train.num_classes == 1000
    assert_image_dataset(train, 6, (3, 32, 32), [0, 1, 2, 999, 4, 5])  # batch 10 after batch 2
    assert train.images[3, :, 0, 0].tolist() == [0, 1, 2] and train.images[4, 2].unique().tolist() == [12]
    assert_image_dataset(load_dataset("imagenet32", "test", data_dir=tmp_path), 2, (3, 32, 32), [6, 7])
    with pytest.raises(DatasetError, match="expected"):  # 32x32 rows are not imagenet64's
        load_dataset("imagenet64", "test", data_dir=tmp_path)


# --------------------------------------------------------------------------- CelebA


def write_celeba(root, partitions):
    """Faces 178x218 with a red band of 20 rows at top and bottom (outside the centre square)."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    face = np.zeros((218, 178, 3), np.uint8)
    face[:, :] = (0, 0, 255)
    face[:20], face[-20:] = (255, 0, 0), (255, 0, 0)
    for name in names:
        Image.fromarray(face).save(folder / "img_align_celeba" / name, quality=95)
    attribute_names = [f"Attribute_{k}" for k in range(40)]
    values = RNG.choice([-1, 1], (len(names), 40))
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values)]
    (folder / "list_attr_celeba.txt").write_text("\n".join([str(len(names)), " ".join(attribute_names), *rows]) + "\n")
    (folder / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partitions)))
    return values > 0


def test_celeba_attributes_partitions_and_centre_crop(tmp_path):
    attributes = write_celeba(tmp_path, [0, 0, 1, 2, 0, 2])
    train = load_dataset("celeba", "train", data_dir=tmp_path)
    assert isinstance(train, ImageFileDataset)
    assert_image_dataset(train, 3, (3, 64, 64), [-1, -1, -1])
    assert train.num_classes is None and train.attribute_names[:2] == ["Attribute_0", "Attribute_1"]
    assert train.attributes.dtype == torch.bool and torch.equal(
        train.attributes, torch.from_numpy(attributes[[0, 1, 4]])
    )
    image, _ = train[0]
    assert image[2].float().mean() > 240 and image[0].float().mean() < 15  # the red bands are cropped away
    test = load_dataset("celeba", "test", data_dir=tmp_path, image_size=32, channels=1)
    assert_image_dataset(test, 2, (1, 32, 32))
    assert torch.equal(test.attributes, torch.from_numpy(attributes[[3, 5]]))
    (tmp_path / "celeba" / "img_align_celeba" / "000001.jpg").unlink()  # e.g. images unzipped one level too deep
    with pytest.raises(DatasetError, match="000001.jpg not found"):
        load_dataset("celeba", "train", data_dir=tmp_path)


# --------------------------------------------------------------------------- image folders


def test_image_folder_classes_split_and_corrupt_file(tmp_path):
    for i in range(30):
        write_image(tmp_path / "cat" / f"{i:02d}.png", value=10)
        write_image(tmp_path / "dog" / "sub" / f"{i:02d}.jpg", value=200)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = load_dataset(str(tmp_path), "train", image_size=8)
        test = load_dataset(f"folder:{tmp_path}", "test", image_size=8)
    assert len(caught) == 1 and "1 unreadable" in str(caught[0].message) and "broken.png" in str(caught[0].message)
    assert isinstance(train, ImageFileDataset) and train.class_names == ["cat", "dog"]
    assert len(train) + len(test) == 60 and len(test) in (5, 6)  # 61 files: 6 in test, before dropping broken.png
    assert set(train.paths).isdisjoint(test.paths)
    for dataset in (train, test):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
            assert image.float().mean().item() == pytest.approx(10 if label == 0 else 200, abs=2)
    assert torch.equal(load_dataset(str(tmp_path), "test", image_size=8).labels, test.labels)  # deterministic


def test_flat_image_folder_is_unlabelled_and_reads_all_formats(tmp_path):
    for i, fmt in enumerate(["png", "jpeg", "bmp", "webp", "gif"] * 4):
        write_image(tmp_path / f"{i:02d}.{fmt}", size=(20, 12), value=100, fmt=fmt)
    train = load_dataset(str(tmp_path), image_size=6, channels=1)
    assert_image_dataset(train, 18, (1, 6, 6), [-1] * 18)  # 20 files, 10% of them in the test split
    assert train.num_classes is None and train.class_names is None
    assert all(train[i][0].float().mean().item() == pytest.approx(100, abs=3) for i in range(len(train)))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path)):
        load_dataset(f"folder:{tmp_path}", image_size=8)
    (tmp_path / "bad.png").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no readable images"):
        load_dataset(str(tmp_path), image_size=8)
    for i in range(9):  # too few files for a test split (10%, rounded down)
        write_image(tmp_path / "small" / f"{i}.png")
    assert len(load_dataset(str(tmp_path / "small"), "train", image_size=8)) == 9
    with pytest.raises(DatasetError, match="test split.*10% of its images .seed 0.* it has 9, at least 10 are needed"):
        load_dataset(str(tmp_path / "small"), "test", image_size=8)
    write_image(tmp_path / "small" / "9.png")
    assert len(load_dataset(str(tmp_path / "small"), "test", image_size=8)) == 1
    with pytest.raises(DatasetError, match="no such folder .*missing"):
        load_dataset(f"folder:{tmp_path / 'missing'}", image_size=8)


def test_split_folders_are_splits_and_their_subfolders_the_classes(tmp_path):
    """train/ and test/ are the splits (never classes), cat/ and ship/ below them the classes; the
    shape is read from the images (8x8 RGB PNGs and JPEGs); "all" is every image."""
    folder = split_folder(tmp_path / "cats_and_ships")
    layout = folder_layout(folder)
    assert layout.split_folders and layout.test_from == "test/" and layout.counts() == {"train": 24, "test": 8}
    train, test, every = (load_dataset(str(folder), split) for split in ("train", "test", "all"))
    assert train.class_names == test.class_names == ["cat", "ship"]
    assert_image_dataset(train, 24, (3, 8, 8), [0] * 12 + [1] * 12)
    assert_image_dataset(test, 8, (3, 8, 8), [0] * 4 + [1] * 4)
    assert len(every) == 32 and set(every.paths) == set(train.paths) | set(test.paths)
    assert all(p.parts[-3] == "test" and p.suffix == ".jpg" for p in test.paths)
    images, labels = test.take(range(len(test)))
    assert images.shape == (8, 3, 8, 8)
    for image, label in zip(images, labels):  # JPEG: close to the written grey value
        assert image.float().mean().item() == pytest.approx(40 + 150 * label.item(), abs=4)
    with pytest.raises(DatasetError, match="no val split"):
        load_dataset(str(folder), "val")


def test_val_folder_or_a_share_of_train_is_the_test_split(tmp_path):
    for i in range(20):
        write_image(tmp_path / "tv" / "train" / f"{i}.png", size=(8, 8), seed=i)
    for i in range(3):
        write_image(tmp_path / "tv" / "val" / f"{i}.png", size=(8, 8), seed=100 + i)
    layout = folder_layout(tmp_path / "tv")
    assert layout.test_from == "val/" and layout.class_names is None
    assert load_dataset(str(tmp_path / "tv"), "test").paths == load_dataset(str(tmp_path / "tv"), "val").paths
    assert len(load_dataset(str(tmp_path / "tv"), "all")) == 23  # val/ counted once
    (tmp_path / "tv" / "val").rename(tmp_path / "tv" / "other")  # train/ alone: 10% of it; other/ not read
    layout = folder_layout(tmp_path / "tv")
    assert layout.test_from == "10% of train/ (seed 0)" and layout.counts() == {"train": 18, "test": 2}
    assert layout.ignored == ["other/"]
    with pytest.warns(UserWarning, match="read as the splits train/; not read: other/"):
        load_dataset(str(tmp_path / "tv"), "train")


def test_flat_folder_is_split_with_a_fixed_seed_and_share(tmp_path):
    """A folder of class subfolders without split folders: 10% of its files (rounded down) are the
    test split, drawn with seed 0 whatever the seed asked for."""
    for name in ("cat", "ship"):
        for i in range(20):
            write_image(tmp_path / "flat" / name / f"{i:02d}.png", size=(8, 8), seed=i)
    layout = folder_layout(tmp_path / "flat")
    assert not layout.split_folders and layout.test_from == "10% of its images (seed 0)"
    assert layout.counts() == {"train": 36, "test": 4} and layout.class_names == ["cat", "ship"]
    tests = [load_dataset(str(tmp_path / "flat"), "test", seed=seed).paths for seed in (0, 7)]
    assert tests[0] == tests[1] == layout.files["test"]


def test_image_shape_is_read_from_the_images(tmp_path):
    """The most common size when square and shared by most images; grey only when every image is."""
    for i in range(6):
        write_image(tmp_path / "mixed" / f"a{i}.jpg", size=(16, 16), seed=i, fmt="JPEG")
    write_image(tmp_path / "mixed" / "wide.png", size=(30, 12))
    write_image(tmp_path / "mixed" / "grey.png", size=(9, 9), mode="L")
    assert infer_image_shape(tmp_path / "mixed") == (3, 16, 16)
    data = load_dataset(str(tmp_path / "mixed"), "all")
    assert data.image_shape == (3, 16, 16) and data.take([0])[0].shape == (1, 3, 16, 16)
    for i in range(3):
        write_image(tmp_path / "grey" / f"{i}.png", size=(12, 12), mode="L")
    assert load_dataset(str(tmp_path / "grey"), "all").image_shape == (1, 12, 12)
    assert load_dataset(str(tmp_path / "grey"), "all", image_shape=(3, 8, 8)).image_shape == (3, 8, 8)
    with pytest.raises(DatasetError, match="contradicts"):
        load_dataset(str(tmp_path / "grey"), "all", image_shape=(3, 8, 8), image_size=16)
    for i, size in enumerate([(8, 8), (10, 10), (12, 12), (16, 16)]):  # no size shared by most
        write_image(tmp_path / "sizes" / f"{i}.png", size=size)
    with pytest.raises(DatasetError, match=r"4 image sizes, the most common .* in 1 of 4 images.*image_size"):
        load_dataset(str(tmp_path / "sizes"), "all")
    write_image(tmp_path / "oblong" / "0.png", size=(12, 8))
    with pytest.raises(DatasetError, match="every image is 12x8, not square"):
        load_dataset(str(tmp_path / "oblong"), "all")
    assert len(load_dataset(str(tmp_path / "sizes"), "all", image_size=8)) == 4


def test_a_missing_folder_says_no_such_folder_with_the_closest(tmp_path, monkeypatch):
    split_folder(tmp_path / "cats_and_ships", 1, 1)
    for name in (str(tmp_path / "cats_and_shps"), f"folder:{tmp_path / 'cats_and_shps'}"):
        with pytest.raises(DatasetError, match=f"no such folder '{tmp_path / 'cats_and_shps'}': did you mean "
                                               f"'{tmp_path / 'cats_and_ships'}'"):
            check_dataset_name(name)
    monkeypatch.chdir(tmp_path)
    for name in ("cats_and_shps", "./cats_and_shps"):
        with pytest.raises(DatasetError, match="no such folder 'cats_and_shps': did you mean 'cats_and_ships'"):
            check_dataset_name(name)
    with pytest.raises(DatasetError, match="no such folder 'nowhere/x' .nor is there a folder nowhere."):
        check_dataset_name("nowhere/x")
    with pytest.raises(DatasetError, match="unknown data set 'cifar1' .*did you mean 'cifar10'"):
        check_dataset_name("cifar1")


def test_every_split_of_a_named_data_set(tmp_path):
    train, test, every = (load_dataset("digits", split) for split in ("train", "test", "all"))
    assert len(every) == len(train) + len(test) == 1797
    assert torch.equal(every.images, torch.cat([train.images, test.images])) and every.class_names == train.class_names
    with pytest.raises(DatasetError, match="digits has no val split"):
        load_dataset("digits", "val")


# The model of the training runs on image folders (through the CLI): 3x8x8, tiny, one epoch.
FOLDER_MODEL = ["--image-shape", "3", "8", "8", "--n-levels", "2", "--n-steps", "1", "--hidden-channels", "8",
                "--batch-size", "8", "--epochs", "1", "--init-images", "8", "--eval-batch-size", "64",
                "--sample-temperatures", "0", "1", "--device", "cpu", "--num-workers", "0"]


def test_training_on_an_empty_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, "train", "--dataset", tmp_path / "empty", "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, tmp_path / "empty", "holds no images")


def test_training_on_a_folder_of_unreadable_files_only(capsys, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"x{i}.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 3 unreadable"):
        rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, folder, "no readable images")


def test_unreadable_files_are_skipped_with_one_warning(capsys, tmp_path):
    """Empty, non-image and garbage files (with image extensions) are skipped with one warning that
    counts them; grey, RGBA and palette images of any size are converted to RGB and cropped/resized
    to the model's 8x8; the run finishes."""
    folder = image_folder(tmp_path / "imgs", 24)
    write_image(folder / "grey.png", size=(13, 9), mode="L")
    write_image(folder / "rgba.png", size=(40, 17), mode="RGBA")
    write_image(folder / "pal.gif", size=(5, 5), mode="P")
    write_image(folder / "big.jpg", size=(64, 64), fmt="JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    (folder / "noise.webp").write_bytes(os.urandom(500))
    (folder / "README.txt").write_text("ignored: not an image extension")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, out, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert rc == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"]
    assert "bits/dim" in out and f"torchglow sample {tmp_path / 'run'}" in out
    skipped = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert skipped and all("skipped" in m for m in skipped)
    assert sum(int(m.split("skipped ")[1].split()[0]) for m in skipped) == 3  # over the train and test splits


def test_grey_and_odd_sized_images_are_converted(tmp_path):
    """Grey images become RGB (the grey plane repeated); any size is centre-cropped to a square
    and resized (Lanczos) to the model's size."""
    folder = tmp_path / "imgs"
    write_image(folder / "grey.png", size=(13, 9), mode="L")
    write_image(folder / "wide.png", size=(40, 17), mode="RGBA")
    data = load_dataset(str(folder), "train", image_size=8, channels=3)
    assert len(data) == 2
    for i in range(len(data)):
        x, _ = data[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    grey = data[[p.name for p in data.paths].index("grey.png")][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_truncated_image_is_named(capsys, tmp_path):
    """A truncated PNG passes PIL's header check; decoding it fails, and the error names the file
    (image folders are decoded once at start-up, for the per-pixel baseline)."""
    folder = image_folder(tmp_path / "imgs", 24)
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (folder / "zz_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, folder / "zz_truncated.png", "truncated")


def test_data_set_smaller_than_the_batch(capsys, tmp_path):
    folder = image_folder(tmp_path / "imgs", 21)  # 19 training images, 2 test images
    rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL,
                     "--batch-size", "32")
    assert_one_error_line(rc, err, "has 19 images, fewer than --batch-size 32")
    # under 10 images the 10% test split is empty
    small = image_folder(tmp_path / "small", 5)
    rc, _, err = cli(capsys, "train", "--dataset", small, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, small, "no readable images in its test split")


def test_num_classes_without_class_subfolders(capsys, tmp_path):
    folder = image_folder(tmp_path / "imgs", 24)
    rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL,
                     "--num-classes", "3")
    assert_one_error_line(rc, err, "--num-classes 3", "has no labels")


def test_training_on_an_unknown_data_set(capsys, tmp_path):
    rc, _, err = cli(capsys, "train", "--dataset", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert_one_error_line(rc, err, "nowhere")


def _image_bytes(kind, seed, cut):
    buf = io.BytesIO()
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (9, 7, 3), dtype=np.uint8)).save(buf, kind)
    data = buf.getvalue()
    return data[: int(len(data) * cut)]


FILE_CONTENT = st.one_of(
    st.binary(max_size=300),
    st.builds(_image_bytes, st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP"]), st.integers(0, 9),
              st.floats(0.0, 1.0)),
)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".webp"]), FILE_CONTENT),
                min_size=1, max_size=6))
def test_fuzz_image_folders(tmp_path_factory, files):
    """Random bytes and truncated images of every format: loading and iterating a folder raises
    nothing but DatasetError (and warns about skipped files); what it yields is well-formed."""
    folder = tmp_path_factory.mktemp("imgs")
    for i, (ext, content) in enumerate(files):
        (folder / f"f{i}{ext}").write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            data = load_dataset(str(folder), "train", image_size=8)
        except DatasetError:
            return
        for i in range(len(data)):
            try:
                x, y = data[i]
            except DatasetError:
                continue
            assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and int(y) == -1


# --------------------------------------------------------------------------- missing files, downloads


@pytest.mark.parametrize("name", [name for name in DATASETS if name != "digits"])
def test_missing_files_give_one_line_dataset_error(tmp_path, name):
    with pytest.raises(DatasetError) as error:
        load_dataset(name, data_dir=tmp_path / "nowhere")
    message, cli_message = str(error.value), error.value.cli_message
    assert str(tmp_path / "nowhere") in message and "\n" not in message
    downloadable = not name.startswith(("imagenet", "lsun"))
    assert ("pass download=True" in message) == downloadable and ("add --download" in cli_message) == downloadable
    assert "download=True" not in cli_message


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


# --------------------------------------------------------------------------- .npz data sets
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


# --------------------------------------------------------------------------- LSUN (LMDB folders)
def _write_lsun_lmdb(folder, images):
    """An LMDB folder as the LSUN release has them: sha1-like hex ids as keys, webp images as values."""
    lmdb = pytest.importorskip("lmdb", reason="the LSUN reader needs the optional lmdb package")
    env = lmdb.open(str(folder), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, pixels in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="WEBP", lossless=True)
            txn.put(f"{i:040x}".encode(), buf.getvalue())
    env.close()


def _official_lsun_image(pixels, res):
    """openai/glow generate_tfr/lsun.py: centre_crop, then resize((res, res), ANTIALIAS) (= Lanczos)."""
    h, w = pixels.shape[:2]
    crop = min(h, w)
    pixels = pixels[(h - crop) // 2: (h + crop) // 2, (w - crop) // 2: (w + crop) // 2]
    out = np.asarray(Image.fromarray(pixels, "RGB").resize((res, res), Image.Resampling.LANCZOS))
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


def test_lsun_lmdb_folders(tmp_path, monkeypatch):
    rng = np.random.RandomState(1)
    train = [rng.randint(0, 256, shape, dtype=np.uint8) for shape in ((30, 41, 3), (43, 30, 3), (24, 24, 3))]
    val = [rng.randint(0, 256, (31, 20, 3), dtype=np.uint8)]
    _write_lsun_lmdb(tmp_path / "tower_train_lmdb", train)
    _write_lsun_lmdb(tmp_path / "tower_val_lmdb", val)
    assert "lsun-tower" in DATASETS

    ds = load_dataset("lsun-tower", data_dir=tmp_path, image_size=8)
    assert_image_dataset(ds, 3, (3, 8, 8), labels=[-1, -1, -1])
    for i, pixels in enumerate(train):  # keys in LMDB order, which is the order written (sorted ids)
        assert torch.equal(ds[i][0], _official_lsun_image(pixels, 8))
    test = load_dataset("lsun-tower", "test", data_dir=tmp_path, image_size=16, channels=1)
    assert_image_dataset(test, 1, (1, 16, 16))
    every = load_dataset("lsun-tower", "all", data_dir=tmp_path, image_size=8)  # both folders, in order
    assert_image_dataset(every, 4, (3, 8, 8), labels=[-1] * 4)
    assert torch.equal(every.take([1, 3])[0], torch.stack([ds[1][0], _official_lsun_image(val[0], 8)]))
    again = pickle.loads(pickle.dumps(ds))  # a spawned DataLoader worker gets it so
    assert torch.equal(again[2][0], ds[2][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)  # a worker process opens its own
    assert torch.equal(next(iter(loader))[0], ds.take([0, 1, 2])[0])

    with pytest.raises(DatasetError, match=r"lsun-bedroom: .*bedroom_train_lmdb/data.mdb not found.*fyu/lsun"):
        load_dataset("lsun-bedroom", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="one data set per category: lsun-bedroom"):
        check_dataset_name("lsun")
    _write_lsun_lmdb(tmp_path / "bedroom_train_lmdb", val)
    monkeypatch.setitem(sys.modules, "lmdb", None)  # as if lmdb were not installed
    with pytest.raises(DatasetError, match=r"needs the lmdb package: pip install 'torchglow\[lsun\]'"):
        load_dataset("lsun-bedroom", data_dir=tmp_path)
