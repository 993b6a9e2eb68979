"""Folders of images: how one is read (:class:`FolderLayout`: splits, classes), the image shape
inferred from its files, the data set of its files (:class:`ImageFileDataset`) and the decoding of
one image (:func:`read_image`); "no such folder" errors with the closest folder."""

from __future__ import annotations

import difflib
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import DatasetError, DecodedImageDataset, centre_square, image_tensor, open_image, split_indices, user_path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"})
FOLDER_SPLITS = ("train", "test", "val")  # subfolders of an image folder read as splits, not classes
FOLDER_TEST_FRACTION = 0.1  # a folder without test/ or val/: this share of its files is the test split...
FOLDER_SPLIT_SEED = 0  # ...drawn with this seed, fixed, so that every run and tool sees the same split
# PIL modes of one channel: a folder of only such images is read as grey (C = 1)
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


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


def folder_layout(folder: str | Path) -> FolderLayout:
    """How :func:`load_dataset` reads ``folder`` (see :class:`FolderLayout`): its image files per
    split, their labels and class names. Only file names are read. Raises :class:`DatasetError` for
    a folder that does not exist or holds no images (a split folder without images included)."""
    folder = user_path(folder)
    if not folder.is_dir():
        raise missing_folder_error(folder)
    entries = sorted(folder.iterdir())
    split_dirs = {p.name.lower(): p for p in entries if p.is_dir() and p.name.lower() in FOLDER_SPLITS}
    if "train" not in split_dirs:
        per_split = _seeded_split(_image_files(folder))
        roots = {"train": folder, "test": folder}
        test_from = f"{FOLDER_TEST_FRACTION:.0%} of its images (seed {FOLDER_SPLIT_SEED})"
        ignored: list[str] = []
    else:
        roots = dict(split_dirs)
        per_split = {split: _image_files(root) for split, root in roots.items()}
        test_from = next((f"{name}/" for name in ("test", "val") if name in roots), None)
        if test_from is None:  # train/ alone: a seeded share of it is the test split
            per_split = _seeded_split(per_split["train"])
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
    """The image files below ``root``, sorted; :class:`DatasetError` when there are none."""
    files = sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
    if not files:
        raise DatasetError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def _seeded_split(files: list[Path]) -> dict[str, list[Path]]:
    """``files`` as a "train" and a "test" split: :data:`FOLDER_TEST_FRACTION` of them (rounded
    down) drawn with :data:`FOLDER_SPLIT_SEED` are the test split, in their order."""
    n_test = int(len(files) * FOLDER_TEST_FRACTION)
    return {split: [files[i] for i in split_indices(len(files), n_test, split, FOLDER_SPLIT_SEED)]
            for split in ("train", "test")}


def _class_folder(root: Path, path: Path) -> str | None:
    """The top-level subfolder of ``root`` that ``path`` lies in (its class), None directly in ``root``."""
    return path.relative_to(root).parts[0] if path.parent != root else None


def missing_folder_error(folder: str | Path) -> DatasetError:
    """"no such folder", with the closest folder beside it (difflib) when there is one."""
    folder = user_path(folder)
    close = closest_folder(folder)
    hint = f": did you mean {str(close)!r}?" if close else ("" if folder.parent.is_dir() else
                                                            f" (nor is there a folder {folder.parent})")
    return DatasetError(f"no such folder {str(folder)!r}{hint}")


def closest_folder(folder: Path) -> Path | None:
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
    folder = user_path(folder)
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
        raise DatasetError(f"image folder {folder}: cannot infer the image size ({found}); pass `image_shape` "
                           f"{channels} S S to centre-crop and resize every image to S x S")
    return channels, width, width


def _channels(headers: Sequence[tuple[tuple[int, int], str]]) -> int:
    """1 when every image is grey, else 3 (grey images repeat into RGB without loss)."""
    return 1 if headers and all(mode in GREY_MODES for _, mode in headers) else 3


def load_image_folder(
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
    if image_size is None or channels is None:  # read from every image of the folder, so all splits agree
        every = [p for s in layout.read_order() for p in layout.files[s]]
        all_headers = _headers(every)
        header_of = dict(zip(every, all_headers))
        headers = [header_of[path] for path in paths]
        if image_size is None:
            inferred_channels, image_size, _ = infer_image_shape(folder, all_headers)
        else:
            inferred_channels = _channels([h for h in all_headers if h is not None])
        channels = channels or inferred_channels
    else:
        headers = _headers(paths)
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

    image = open_image(path, channels, str(path))
    box = centre_square(*image.size)
    return image_tensor(image.resize((size, size), Image.Resampling.LANCZOS, box=box), size, channels)
