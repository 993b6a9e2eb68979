"""Open what a user points the tools at as a model together with the data it was trained on.

A source is a **run folder** (what ``torchglow train`` writes: ``config.json`` holding
``{"model": ..., "train": ...}``, checkpoints, ``model/`` and ``init/``), a ``.pt`` checkpoint, or a
**pretrained folder** (``config.json`` holding the model config alone, and ``model.safetensors``).
Two different files share the name ``config.json``; :func:`read_run_config` tells them apart by
content. A checkpoint or pretrained folder inside a run folder (``RUN/last.pt``, ``RUN/model``)
belongs to that run: it finds the run's data set, and the tools write into the run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_model
from ..data import DATASETS, DatasetError, ImageDataset, load_dataset, missing_folder_error, pick_indices
from ..tools.images import display_max_level
from ..model import Glow
from ..tools.sampling import check_labels

RUN_CONFIG = "config.json"


def read_run_config(folder: str | Path) -> dict[str, Any] | None:
    """The ``{"model": ..., "train": ...}`` of a run folder's ``config.json``; None when ``folder``
    is not a run folder (no such file, or a pretrained folder's model-only ``config.json``)."""
    try:
        config = json.loads((Path(folder) / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and isinstance(config.get("model"), dict) and isinstance(config.get("train"), dict):
        return config
    return None


def run_folder_of(source: str | Path) -> Path | None:
    """The run folder ``source`` is or lies in: itself, or the folder of a checkpoint file or of a
    pretrained folder (``RUN/model``, ``RUN/init``); None outside a run."""
    source = Path(source)
    candidates = (source, source.parent) if source.is_dir() else (source.parent,)
    return next((c for c in candidates if read_run_config(c) is not None), None)


@dataclass
class Picked:
    """Images chosen from a data set for a tool."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor | None  # labels to condition a class-conditional model on; None for an unconditional one
    index: torch.Tensor  # (N,) their indices in the data set
    data: ImageDataset  # the data set they come from


@dataclass
class Run:
    """A trained model and, when it belongs to a run folder, that run's training options."""

    source: Path
    model: Glow
    folder: Path | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def dataset(self, split: str, name: str | None = None, data_dir: str | None = None) -> ImageDataset:
        """The ``split`` of data set ``name`` (default: the one the run was trained on) at the
        model's image size and channels. The run's own data set comes from the run's ``data_dir``
        and is split with the run's seed (digits and image folders), so "test" is its test set."""
        name = name or self.train.get("dataset")
        if not name:
            raise ValueError(f"{self.source} does not say which data set it was trained on: pass --dataset")
        own = name == self.train.get("dataset")
        seed = self.train.get("seed", 0) if own else 0
        c, h, _ = self.model.config.image_shape
        if own and name not in DATASETS and not Path(name.removeprefix("folder:")).expanduser().exists():
            gone = (f"no such file {name!r}" if name.endswith(".npz")
                    else missing_folder_error(name.removeprefix("folder:")))
            raise DatasetError(f"{self.source} was trained on {name}, which is not there any more ({gone}); "
                               f"if it moved, pass --dataset NEW_PATH")
        return load_dataset(name, split, data_dir=data_dir or (self.train.get("data_dir") if own else None),
                            image_size=h, channels=c, seed=seed if isinstance(seed, int) else 0)

    def pick(self, split: str, n: int, seed: int, name: str | None = None, data_dir: str | None = None,
             exactly: bool = False, labels: bool = True) -> Picked:
        """``n`` images of :meth:`dataset` chosen by :func:`~torchglow.data.pick_indices` (0: all)
        and, with ``labels``, the class labels a class-conditional model needs (ValueError when the
        data set has none). ``exactly``: fewer than ``n`` images in the data set is a ValueError
        rather than all of them."""
        data = self.dataset(split, name, data_dir)
        if exactly and len(data) < n:
            raise ValueError(f"{n} images are needed but data set {data.name} has {len(data)}")
        index = pick_indices(len(data), n, seed)
        images, classes = data.take(index)
        y = None
        if labels and self.model.config.num_classes:
            if (classes < 0).any():
                raise ValueError(f"the model is class-conditional but data set {data.name} has no class labels")
            y = check_labels(self.model, classes, len(classes), torch.device("cpu"))
        return Picked(images, y, index, data)

    def display_max_level(self) -> int:
        """The bin shown as white in sample grids, whatever the source points at in the run:
        :func:`~torchglow.images.display_max_level` of the run's training set (16 for the digits,
        whose 17 levels fill 5-bit bins 0..16), as the trainer's grids; outside a run, the top bin
        ``2**n_bits - 1``."""
        n_bits = self.model.config.n_bits
        top = 2**n_bits - 1
        if n_bits == 8 or not self.train.get("dataset"):
            return top
        try:
            return display_max_level(self.dataset("train"), n_bits)
        except (DatasetError, OSError):  # the data are gone or unreadable: the samples are still worth showing
            return top

    def tool_dir(self, tool: str) -> Path:
        """``<run folder>/<tool>``; outside a run, next to the checkpoint or in the pretrained folder."""
        base = self.folder or (self.source if self.source.is_dir() else self.source.parent)
        return base / tool


def open_run(source: str | Path, device: str | torch.device = "cpu") -> Run:
    """The model at ``source`` (:func:`torchglow.checkpoint.load_model`: eval mode, EMA weights when
    the checkpoint has them) on ``device``, with its run folder's training options."""
    source = Path(source)
    model = load_model(source).to(device)
    folder = run_folder_of(source)
    train = read_run_config(folder)["train"] if folder is not None else {}
    return Run(source, model, folder, train)
