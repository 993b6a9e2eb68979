"""LSUN: one category's LMDB folders (the LSUN release's layout), decoded on access; needs the
optional ``lmdb`` package."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .base import DatasetError, DecodedImageDataset, centre_square, image_tensor, open_image, user_path
from .sources import SOURCES

LSUN_CATEGORIES = ("bedroom", "church_outdoor", "tower")  # the official code's LSUN categories
LSUN_IMAGE_SIZE = 64


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
    path = user_path(root) / f"{category}_{'train' if split == 'train' else 'val'}_lmdb"
    if not (path / "data.mdb").is_file():
        raise DatasetError(f"lsun-{category}: {path}/data.mdb not found; get the {category} LMDB folders from "
                           f"{SOURCES['lsun']} into {path.parent}")
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
    """Encoded image bytes -> uint8 (channels, size, size): the centred square cropped first, then
    resized with Lanczos (the official lsun.py's order; the crop keeps the filter inside the square)."""
    import io

    from PIL import Image

    image = open_image(io.BytesIO(data), channels, what)
    square = image.crop(centre_square(*image.size))
    return image_tensor(square.resize((size, size), Image.Resampling.LANCZOS), size, channels)
