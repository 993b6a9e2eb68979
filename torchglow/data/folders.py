"""Image data sets: uint8 images (C, H, W) in 0..255 with int64 labels, read from the files on disk.

Every data set yields ``(image, label)``: ``image`` a uint8 tensor (C, H, W), ``label`` an int64
scalar tensor, -1 where the data set has no classes. :func:`load_dataset` is the entry point:

=============== ============ ======================================================================
name            shape        files (under ``data_dir``)
=============== ============ ======================================================================
digits          (1, 8, 8)    none: scikit-learn's bundled ``load_digits()`` (pixels ``level * 8``)
mnist           (1, 28, 28)  ``train-images-idx3-ubyte[.gz]`` ... in ``data_dir`` or ``MNIST/raw/``
fashion-mnist   (1, 28, 28)  the same idx files, in ``data_dir`` or ``FashionMNIST/raw/``
cifar10         (3, 32, 32)  ``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``
svhn            (3, 32, 32)  ``train_32x32.mat``, ``test_32x32.mat``
celeba          (3, 64, 64)  ``celeba/img_align_celeba/``, ``list_attr_celeba.txt``,
                             ``list_eval_partition.txt`` (loaded lazily, 40 binary attributes)
imagenet32/64   (3, s, s)    ``*train_data_batch_*.npz`` and ``val_data.npz`` anywhere below
lsun-CATEGORY   (3, 64, 64)  ``<category>_train_lmdb/``, ``<category>_val_lmdb/`` (LSUN's LMDB
                             folders, loaded lazily; CATEGORY: bedroom, church_outdoor, tower;
                             needs the ``lmdb`` package)
a folder path   (c, s, s)    any images below it (loaded lazily): ``train/``, ``test/``, ``val/``
                             subfolders are splits, the subfolders below them (or of a flat
                             folder) classes (:class:`FolderLayout`); the shape is read from the
                             images unless given (:func:`infer_image_shape`)
=============== ============ ======================================================================

Where the files are: ``data_dir``, or by default ``~/.cache/torchglow/<name>``; the environment
variable ``TORCHGLOW_DATA`` replaces the root ``~/.cache/torchglow``. Fashion-MNIST is also found
in ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package) when no
``data_dir`` is given. Missing files raise :class:`DatasetError`, whose one-line message names the
expected path and how to get the files.

Downloads (``download=True``): torchvision fetches and md5-checks the official files, but the files
are then parsed here rather than by torchvision's data set classes. Those classes refuse any file
whose md5 differs from the official one (CIFAR-10, SVHN, CelebA), so one parser per format serves a
torchvision download, other layouts of the same files (a Debian package, gzip-compressed idx files)
and the small files the tests write.

Sets that fit in memory are :class:`TensorImageDataset` (the trainer moves ``.images`` to the GPU);
CelebA and image folders are :class:`ImageFileDataset`, which decodes one file per item. Every data
set gives images and labels with :meth:`ImageDataset.take`.
"""

from __future__ import annotations

import difflib
import gzip
import math
import os
import pickle
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F

LSUN_CATEGORIES = ("bedroom", "church_outdoor", "tower")  # the official code's LSUN categories
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn", "celeba", "imagenet32", "imagenet64",
            *(f"lsun-{category}" for category in LSUN_CATEGORIES))
# (C, H, W) of the sets held in memory, which can only be zero-padded to a larger size
IN_MEMORY_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32),
                    "svhn": (3, 32, 32), "imagenet32": (3, 32, 32), "imagenet64": (3, 64, 64)}
SPLITS = ("train", "test", "val", "all")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"})

DIGITS_TEST_SIZE = 300  # of scikit-learn's 1797 digits; the other 1497 are the training set
FOLDER_SPLITS = ("train", "test", "val")  # subfolders of an image folder read as splits, not classes
FOLDER_TEST_FRACTION = 0.1  # a folder without test/ or val/: this share of its files is the test split...
FOLDER_SPLIT_SEED = 0  # ...drawn with this seed, fixed, so that every run and tool sees the same split
NPZ_TEST_FRACTION = 0.05  # an .npz file without a split: a seeded 95/5 train/test split
# PIL modes of one channel: a folder of only such images is read as grey (C = 1)
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
CELEBA_IMAGE_SIZE = 64
CELEBA_PARTITION = {"train": "0", "test": "2"}  # list_eval_partition.txt: 0 train, 1 valid, 2 test
LSUN_IMAGE_SIZE = 64

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
)  # fmt: skip
DIGIT_CLASSES = tuple(str(digit) for digit in range(10))

# Folders searched after the default one when no data_dir is given.
_SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}

_SOURCES = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (torchvision's mirror)",
    "fashion-mnist": "https://github.com/zalandoresearch/fashion-mnist (or apt-get install dataset-fashion-mnist)",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
    "celeba": "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Align&Cropped images)",
    "lsun": "https://github.com/fyu/lsun (python download.py -c CATEGORY, then unzip)",
}


