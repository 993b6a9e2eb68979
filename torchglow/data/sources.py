"""Where a named data set's files are found (``data_dir``, ``TORCHGLOW_DATA``, system folders) and
how missing ones are fetched through torchvision; gzip-compressed twins are read as the files."""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from .base import DatasetError, user_path

# Folders searched after the default one when no data_dir is given.
SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}

SOURCES = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (torchvision's mirror)",
    "fashion-mnist": "https://github.com/zalandoresearch/fashion-mnist (or apt-get install dataset-fashion-mnist)",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
    "celeba": "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Align&Cropped images)",
    "lsun": "https://github.com/fyu/lsun (python download.py -c CATEGORY, then unzip)",
}


def data_roots(name: str, data_dir: str | Path | None) -> list[Path]:
    """Folders to search for ``name``'s files, the first one also being where downloads go."""
    if data_dir is not None:
        return [user_path(data_dir)]
    base = user_path(os.environ.get("TORCHGLOW_DATA") or Path.home() / ".cache" / "torchglow")
    system = SYSTEM_DIRS.get(name)
    return [base / name] + ([system] if system is not None and system.is_dir() else [])


def locate(
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
    remedy = f"get them from {SOURCES[name]}"
    if download:
        raise DatasetError(missing + remedy)
    raise DatasetError(f"{missing}add `download` to fetch them, or {remedy}")


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


def open_file(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _fetch(name: str, fetch: Callable[[], object]) -> None:
    try:
        fetch()
    except Exception as error:  # network, md5, missing gdown...: torchvision raises many kinds
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatasetError(f"{name}: download failed ({detail}); get the files from {SOURCES[name]}") from error


def torchvision_fetch(class_name: str, root: Path, **kwargs) -> Callable[[], object]:
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


def subfolders(roots: Sequence[Path], layouts: Sequence[str]) -> list[Path]:
    return [root / layout for root in roots for layout in layouts]
