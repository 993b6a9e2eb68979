"""Helpers of the data set tests: the checks every data set passes, and MNIST's idx files."""

import gzip

import numpy as np
import torch

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