class DatasetError(Exception):
    """A data set cannot be loaded as asked: its files are missing or unusable, or it cannot have the
    requested size or channels. The message is one line naming the path and the remedy;
    ``cli_message`` is the same line worded for the command line, where it differs."""

    def __init__(self, message: str, cli_message: str | None = None):
        super().__init__(message)
        self.cli_message = cli_message or message


# --------------------------------------------------------------------------- data set classes


class ImageDataset(torch.utils.data.Dataset):
    """Base class: ``dataset[i]`` is ``(uint8 image (C, H, W), int64 scalar label)``.

    Attributes:
        name: what error messages call it, e.g. ``"digits/train"`` or the folder's path.
        image_shape: ``(C, H, W)`` of every image.
        labels: int64 (N,), -1 everywhere for unlabelled data.
        num_classes, class_names: the classes, or None when unlabelled (ImageNet has no names here).
        attributes: bool (N, A) per-image binary attributes (CelebA) or None; ``attribute_names`` (A,).
    """

    image_shape: tuple[int, int, int]

    def __init__(
        self,
        labels: torch.Tensor,
        *,
        name: str,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        attributes: torch.Tensor | None = None,
        attribute_names: Sequence[str] | None = None,
    ):
        self.name = name
        self.labels = labels
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = len(self.class_names) if num_classes is None and class_names is not None else num_classes
        self.attributes = attributes
        self.attribute_names = list(attribute_names) if attribute_names is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images of shape {self.image_shape})"

    def take(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """The images (uint8 (N, C, H, W)) and labels (int64 (N,)) at ``index``, in its order."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if len(index) == 0:
            return torch.zeros((0, *self.image_shape), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        images, labels = zip(*(self[int(i)] for i in index))
        return torch.stack(images), torch.stack(labels)


class TensorImageDataset(ImageDataset):
    """A data set held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, **metadata):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        super().__init__(labels.long(), **metadata)
        self.images = images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def take(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        return self.images[index], self.labels[index]


class DecodedImageDataset(ImageDataset):
    """Base of the data sets whose images are decoded on access into ``channels`` x ``image_size`` x
    ``image_size`` (:class:`ImageFileDataset`, :class:`LSUNDataset`)."""

    def __init__(self, labels: torch.Tensor, *, image_size: int, channels: int, **metadata):
        super().__init__(labels, **metadata)
        self.image_size = image_size
        self.channels = channels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


class ConcatImageDataset(ImageDataset):
    """Data sets of one image shape one after the other, each image read from its part (the
    ``"all"`` split of a data set read lazily from more than one source, e.g. LSUN's two folders)."""

    def __init__(self, parts: Sequence[ImageDataset], labels: torch.Tensor, **metadata):
        super().__init__(labels, **metadata)
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts[:-1]])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.parts[0].image_shape

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[k][index - int(self.starts[k])][0], self.labels[index]


