"""The data sets held in memory (:class:`~torchglow.data.base.TensorImageDataset`): digits, MNIST,
Fashion-MNIST, CIFAR-10, SVHN, downsampled ImageNet and ``.npz`` files, each parsed from its own file
format; zero-padding and grey <-> RGB conversion of their images."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import DatasetError, TensorImageDataset, split_indices, user_path
from .sources import locate, open_file, subfolders, torchvision_fetch

# (C, H, W) of the sets held in memory, which can only be zero-padded to a larger size
IN_MEMORY_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32),
                    "svhn": (3, 32, 32), "imagenet32": (3, 32, 32), "imagenet64": (3, 64, 64)}
DIGITS_TEST_SIZE = 300  # of scikit-learn's 1797 digits; the other 1497 are the training set
NPZ_TEST_FRACTION = 0.05  # an .npz file without a split: a seeded 95/5 train/test split
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
)  # fmt: skip
DIGIT_CLASSES = tuple(str(digit) for digit in range(10))


def load_digits(split: str, seed: int) -> TensorImageDataset:
    """scikit-learn's 1797 8x8 digits, split 1497/300 by :func:`split_indices`.

    Pixels are grey levels 0..16 stored as ``level * 8`` (0..128): the 17 levels stay consecutive on
    a 5-bit scale, so the model's ``floor(x / 2**(8 - 5))`` with ``n_bits=5`` gives back 0..16.
    """
    from sklearn import datasets

    digits = datasets.load_digits()
    index = split_indices(len(digits.target), DIGITS_TEST_SIZE, split, seed)
    images = torch.from_numpy(digits.images[index].astype(np.uint8) * 8)[:, None]  # (N, 1, 8, 8)
    labels = torch.from_numpy(digits.target[index])
    return TensorImageDataset(images, labels, name=f"digits/{split}", class_names=DIGIT_CLASSES)


def load_mnist(name: str, roots: list[Path], split: str, download: bool) -> TensorImageDataset:
    """MNIST or Fashion-MNIST from idx files, in a folder of their own or torchvision's layout."""
    torchvision_class = "MNIST" if name == "mnist" else "FashionMNIST"
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = locate(
        name,
        subfolders(roots, ["", f"{torchvision_class}/raw"]),
        [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"],
        download=download,
        fetch=torchvision_fetch(torchvision_class, roots[0]),
    )
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if len(images) != len(labels):
        raise DatasetError(f"{name}: {images_path} has {len(images)} images but {labels_path} {len(labels)} labels")
    class_names = DIGIT_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
    return TensorImageDataset(
        torch.from_numpy(images)[:, None], torch.from_numpy(labels), name=f"{name}/{split}", class_names=class_names
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file: two zero bytes, the type code (0x08: uint8), the number of dimensions,
    each dimension as a big-endian uint32, then the values in C order."""
    with open_file(path) as file:
        raw = bytearray(file.read())  # writable, so torch.from_numpy can share it
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DatasetError(f"{path} is not an idx file of uint8 values (bad magic number)")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    values = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if values.size != np.prod(shape):
        raise DatasetError(f"{path}: header says {shape} but holds {values.size} values (truncated file?)")
    return values.reshape(shape)


def load_cifar10(roots: list[Path], split: str, download: bool) -> TensorImageDataset:
    """CIFAR-10's python batches: pickled dicts whose ``data`` rows are 3072 bytes, R, G, B planes."""
    batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    *batch_paths, meta_path = locate(
        "cifar10",
        subfolders(roots, ["cifar-10-batches-py", ""]),
        [*batches, "batches.meta"],
        download=download,
        fetch=torchvision_fetch("CIFAR10", roots[0]),
    )
    contents = [_unpickle(path) for path in batch_paths]
    images = np.concatenate([batch["data"] for batch in contents]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([batch["labels"] for batch in contents])
    return TensorImageDataset(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        name=f"cifar10/{split}",
        class_names=_unpickle(meta_path)["label_names"],
    )


def _unpickle(path: Path) -> dict:
    # The batches were pickled by Python 2; latin1 decodes their str keys and byte strings losslessly.
    with open_file(path) as file:
        return pickle.load(file, encoding="latin1")


def load_svhn(roots: list[Path], split: str, download: bool) -> TensorImageDataset:
    """SVHN's MATLAB files: ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) with the digit 0 labelled 10."""
    from scipy.io import loadmat

    (path,) = locate(
        "svhn",
        roots,
        [f"{split}_32x32.mat"],
        download=download,
        fetch=torchvision_fetch("SVHN", roots[0], split=split),
    )
    with open_file(path) as file:
        mat = loadmat(file)
    images = np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
    labels = mat["y"].reshape(-1).astype(np.int64) % 10
    return TensorImageDataset(
        torch.from_numpy(images), torch.from_numpy(labels), name=f"svhn/{split}", class_names=DIGIT_CLASSES
    )


def load_imagenet(name: str, roots: list[Path], split: str) -> TensorImageDataset:
    """Downsampled ImageNet (Chrabaszcz et al. 2017) npz files: ``data`` (N, 3*s*s) uint8 rows of
    R, G, B planes and ``labels`` 1..1000, made 0-based here."""
    size = int(name.removeprefix("imagenet"))
    pattern = "*train_data_batch_*.npz" if split == "train" else "val_data.npz"
    files = sorted((path for root in roots if root.is_dir() for path in root.rglob(pattern)), key=_batch_order)
    if not files:
        raise DatasetError(
            f"{name}: no {pattern} found below {roots[0]}; download Imagenet{size}_train_npz.zip and "
            f"Imagenet{size}_val_npz.zip from https://image-net.org/download-images and unzip them there"
        )
    labels = [_npz_array(path, "labels") for path in files]
    # Filled batch by batch so that the peak memory is the data set plus one file (ImageNet64: 15 GB).
    images = torch.empty((sum(map(len, labels)), 3, size, size), dtype=torch.uint8)
    start = 0
    for path, batch_labels in zip(files, labels):
        data = _npz_array(path, "data")
        if data.shape != (len(batch_labels), 3 * size * size):
            raise DatasetError(
                f"{path}: data of shape {data.shape}, expected ({len(batch_labels)}, {3 * size * size}) for {name}"
            )
        images[start : start + len(data)] = torch.from_numpy(data.reshape(-1, 3, size, size))
        start += len(data)
    targets = torch.from_numpy(np.concatenate(labels).astype(np.int64) - 1)
    return TensorImageDataset(images, targets, name=f"{name}/{split}", num_classes=1000)


def _batch_order(path: Path) -> tuple[str, int]:
    """Sort key putting train_data_batch_10 after train_data_batch_9."""
    number = re.search(r"_(\d+)\.npz$", path.name)
    return str(path.parent), int(number.group(1)) if number else 0


def _npz_array(path: Path, key: str) -> np.ndarray:
    with np.load(path) as npz:
        return np.asarray(npz[key])


def load_npz(path: str | Path, split: str = "train", seed: int = 0) -> TensorImageDataset:
    """A ``.npz`` file of uint8 images ``x`` (N, H, W) grey or (N, H, W, C) and labels ``y`` (N,).

    The split: the file's ``split`` array (0 train, 1 test) when it has one; else, for
    ``NAME_train.npz``, the test set is ``NAME_test.npz`` beside it; else a seeded 95/5 split
    (:func:`split_indices` with ``seed``, :data:`NPZ_TEST_FRACTION` in the test split)."""
    path = user_path(path)
    keys = _npz_keys(path)
    if split == "test" and "split" not in keys and path.stem.endswith("_train"):
        test_path = path.with_name(path.stem.removesuffix("_train") + "_test.npz")
        if test_path.is_file():
            return load_npz(test_path, "all")
    with np.load(path) as f:
        if "x" not in f or "y" not in f:
            raise DatasetError(f"{path}: a .npz data set needs arrays x (uint8 images) and y (labels); "
                               f"it has {sorted(f.files)}")
        x, y = f["x"], f["y"]
        parts = f["split"] if "split" in f else None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(y) != len(x):
        raise DatasetError(f"{path}: x must be uint8 (N, H, W) or (N, H, W, C) with one label per image in y, "
                           f"got x {x.dtype} {x.shape}, y {y.shape}")
    if parts is not None and split != "all":
        index = np.flatnonzero(parts == (1 if split == "test" else 0))
    elif split == "all" or path.stem.endswith(("_train", "_test")):
        index = np.arange(len(x))
    else:
        index = split_indices(len(x), int(len(x) * NPZ_TEST_FRACTION), split, seed)
    images = torch.from_numpy(x[index])
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
    return TensorImageDataset(images, torch.from_numpy(y[index].astype(np.int64)), name=f"{path.name}/{split}")


def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path) as f:
            return list(f.files)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read .npz data set {path}: {e}") from None


def fit_to_shape(dataset: TensorImageDataset, image_size: int | None, channels: int | None) -> TensorImageDataset:
    """Zero-pad an in-memory set up to ``image_size`` and convert it to ``channels``, in place."""
    if image_size is not None:
        dataset.images = _pad_to(dataset.images, image_size, dataset.name)
    if channels is not None:
        dataset.images = _convert_channels(dataset.images, channels)
    return dataset


def _pad_to(images: torch.Tensor, size: int, name: str) -> torch.Tensor:
    """Centre the images on a ``size`` x ``size`` canvas of zeros (any odd pixel goes bottom/right)."""
    height, width = images.shape[-2:]
    if height == width == size:
        return images
    if size < max(height, width):
        raise DatasetError(
            f"{name}: image_size {size} is smaller than its {height}x{width} images (only padding is supported)"
        )
    top, left = (size - height) // 2, (size - width) // 2
    return F.pad(images, (left, size - width - left, top, size - height - top))


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> RGB by repeating the plane (as the official code tiles MNIST); RGB -> grey by luma."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * luma).sum(1, keepdim=True).round_().to(torch.uint8)
