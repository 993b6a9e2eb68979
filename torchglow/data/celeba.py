"""CelebA: the aligned faces, decoded on access, with their 40 binary attributes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import DatasetError
from .folders import ImageFileDataset
from .sources import locate, open_file, subfolders, torchvision_fetch

CELEBA_IMAGE_SIZE = 64
CELEBA_PARTITION = {"train": "0", "test": "2"}  # list_eval_partition.txt: 0 train, 1 valid, 2 test


def load_celeba(roots: list[Path], split: str, download: bool, *, image_size: int, channels: int) -> ImageFileDataset:
    """CelebA's aligned 178x218 faces, centre-square-cropped (178x178) and resized, with their 40
    binary attributes; "train"/"test" are partitions 0/2 of ``list_eval_partition.txt`` (the
    validation partition 1 is not used). Unlabelled: every label is -1."""
    attr_path, partition_path, image_dir = locate(
        "celeba",
        subfolders(roots, ["celeba", ""]),
        ["list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"],
        download=download,
        fetch=torchvision_fetch("CelebA", roots[0], split="all"),
    )
    filenames, attribute_names, attributes = _read_celeba_attributes(attr_path)
    with open_file(partition_path) as file:
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
    with open_file(path) as file:
        lines = file.read().decode().splitlines()
    rows = [line.split() for line in lines[2:] if line.strip()]
    values = np.array([row[1:] for row in rows], dtype=np.int8)
    return [row[0] for row in rows], lines[1].split(), values > 0
