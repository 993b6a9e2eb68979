"""What every data set is: :class:`DatasetError`, the :class:`ImageDataset` base class and the
classes held in memory (:class:`TensorImageDataset`), decoded on access (:class:`DecodedImageDataset`)
or read from several parts (:class:`ConcatImageDataset`); the seeded split they share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "test", "val", "all")


class DatasetError(Exception):
    """A data set cannot be loaded as asked: its files are missing or unusable, or it cannot have the
    requested size or channels. The message is one line naming the path and the remedy, and any
    parameter it names in backticks (`` `download` ``), for the CLI to word as its option."""


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


def user_path(path: str | Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; a ``~name`` of no user stays as written,
    a path that does not exist (``Path.expanduser`` raises RuntimeError for it)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def open_image(source, channels: int, what: str):
    """The PIL image in ``source`` (a path or a file object) as grey (``channels`` 1) or RGB, a
    GIF's first frame; DatasetError naming ``what`` when it does not decode."""
    from PIL import Image

    try:
        with Image.open(source) as file:
            return file.convert("L" if channels == 1 else "RGB")
    except Exception as error:  # PIL raises many kinds; a file may also change after its header was checked
        raise DatasetError(f"cannot read image {what}: {error}") from error


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of the largest square centred in a width x height image."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def image_tensor(image, size: int, channels: int) -> torch.Tensor:
    """A size x size PIL image as uint8 (channels, size, size)."""
    pixels = torch.from_numpy(np.array(image)).reshape(size, size, channels)  # (H, W, C)
    return pixels.permute(2, 0, 1).contiguous()


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


def split_indices(n: int, n_test: int, split: str, seed: int) -> np.ndarray:
    """A seeded split of ``range(n)``: a RandomState(seed) permutation's first ``n_test`` are the
    test set, the rest the training set; each part is returned sorted, so keeps the original order."""
    order = np.random.RandomState(seed).permutation(n)
    return np.sort(order[:n_test] if split == "test" else order[n_test:])
