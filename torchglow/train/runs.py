"""The run folder: what ``torchglow train`` writes, the one reader of its ``config.json``, and
opening what a user points the tools at as a model together with the data it was trained on.

A run folder holds ``config.json`` (:class:`RunConfig`: ``{"model": ..., "train": ..., "command": ...}``),
``metrics.jsonl`` (one JSON line per log: ``epoch`` is always the training progress in epochs,
``step / steps_per_epoch``), ``init/`` (the model right after the data-dependent ActNorm
initialisation, before any step), ``last.pt`` and ``best.pt`` (checkpoints),
``samples/epoch_NNN.png`` (``epoch_NNN_step_SSSSSSS.png`` for a final evaluation mid-epoch),
``bpd.png``, ``summary.json`` and ``model/`` (the evaluated weights as a pretrained folder).

A source for the tools is a run folder, a ``.pt`` checkpoint, or a **pretrained folder**
(``config.json`` holding the model config alone, and ``model.safetensors``). Two different files
share the name ``config.json``; :func:`read_run_config` tells them apart by content. A checkpoint
or pretrained folder inside a run folder (``RUN/last.pt``, ``RUN/model``) belongs to that run: it
finds the run's data set, and the tools write into the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist_utils
from .checkpoint import CheckpointError, load_model
from ..config import ConfigError, GlowConfig, TrainConfig
from ..data import DATASETS, DatasetError, ImageDataset, load_dataset, missing_folder_error, pick_indices, user_path
from ..files import write_json_atomic
from ..tools.images import display_max_level
from ..model import Glow
from ..tools.sampling import check_labels

RUN_CONFIG = "config.json"
# What a run writes into its folder (removed by `overwrite` before a new run starts there).
RUN_FILES = (RUN_CONFIG, "metrics.jsonl", "last.pt", "best.pt", "summary.json", "bpd.png")
RUN_FOLDERS = ("samples", "init", "model", "tb")


@dataclass(frozen=True)
class RunConfig:
    """A run folder's ``config.json``: the configs the run was started with and the command line
    that started it (None for runs started from Python)."""

    model: GlowConfig
    train: TrainConfig
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict(), "command": self.command}


def read_run_config(folder: str | Path) -> RunConfig:
    """The :class:`RunConfig` of a run folder; a :class:`CheckpointError` when ``folder`` is not a
    run folder (no ``config.json``, a pretrained folder's model-only one, or one that the configs
    refuse)."""
    path = Path(folder) / RUN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (is {folder} a torchglow run folder?)")
    try:
        d = json.loads(path.read_text())
        return RunConfig(GlowConfig.from_dict(d["model"]), TrainConfig.from_dict(d["train"]), d.get("command"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{path} is not a torchglow run config ({e})") from None


def is_run_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a run's ``config.json`` (a pretrained folder's holds the model alone)."""
    try:
        read_run_config(folder)
    except CheckpointError:
        return False
    return True


def default_run_dir(dataset: str) -> Path:
    """``runs/<data set>-<time>``."""
    path = Path(dataset.removeprefix("folder:"))
    stem = path.stem if path.exists() else dataset
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_folder(model_config: GlowConfig, train_config: TrainConfig, resume: bool, is_main: bool,
                       command: str | None = None) -> tuple[Path, str | None]:
    """``train_config.out`` checked (a resumable run, or no run unless ``overwrite``) with its
    ``config.json``, which also records the command that started the run: ``command``, or a resumed
    run's own. Returns the folder and that command."""
    out = Path(train_config.out) if train_config.out else default_run_dir(train_config.dataset)
    if resume:
        _check_resumable(out)
        command = read_run_config(out).command  # the command that started the run
    elif any((out / name).exists() for name in RUN_FILES):
        _clear_old_run(out, train_config.overwrite, is_main)
    dist_utils.barrier()
    if is_main:
        config = RunConfig(model_config, dataclasses.replace(train_config, out=str(out), overwrite=False), command)
        try:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / RUN_CONFIG, config.to_dict())
        except OSError as e:
            raise CheckpointError(f"cannot write to run folder {out}: {e.strerror or e}") from None
    return out, command