class ImageFileDataset(DecodedImageDataset):
    """A data set of image files decoded on access (CelebA, image folders).

    Each image is converted to RGB (grey "L" when ``channels == 1``; a GIF gives its first frame),
    cropped to its centred square and resized to ``image_size`` with Lanczos (antialiased) filtering;
    this equals resizing the shorter side to ``image_size`` and centre-cropping.
    """

    def __init__(self, paths: Sequence[Path], labels: torch.Tensor, *, image_size: int, channels: int, **metadata):
        super().__init__(labels, image_size=image_size, channels=channels, **metadata)
        self.paths = list(paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_image(self.paths[index], self.image_size, self.channels), self.labels[index]


@dataclass(frozen=True)
class FolderLayout:
    """How :func:`load_dataset` reads a folder of images (:func:`folder_layout`).

    Splits: when the folder has a ``train/`` subfolder, its ``train/``, ``test/`` and ``val/``
    subfolders are the splits (the test split is ``test/``, else ``val/``, else a seeded
    :data:`FOLDER_TEST_FRACTION` of ``train/``); other entries beside them are not read
    (``ignored``). Otherwise every image below the folder counts, and a permutation seeded with
    :data:`FOLDER_SPLIT_SEED` of the sorted file list puts :data:`FOLDER_TEST_FRACTION` (rounded
    down) in the test split, the rest in the training split. Classes: when every image lies in a
    subfolder of its split folder (or of a flat folder), the sorted names of those subfolders, over
    all splits, are the classes (as torchvision's ImageFolder); otherwise the images are unlabelled
    (-1). Images below a class subfolder, at any depth, belong to that class.

    Attributes:
        folder: the folder.
        split_folders: whether the splits are subfolders (else a seeded split of one folder).
        files: ``{split: image files, sorted}`` for "train", "test" and, when there is ``val/``, "val".
        labels: ``{split: int64 labels}`` in the order of ``files``, -1 when unlabelled.
        class_names: the classes, or None.
        test_from: where the test split comes from, in words (``test/``, ``10% of its images (seed 0)``).
        ignored: entries beside the split folders that are not read.
    """

    folder: Path
    split_folders: bool
    files: dict[str, list[Path]]
    labels: dict[str, torch.Tensor]
    class_names: list[str] | None
    test_from: str
    ignored: list[str]

    def read_order(self) -> list[str]:
        """The splits holding distinct files ("test" is left out when it is ``val/``)."""
        return [split for split in ("train", "test", "val") if split in self.files
                and not (split == "test" and self.test_from == "val/")]

    def counts(self) -> dict[str, int]:
        """Image files per split (before unreadable ones are skipped)."""
        return {split: len(files) for split, files in self.files.items()}


# --------------------------------------------------------------------------- entry point


def pick_indices(n_total: int, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct indices of ``range(n_total)``, the first ``n`` of a permutation seeded with
    ``seed``; all of them, in order, when ``n`` is 0 or at least ``n_total``."""
    if n < 0:
        raise ValueError(f"the number of images must be >= 0, got {n}")
    if n == 0 or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    image_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Load the ``split`` of a data set in :data:`DATASETS`, of an image folder or of an ``.npz`` file.

    ``split``: "train", "test", "all" (both, or every image of a folder) or, for a folder with a
    ``val/`` subfolder, "val". ``name`` is a folder of images when it starts with ``folder:`` or is
    an existing directory that is not also a data set name (its layout: :class:`FolderLayout`).

    ``image_size``: for in-memory sets, pad the images with zeros up to this size (MNIST 28 -> 32,
    as the official code does); for CelebA (default 64) and folders, the size they are resized to
    (a folder's default: :func:`infer_image_shape`). ``channels`` (1 or 3): convert grey <-> RGB
    (RGB -> grey with the ITU-R 601-2 luma weights of PIL's "L"); None keeps the data set's own (a
    folder's: inferred). ``image_shape`` ``(C, H, W)`` with H = W, as ``GlowConfig.image_shape``,
    gives both at once. ``seed`` fixes the train/test split of digits and of ``.npz`` files without
    a split; folders are split with the fixed :data:`FOLDER_SPLIT_SEED`, the other sets officially.

    Raises :class:`DatasetError` (one line, naming the path) for missing or unusable files, an
    unknown name, or a size or channel count the data set cannot take.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if image_shape is not None:
        image_size, channels = _from_image_shape(name, image_shape, image_size, channels)
    if channels not in (None, 1, 3):
        raise DatasetError(f"{name}: channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if is_folder(check_dataset_name(name)):
        folder = Path(name.removeprefix("folder:")).expanduser()
        return _load_image_folder(folder, split, image_size=image_size, channels=channels)
    if split == "val":
        raise DatasetError(f"{name} has no val split: use train, test or all (a folder may have val/)")
    if name.endswith(".npz"):
        return _fit(load_npz(name, split, seed), image_size, channels)
    if split == "all":
        parts = [load_dataset(name, part, data_dir=data_dir, download=download, image_size=image_size,
                              channels=channels, seed=seed) for part in ("train", "test")]
        return _concat(parts, f"{name}/all")
    roots = _data_roots(name, data_dir)

    match name:
        case "digits":
            dataset = _load_digits(split, seed)
        case "mnist" | "fashion-mnist":
            dataset = _load_mnist(name, roots, split, download)
        case "cifar10":
            dataset = _load_cifar10(roots, split, download)
        case "svhn":
            dataset = _load_svhn(roots, split, download)
        case "imagenet32" | "imagenet64":
            dataset = _load_imagenet(name, roots, split)
        case "celeba":
            return _load_celeba(
                roots, split, download, image_size=image_size or CELEBA_IMAGE_SIZE, channels=channels or 3
            )
        case _ if name.startswith("lsun-"):
            return load_lsun(name.removeprefix("lsun-"), split, _data_roots("lsun", data_dir)[0],
                             image_size=image_size or LSUN_IMAGE_SIZE, channels=channels or 3)
    return _fit(dataset, image_size, channels)


def _from_image_shape(name: str, image_shape: Sequence[int], image_size: int | None,
                      channels: int | None) -> tuple[int, int]:
    """``(image_size, channels)`` from an ``image_shape`` (C, S, S) that agrees with them when given."""
    shape = tuple(image_shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DatasetError(f"{name}: image_shape must be (C, S, S), square, got {shape}")
    if (image_size not in (None, shape[1])) or (channels not in (None, shape[0])):
        raise DatasetError(f"{name}: image_shape {shape} contradicts image_size {image_size} / channels {channels}")
    return shape[1], shape[0]


def _concat(parts: list[ImageDataset], name: str) -> ImageDataset:
    """The images of ``parts`` (of one data set) as one data set, in order."""
    first = parts[0]
    attributes = None if first.attributes is None else torch.cat([p.attributes for p in parts])
    metadata = dict(name=name, class_names=first.class_names, num_classes=first.num_classes,
                    attributes=attributes, attribute_names=first.attribute_names)
    labels = torch.cat([p.labels for p in parts])
    if isinstance(first, TensorImageDataset):
        return TensorImageDataset(torch.cat([p.images for p in parts]), labels, **metadata)
    if isinstance(first, ImageFileDataset):
        return ImageFileDataset([path for p in parts for path in p.paths], labels, image_size=first.image_size,
                                channels=first.channels, **metadata)
    return ConcatImageDataset(parts, labels, **metadata)


def is_folder(name: str) -> bool:
    """Whether :func:`load_dataset` reads ``name`` as a folder of images: it starts with ``folder:``,
    or it is an existing directory that is not also a data set name."""
    return bool(name) and name not in DATASETS and (name.startswith("folder:") or Path(name).expanduser().is_dir())


def check_dataset_name(name: str) -> str:
    """``name`` when :func:`load_dataset` can read it (a name in :data:`DATASETS`, an existing folder
    or an ``.npz`` file); else :class:`DatasetError`: "no such folder" (with the closest folder
    beside it) for a path, else "unknown data set" with the closest name."""
    if name in DATASETS or name.endswith(".npz"):
        return name
    if is_folder(name):
        folder = Path(name.removeprefix("folder:")).expanduser()
        if not folder.is_dir():
            raise missing_folder_error(folder)
        return name
    close = difflib.get_close_matches(name.lower(), DATASETS, n=1)
    path_like = name.startswith((".", "~")) or os.sep in name or "/" in name
    if path_like or (not close and _closest_folder(Path(name).expanduser()) is not None):
        raise missing_folder_error(name)
    hint = f"did you mean {close[0]!r}? " if close else ""
    if name.lower() == "lsun":
        hint = "LSUN is one data set per category: lsun-bedroom, lsun-church_outdoor or lsun-tower; "
    raise DatasetError(f"unknown data set {name!r} (and no such folder): {hint}choose one of {', '.join(DATASETS)}, "
                       f"or give a folder of images or an .npz file")


def absolute_dataset(name: str) -> str:
    """``name`` with a folder or ``.npz`` path made absolute (a run stores it so, for the tools to
    find it from any directory); data set names are kept as they are."""
    if name in DATASETS:
        return name
    prefix = "folder:" if name.startswith("folder:") else ""
    return prefix + str(Path(name.removeprefix("folder:")).expanduser().resolve())


def _data_roots(name: str, data_dir: str | Path | None) -> list[Path]:
    """Folders to search for ``name``'s files, the first one also being where downloads go."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    base = Path(os.environ.get("TORCHGLOW_DATA") or Path.home() / ".cache" / "torchglow").expanduser()
    system = _SYSTEM_DIRS.get(name)
    return [base / name] + ([system] if system is not None and system.is_dir() else [])


def _fit(dataset: TensorImageDataset, image_size: int | None, channels: int | None) -> TensorImageDataset:
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


# --------------------------------------------------------------------------- finding and fetching files


def _locate(
    name: str,
    folders: Sequence[Path],
    required: Sequence[str],
    *,
    download: bool,
    fetch: Callable[[], object],
) -> list[Path]:
    """The ``required`` files in the first folder that holds them all, fetched first if asked and needed.

    A required file may also be gzip-compressed (``name.gz``), as MNIST is distributed.
    """
    found = _find_all(folders, required)
    if found is None and download:
        _fetch(name, fetch)
        found = _find_all(folders, required)
    if found is not None:
        return found
    where = " or ".join(str(folder) for folder in folders)
    missing = f"{name}: {', '.join(required)} not found in {where}; "
    remedy = f"get them from {_SOURCES[name]}"
    if download:
        raise DatasetError(missing + remedy)
    raise DatasetError(f"{missing}pass download=True to fetch them, or {remedy}",
                       f"{missing}add --download to fetch them, or {remedy}")


def _find_all(folders: Sequence[Path], required: Sequence[str]) -> list[Path] | None:
    for folder in folders:
        found = [_resolve(folder, filename) for filename in required]
        if all(path is not None for path in found):
            return found
    return None


def _resolve(folder: Path, filename: str) -> Path | None:
    """``folder/filename`` or its gzip-compressed twin ``folder/filename.gz``, whichever exists."""
    for path in (folder / filename, folder / f"{filename}.gz"):
        if path.exists():
            return path
    return None


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _fetch(name: str, fetch: Callable[[], object]) -> None:
    try:
        fetch()
    except Exception as error:  # network, md5, missing gdown...: torchvision raises many kinds
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatasetError(f"{name}: download failed ({detail}); get the files from {_SOURCES[name]}") from error


def _torchvision_fetch(class_name: str, root: Path, **kwargs) -> Callable[[], object]:
    """A callable that has torchvision's ``class_name`` download (and md5-check) its files into
    ``root``; if that fails, the folders it created are removed, so a failed download leaves none."""

    def fetch() -> object:
        from torchvision import datasets

        created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
        try:
            return getattr(datasets, class_name)(root=str(root), download=True, **kwargs)
        except BaseException:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise

    return fetch


def _subfolders(roots: Sequence[Path], layouts: Sequence[str]) -> list[Path]:
    return [root / layout for root in roots for layout in layouts]


# --------------------------------------------------------------------------- in-memory data sets


def _split_indices(n: int, n_test: int, split: str, seed: int) -> np.ndarray:
    """A seeded split of ``range(n)``: a RandomState(seed) permutation's first ``n_test`` are the
    test set, the rest the training set; each part is returned sorted, so keeps the original order."""
    order = np.random.RandomState(seed).permutation(n)
    return np.sort(order[:n_test] if split == "test" else order[n_test:])


def _load_digits(split: str, seed: int) -> TensorImageDataset:
    """scikit-learn's 1797 8x8 digits, split 1497/300 by :func:`_split_indices`.

    Pixels are grey levels 0..16 stored as ``level * 8`` (0..128): the 17 levels stay consecutive on
    a 5-bit scale, so the model's ``floor(x / 2**(8 - 5))`` with ``n_bits=5`` gives back 0..16.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = _split_indices(len(digits.target), DIGITS_TEST_SIZE, split, seed)
    images = torch.from_numpy(digits.images[index].astype(np.uint8) * 8)[:, None]  # (N, 1, 8, 8)
    labels = torch.from_numpy(digits.target[index])
    return TensorImageDataset(images, labels, name=f"digits/{split}", class_names=DIGIT_CLASSES)


def _load_mnist(name: str, roots: list[Path], split: str, download: bool) -> TensorImageDataset:
    """MNIST or Fashion-MNIST from idx files, in a folder of their own or torchvision's layout."""
    torchvision_class = "MNIST" if name == "mnist" else "FashionMNIST"
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = _locate(
        name,
        _subfolders(roots, ["", f"{torchvision_class}/raw"]),
        [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"],
        download=download,
        fetch=_torchvision_fetch(torchvision_class, roots[0]),
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
    with _open(path) as file:
        raw = bytearray(file.read())  # writable, so torch.from_numpy can share it
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DatasetError(f"{path} is not an idx file of uint8 values (bad magic number)")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    values = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if values.size != np.prod(shape):
        raise DatasetError(f"{path}: header says {shape} but holds {values.size} values (truncated file?)")
    return values.reshape(shape)


def _load_cifar10(roots: list[Path], split: str, download: bool) -> TensorImageDataset:
    """CIFAR-10's python batches: pickled dicts whose ``data`` rows are 3072 bytes, R, G, B planes."""
    batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    *batch_paths, meta_path = _locate(
        "cifar10",
        _subfolders(roots, ["cifar-10-batches-py", ""]),
        [*batches, "batches.meta"],
        download=download,
        fetch=_torchvision_fetch("CIFAR10", roots[0]),
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
    with _open(path) as file:
        return pickle.load(file, encoding="latin1")


def _load_svhn(roots: list[Path], split: str, download: bool) -> TensorImageDataset:
    """SVHN's MATLAB files: ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) with the digit 0 labelled 10."""
    from scipy.io import loadmat

    (path,) = _locate(
        "svhn",
        roots,
        [f"{split}_32x32.mat"],
        download=download,
        fetch=_torchvision_fetch("SVHN", roots[0], split=split),
    )
    with _open(path) as file:
        mat = loadmat(file)
    images = np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
    labels = mat["y"].reshape(-1).astype(np.int64) % 10
    return TensorImageDataset(
        torch.from_numpy(images), torch.from_numpy(labels), name=f"svhn/{split}", class_names=DIGIT_CLASSES
    )


def _load_imagenet(name: str, roots: list[Path], split: str) -> TensorImageDataset:
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


# --------------------------------------------------------------------------- file-backed data sets


def _load_celeba(roots: list[Path], split: str, download: bool, *, image_size: int, channels: int) -> ImageFileDataset:
    """CelebA's aligned 178x218 faces, centre-square-cropped (178x178) and resized, with their 40
    binary attributes; "train"/"test" are partitions 0/2 of ``list_eval_partition.txt`` (the
    validation partition 1 is not used). Unlabelled: every label is -1."""
    attr_path, partition_path, image_dir = _locate(
        "celeba",
        _subfolders(roots, ["celeba", ""]),
        ["list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"],
        download=download,
        fetch=_torchvision_fetch("CelebA", roots[0], split="all"),
    )
    filenames, attribute_names, attributes = _read_celeba_attributes(attr_path)
    with _open(partition_path) as file:
        partition = dict(line.split() for line in file.read().decode().splitlines() if line.strip())
    keep = np.array([partition.get(filename) == CELEBA_PARTITION[split] for filename in filenames])
    paths = [image_dir / filename for filename, kept in zip(filenames, keep) if kept]
    if not paths or not paths[0].exists():  # catches a wrong layout before training starts
        raise DatasetError(
            f"celeba: {paths[0] if paths else image_dir} not found; unzip img_align_celeba.zip into {image_dir.parent}"
        )
    return ImageFileDataset(
        paths,
        torch.full((len(paths),), -1, dtype=torch.int64),
        image_size=image_size,
        channels=channels,
        name=f"celeba/{split}",
        attributes=torch.from_numpy(attributes[keep]),
        attribute_names=attribute_names,
    )


def _read_celeba_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``list_attr_celeba.txt``: the image count, the attribute names, then one line per image,
    its file name and -1/1 per attribute. Returns file names, attribute names and a bool array."""
    with _open(path) as file:
        lines = file.read().decode().splitlines()
    rows = [line.split() for line in lines[2:] if line.strip()]
    values = np.array([row[1:] for row in rows], dtype=np.int8)
    return [row[0] for row in rows], lines[1].split(), values > 0


def folder_layout(folder: str | Path) -> FolderLayout:
    """How :func:`load_dataset` reads ``folder`` (see :class:`FolderLayout`): its image files per
    split, their labels and class names. Only file names are read. Raises :class:`DatasetError` for
    a folder that does not exist or holds no images (a split folder without images included)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise missing_folder_error(folder)
    entries = sorted(folder.iterdir())
    split_dirs = {p.name.lower(): p for p in entries if p.is_dir() and p.name.lower() in FOLDER_SPLITS}
    if "train" not in split_dirs:
        files = _image_files(folder)
        if not files:
            raise DatasetError(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        per_split = {split: [files[i] for i in _split_indices(len(files), int(len(files) * FOLDER_TEST_FRACTION),
                                                               split, FOLDER_SPLIT_SEED)]
                     for split in ("train", "test")}
        roots = {"train": folder, "test": folder}
        test_from = f"{FOLDER_TEST_FRACTION:.0%} of its images (seed {FOLDER_SPLIT_SEED})"
        ignored: list[str] = []
    else:
        roots = dict(split_dirs)
        per_split = {split: _image_files(root) for split, root in roots.items()}
        for split, files in per_split.items():
            if not files:
                raise DatasetError(f"image folder {roots[split]} holds no images "
                                   f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
        test_from = next((f"{name}/" for name in ("test", "val") if name in roots), None)
        if test_from is None:  # train/ alone: a seeded share of it is the test split
            files = per_split["train"]
            per_split = {split: [files[i] for i in _split_indices(len(files), int(len(files) * FOLDER_TEST_FRACTION),
                                                                   split, FOLDER_SPLIT_SEED)]
                         for split in ("train", "test")}
            roots["test"] = roots["train"]
            test_from = f"{FOLDER_TEST_FRACTION:.0%} of train/ (seed {FOLDER_SPLIT_SEED})"
        elif "test" not in roots:
            per_split["test"], roots["test"] = per_split["val"], roots["val"]
        ignored = [p.name + ("/" if p.is_dir() else "") for p in entries
                   if p not in split_dirs.values() and (p.is_dir() or p.suffix.lower() in IMAGE_EXTENSIONS)]
    tops = {split: [_class_folder(roots[split], path) for path in files] for split, files in per_split.items()}
    labelled = all(top is not None for names in tops.values() for top in names)
    class_names = sorted({top for names in tops.values() for top in names}) if labelled else None
    label_of = {name: label for label, name in enumerate(class_names or [])}
    labels = {split: torch.tensor([label_of.get(top, -1) for top in names], dtype=torch.int64)
              for split, names in tops.items()}
    return FolderLayout(folder, "train" in split_dirs, per_split, labels, class_names, test_from, ignored)


def _image_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())


def _class_folder(root: Path, path: Path) -> str | None:
    """The top-level subfolder of ``root`` that ``path`` lies in (its class), None directly in ``root``."""
    return path.relative_to(root).parts[0] if path.parent != root else None


def missing_folder_error(folder: str | Path) -> DatasetError:
    """"no such folder", with the closest folder beside it (difflib) when there is one."""
    folder = Path(folder).expanduser()
    close = _closest_folder(folder)
    hint = f": did you mean {str(close)!r}?" if close else ("" if folder.parent.is_dir() else
                                                            f" (nor is there a folder {folder.parent})")
    return DatasetError(f"no such folder {str(folder)!r}{hint}")


def _closest_folder(folder: Path) -> Path | None:
    """The folder beside ``folder`` whose name is closest to its name (difflib), if any is close."""
    parent = folder.parent
    siblings = [p.name for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    close = difflib.get_close_matches(folder.name, siblings, n=1, cutoff=0.6)
    return parent / close[0] if close else None


def infer_image_shape(folder: str | Path, headers: Sequence[tuple[tuple[int, int], str] | None] | None = None
                      ) -> tuple[int, int, int]:
    """The ``(C, S, S)`` a folder's images are read at when no size is given: S from the most common
    image size, which must be square and shared by more than half of the readable images; C = 1
    when every image is grey (PIL modes ``1``, ``L``, ``LA``, ``I``, ``F``...), else 3 (grey images
    are repeated into RGB, losslessly). ``headers``: the (size, mode) of each file (None for an
    unreadable one) when the caller has read them. :class:`DatasetError` when the sizes leave the
    choice to the user."""
    folder = Path(folder).expanduser()
    if headers is None:
        layout = folder_layout(folder)
        headers = _headers([path for split in layout.read_order() for path in layout.files[split]])
    readable = [h for h in headers if h is not None]
    if not readable:
        raise DatasetError(f"image folder {folder} has no readable images")
    sizes = Counter(size for size, _ in readable)
    (width, height), count = sizes.most_common(1)[0]
    channels = _channels(readable)
    if width != height or 2 * count <= len(readable):
        found = (f"{len(sizes)} image sizes, the most common {width}x{height} in {count} of {len(readable)} images"
                 if len(sizes) > 1 else f"every image is {width}x{height}, not square")
        raise DatasetError(
            f"image folder {folder}: cannot infer the image size ({found}); pass image_size (or image_shape) "
            f"to centre-crop and resize every image to one square size",
            f"image folder {folder}: cannot infer the image size ({found}); pass --image-shape {channels} S S "
            f"to centre-crop and resize every image to S x S")
    return channels, width, width


def _channels(headers: Sequence[tuple[tuple[int, int], str]]) -> int:
    """1 when every image is grey, else 3 (grey images repeat into RGB without loss)."""
    return 1 if headers and all(mode in GREY_MODES for _, mode in headers) else 3


def _load_image_folder(
    folder: Path, split: str, *, image_size: int | None, channels: int | None
) -> ImageFileDataset:
    """The ``split`` of the folder's images (:func:`folder_layout`; ``"all"``: every image of it).

    The size and channels not given are inferred (:func:`infer_image_shape`). Files PIL cannot
    identify are skipped with one warning; a flat folder's split is drawn before that, so that one
    corrupt file does not reshuffle it."""
    layout = folder_layout(folder)
    if split not in layout.files and split != "all":
        raise DatasetError(f"image folder {folder} has no {split} split (no {split}/ subfolder)")
    if layout.ignored:
        read = sorted({files[0].relative_to(folder).parts[0] + "/" for files in layout.files.values() if files})
        warnings.warn(f"image folder {folder}: read as the splits {', '.join(read)}; "
                      f"not read: {', '.join(layout.ignored[:5])}{', ...' if len(layout.ignored) > 5 else ''}",
                      stacklevel=3)
    splits = layout.read_order() if split == "all" else [split]
    paths = [path for s in splits for path in layout.files[s]]
    labels = torch.cat([layout.labels[s] for s in splits])
    n_files = len(paths)
    headers = _headers(paths)
    if image_size is None or channels is None:  # read from every image of the folder, so all splits agree
        all_headers = headers if split == "all" else _headers([p for s in layout.read_order() for p in layout.files[s]])
        if image_size is None:
            inferred_channels, image_size, _ = infer_image_shape(folder, all_headers)
        else:
            inferred_channels = _channels([h for h in all_headers if h is not None])
        channels = channels or inferred_channels
    readable = [h is not None for h in headers]
    unreadable = [path for path, ok in zip(paths, readable) if not ok]
    if unreadable:
        warnings.warn(
            f"image folder {folder}: skipped {len(unreadable)} unreadable file(s), the first {unreadable[0]}",
            stacklevel=3,
        )
    if not paths:
        needed = math.ceil(1 / FOLDER_TEST_FRACTION)
        raise DatasetError(
            f"image folder {folder}: no readable images in its test split, which is {layout.test_from} rounded "
            f"down: it has {len(layout.files['train'])}, at least {needed} are needed (or put test images in test/)"
        )
    if len(unreadable) == len(paths):
        raise DatasetError(
            f"image folder {folder}: no readable images in its {split} split ({len(unreadable)} of its "
            f"{n_files} image files are unreadable)"
        )
    return ImageFileDataset(
        [path for path, ok in zip(paths, readable) if ok],
        labels[torch.tensor(readable)],
        image_size=image_size,
        channels=channels,
        name=f"{folder} ({split})",
        class_names=layout.class_names,
    )


def _headers(paths: list[Path]) -> list[tuple[tuple[int, int], str] | None]:
    """The (width, height) and PIL mode of each file, None where PIL cannot identify it; only
    headers are read, in threads, as this is I/O bound."""
    with ThreadPoolExecutor() as pool:
        return list(pool.map(_header, paths))


def _header(path: Path) -> tuple[tuple[int, int], str] | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size, image.mode
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for malformed files
        return None


def read_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """Decode ``path`` to uint8 (channels, size, size): centred square crop, then Lanczos resize."""
    from PIL import Image

    try:
        with Image.open(path) as file:
            image = file.convert("L" if channels == 1 else "RGB")  # a GIF's first frame
    except Exception as error:  # the file changed or is truncated after the header PIL checked
        raise DatasetError(f"cannot read image {path}: {error}") from error
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
    pixels = torch.from_numpy(np.array(image)).reshape(size, size, channels)  # (H, W, C)
    return pixels.permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- .npz files
def load_npz(path: str | Path, split: str = "train", seed: int = 0) -> TensorImageDataset:
    """A ``.npz`` file of uint8 images ``x`` (N, H, W) grey or (N, H, W, C) and labels ``y`` (N,).

    The split: the file's ``split`` array (0 train, 1 test) when it has one; else, for
    ``NAME_train.npz``, the test set is ``NAME_test.npz`` beside it; else a seeded 95/5 split
    (:func:`_split_indices` with ``seed``, :data:`NPZ_TEST_FRACTION` in the test split)."""
    path = Path(path).expanduser()
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
        index = _split_indices(len(x), int(len(x) * NPZ_TEST_FRACTION), split, seed)
    images = torch.from_numpy(x[index])
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
    return TensorImageDataset(images, torch.from_numpy(y[index].astype(np.int64)), name=f"{path.name}/{split}")


def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path) as f:
            return list(f.files)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read .npz data set {path}: {e}") from None


# --------------------------------------------------------------------------- LSUN (LMDB folders)
class LSUNDataset(DecodedImageDataset):
    """One split of an LSUN category, read from its LMDB folder (the layout of the LSUN release and
    of torchvision's ``LSUN``: keys are image ids, values encoded images), decoded on access.

    Each image is cropped to its centred square and resized to ``image_size`` with Lanczos
    (antialiased) filtering, in that order, as openai/glow's ``data_loaders/generate_tfr/lsun.py``
    makes its ``lsun`` records (``centre_crop``, then ``resize((res, res), Image.ANTIALIAS)``;
    ANTIALIAS is Pillow's Lanczos). Unlabelled: every label is -1.

    The keys are read once, by :func:`load_lsun`. Each access opens the folder read-only, reads one
    value and closes it again (0.07 ms, against 5 ms to decode and resize a 256x340 webp, measured
    here): no environment is held open, so none crosses a fork into DataLoader workers, where lmdb
    refuses to open a folder its parent holds.
    """

    def __init__(self, path: Path, keys: list[bytes], *, image_size: int, channels: int, name: str):
        super().__init__(torch.full((len(keys),), -1, dtype=torch.int64), image_size=image_size, channels=channels,
                         name=name)
        self.path = path
        self.keys = keys

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.keys[index]
        data = _read_lmdb(self.path, lambda txn: txn.get(key))
        if data is None:
            raise DatasetError(f"{self.path}: key {key!r} is gone (the LMDB changed after loading)")
        image = _decode_centre_resized(data, self.image_size, self.channels, f"{self.path} key {key!r}")
        return image, self.labels[index]


def load_lsun(category: str, split: str, root: str | Path, *, image_size: int = LSUN_IMAGE_SIZE,
              channels: int = 3) -> LSUNDataset:
    """LSUN ``category`` (one of :data:`LSUN_CATEGORIES`): "train" is ``root/<category>_train_lmdb``,
    "test" LSUN's validation set ``root/<category>_val_lmdb`` (300 images), as the official code
    uses it. Needs the ``lmdb`` package (``pip install torchglow[lsun]``)."""
    if category not in LSUN_CATEGORIES:
        raise DatasetError(f"lsun: unknown category {category!r}; choose one of {', '.join(LSUN_CATEGORIES)}")
    path = Path(root).expanduser() / f"{category}_{'train' if split == 'train' else 'val'}_lmdb"
    if not (path / "data.mdb").is_file():
        raise DatasetError(f"lsun-{category}: {path}/data.mdb not found; get the {category} LMDB folders from "
                           f"{_SOURCES['lsun']} into {path.parent}")
    keys = _read_lmdb(path, lambda txn: list(txn.cursor().iternext(keys=True, values=False)))
    if not keys:
        raise DatasetError(f"lsun-{category}: {path} holds no images")
    return LSUNDataset(path, keys, image_size=image_size, channels=channels, name=f"lsun-{category}/{split}")


def _read_lmdb(path: Path, read: Callable):
    """``read(txn)`` in a read-only transaction of the LMDB folder ``path``, opened and closed here."""
    try:
        import lmdb
    except ImportError:
        raise DatasetError(f"reading LSUN ({path}) needs the lmdb package: pip install 'torchglow[lsun]'") from None
    try:
        # no lock file written, no read-ahead (random access over a large file)
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as error:
        raise DatasetError(f"cannot open LMDB folder {path}: {error}") from None
    try:
        with env.begin(write=False) as txn:
            return read(txn)
    finally:
        env.close()


def _decode_centre_resized(data: bytes, size: int, channels: int, what: str) -> torch.Tensor:
    """Encoded image bytes -> uint8 (channels, size, size): centred square crop, then Lanczos resize."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as file:
            image = file.convert("L" if channels == 1 else "RGB")
    except Exception as error:  # PIL raises many kinds for undecodable bytes
        raise DatasetError(f"cannot decode image {what}: {error}") from error
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.array(image)).reshape(size, size, channels)  # (H, W, C)
    return pixels.permute(2, 0, 1).contiguous()
