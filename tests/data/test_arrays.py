"""The data sets held in memory: each loader reads small files written here in the real on-disk format."""

import pickle

import numpy as np
import pytest
import torch

from torchglow.data import DatasetError, TensorImageDataset, load_dataset

from data_checks import assert_image_dataset, write_mnist

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.RandomState(0)


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


def test_corrupt_idx_file_is_a_dataset_error(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(DatasetError, match="idx"):
        load_dataset("mnist", data_dir=tmp_path)


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