def _check_resumable(out: Path) -> None:
    if not (out / RUN_CONFIG).is_file():
        raise CheckpointError(f"cannot resume: {out} is not a run folder (no {RUN_CONFIG})")
    if not (out / "last.pt").is_file():
        raise CheckpointError(f"cannot resume: {out} has no last.pt (the run stopped before its first "
                              f"checkpoint); start it again in that folder with `out` {out} `overwrite`")


def _clear_old_run(out: Path, overwrite: bool, is_main: bool) -> None:
    """Remove the run in ``out`` when ``overwrite``; else say how to go on."""
    if not overwrite and not (out / "last.pt").exists():
        raise ConfigError(f"{out} holds a run that stopped before its first checkpoint (no last.pt): start it "
                          f"again there with `overwrite`, or choose another `out`")
    if not overwrite:
        raise ConfigError(f"{out} already holds a run: continue it with `resume` {out}, choose another "
                          f"`out`, or pass `overwrite` to replace it")
    if is_main:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for name in RUN_FOLDERS:
            shutil.rmtree(out / name, ignore_errors=True)


def run_folder_of(source: str | Path) -> Path | None:
    """The run folder ``source`` is or lies in: itself, or the folder of a checkpoint file or of a
    pretrained folder (``RUN/model``, ``RUN/init``); None outside a run."""
    source = Path(source)
    candidates = (source, source.parent) if source.is_dir() else (source.parent,)
    return next((c for c in candidates if is_run_folder(c)), None)


@dataclass
class Picked:
    """Images chosen from a data set for a tool."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor | None  # labels to condition a class-conditional model on; None for an unconditional one
    index: torch.Tensor  # (N,) their indices in the data set
    data: ImageDataset  # the data set they come from


@dataclass
class Run:
    """A trained model and, when it belongs to a run folder, that run's training config."""

    source: Path
    model: Glow
    folder: Path | None = None
    train: TrainConfig | None = None

    def dataset(self, split: str, name: str | None = None, data_dir: str | None = None) -> ImageDataset:
        """The ``split`` of data set ``name`` (default: the one the run was trained on) at the
        model's image size and channels. The run's own data set comes from the run's ``data_dir``
        and is split with the run's seed (digits and image folders), so "test" is its test set."""
        trained_on = self.train.dataset if self.train is not None else None
        name = name or trained_on
        if not name:
            raise ValueError(f"{self.source} does not say which data set it was trained on: pass `dataset`")
        own = name == trained_on
        seed = self.train.seed if own else 0
        c, h, _ = self.model.config.image_shape
        if own and name not in DATASETS and not user_path(name.removeprefix("folder:")).exists():
            gone = (f"no such file {name!r}" if name.endswith(".npz")
                    else missing_folder_error(name.removeprefix("folder:")))
            raise DatasetError(f"{self.source} was trained on {name}, which is not there any more ({gone}); "
                               f"if it moved, pass `dataset` NEW_PATH")
        return load_dataset(name, split, data_dir=data_dir or (self.train.data_dir if own else None),
                            image_size=h, channels=c, seed=seed)

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
        :func:`~torchglow.tools.images.display_max_level` of the run's training set (16 for the digits,
        whose 17 levels fill 5-bit bins 0..16), as the trainer's grids; outside a run, the top bin
        ``2**n_bits - 1``."""
        n_bits = self.model.config.n_bits
        top = 2**n_bits - 1
        if n_bits == 8 or self.train is None:
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
    """The model at ``source`` (:func:`torchglow.train.checkpoint.load_model`: eval mode, EMA weights when
    the checkpoint has them) on ``device``, with its run folder's training options."""
    source = Path(source)
    model = load_model(source).to(device)
    folder = run_folder_of(source)
    return Run(source, model, folder, read_run_config(folder).train if folder is not None else None)
