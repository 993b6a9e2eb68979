"""The named data sets (:data:`DATASETS`) and the entry point :func:`load_dataset`, which reads a
name, an image folder or an ``.npz`` file; the checks of a name and the seeded choice of images."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import SPLITS, ConcatImageDataset, DatasetError, ImageDataset, TensorImageDataset, user_path
from .celeba import CELEBA_IMAGE_SIZE, load_celeba
from .folders import ImageFileDataset, closest_folder, load_image_folder, missing_folder_error
from .lsun import LSUN_CATEGORIES, LSUN_IMAGE_SIZE, load_lsun
from .arrays import fit_to_shape, load_cifar10, load_digits, load_imagenet, load_mnist, load_npz, load_svhn
from .sources import data_roots

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn", "celeba", "imagenet32", "imagenet64",
            *(f"lsun-{category}" for category in LSUN_CATEGORIES))


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
        folder = user_path(name.removeprefix("folder:"))
        return load_image_folder(folder, split, image_size=image_size, channels=channels)
    if split == "val":
        raise DatasetError(f"{name} has no val split: use train, test or all (a folder may have val/)")
    if name.endswith(".npz"):
        return fit_to_shape(load_npz(name, split, seed), image_size, channels)
    if split == "all":
        parts = [load_dataset(name, part, data_dir=data_dir, download=download, image_size=image_size,
                              channels=channels, seed=seed) for part in ("train", "test")]
        return _concat(parts, f"{name}/all")
    return _load_named(name, split, data_dir=data_dir, download=download, image_size=image_size,
                       channels=channels, seed=seed)


def _load_named(name: str, split: str, *, data_dir: str | Path | None, download: bool, image_size: int | None,
                channels: int | None, seed: int) -> ImageDataset:
    """The "train" or "test" split of ``name``, one of :data:`DATASETS` (see :func:`load_dataset`)."""
    roots = data_roots(name, data_dir)
    match name:
        case "digits":
            dataset = load_digits(split, seed)
        case "mnist" | "fashion-mnist":
            dataset = load_mnist(name, roots, split, download)
        case "cifar10":
            dataset = load_cifar10(roots, split, download)
        case "svhn":
            dataset = load_svhn(roots, split, download)
        case "imagenet32" | "imagenet64":
            dataset = load_imagenet(name, roots, split)
        case "celeba":
            return load_celeba(
                roots, split, download, image_size=image_size or CELEBA_IMAGE_SIZE, channels=channels or 3
            )
        case _ if name.startswith("lsun-"):
            return load_lsun(name.removeprefix("lsun-"), split, data_roots("lsun", data_dir)[0],
                             image_size=image_size or LSUN_IMAGE_SIZE, channels=channels or 3)
    return fit_to_shape(dataset, image_size, channels)


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
    return bool(name) and name not in DATASETS and (name.startswith("folder:") or user_path(name).is_dir())


def check_dataset_name(name: str) -> str:
    """``name`` when :func:`load_dataset` can read it (a name in :data:`DATASETS`, an existing folder
    or an ``.npz`` file); else :class:`DatasetError`: "no such folder" (with the closest folder
    beside it) for a path, else "unknown data set" with the closest name."""
    if name in DATASETS or name.endswith(".npz"):
        return name
    if is_folder(name):
        folder = user_path(name.removeprefix("folder:"))
        if not folder.is_dir():
            raise missing_folder_error(folder)
        return name
    close = difflib.get_close_matches(name.lower(), DATASETS, n=1)
    path_like = name.startswith((".", "~")) or os.sep in name or "/" in name
    if path_like or (not close and closest_folder(user_path(name)) is not None):
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
    return prefix + str(user_path(name.removeprefix("folder:")).resolve())
