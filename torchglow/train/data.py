"""The images a training run reads: the training set in its epoch order, the test images, the
per-pixel baseline and the fixed batch of the per-epoch health numbers, checked against the model;
and the line that describes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed as dist_utils
from ..config import ConfigError, GlowConfig, TrainConfig
from ..data import ImageDataset, load_dataset
from ..noise import mix_seed
from ..tools.evaluate import categorical_baseline_bpd
from ..tools.images import bin_centres, display_max_level
from .text import class_list, plural

# The per-pixel baseline of data sets that are not held in memory is fitted on this many images.
BASELINE_IMAGES = 20_000
# Training images in the per-epoch health batch (torchglow.health): one small no-grad forward.
HEALTH_IMAGES = 16


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training images in ``epoch`` (-1: the ActNorm initialisation's draw)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


class DataSplit:
    """One split of a data set. Sets held in memory (digits, MNIST, CIFAR-10, ...) move to the
    device once and are indexed there; others go through a DataLoader with the same index order."""

    def __init__(self, dataset: ImageDataset, device: torch.device, num_workers: int):
        self.dataset = dataset
        self.in_memory = hasattr(dataset, "images")
        self.device = device
        self.num_workers = num_workers
        if self.in_memory:
            self.images = dataset.images.to(device)
            self.labels = dataset.labels.to(device)

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, index_batches: list[torch.Tensor]):
        if self.in_memory:
            for idx in index_batches:
                idx = idx.to(self.device)
                yield self.images[idx], self.labels[idx]
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=[i.tolist() for i in index_batches],
                                             num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def all(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All images and labels (the first ``limit`` for sets not held in memory)."""
        if self.in_memory:
            return self.images, self.labels
        n = len(self.dataset) if limit is None else min(limit, len(self.dataset))
        xs, ys = zip(*(self.dataset[i] for i in range(n)))
        return torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys])


@dataclass
class TrainingData:
    """The training set (on the device when it is held in memory), the test images, the per-pixel
    categorical baseline, the data's top bin (shown as white in sample grids) and a fixed batch of
    training images at their bin centres for the per-epoch health numbers."""

    train: DataSplit
    test_images: torch.Tensor
    test_labels: torch.Tensor | None
    baseline: float
    display_max: int
    health_x: torch.Tensor
    health_y: torch.Tensor | None
    steps_per_epoch: int
    class_names: list[str] | None = None
    num_classes: int | None = None


def load_data(model_config: GlowConfig, train_config: TrainConfig, device: torch.device) -> TrainingData:
    """The training and test sets of ``train_config.dataset``, checked against the model config."""
    cfg = train_config
    c, h, w = model_config.image_shape
    is_main = dist_utils.rank_and_world()[0] == 0
    train_set = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, download=cfg.download and is_main,
                             image_size=h, channels=c, seed=cfg.seed)
    test_set = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, download=False,
                            image_size=h, channels=c, seed=cfg.seed)
    _check_data(model_config, cfg, train_set, test_set)
    conditional = model_config.num_classes is not None
    train_data, test_data = DataSplit(train_set, device, cfg.num_workers), DataSplit(test_set, device, cfg.num_workers)
    test_images, test_labels = test_data.all()
    baseline_images, health_y = train_data.all(limit=BASELINE_IMAGES)
    n_bits = model_config.n_bits
    health_x = bin_centres(baseline_images[:HEALTH_IMAGES].cpu(), n_bits)
    return TrainingData(
        train=train_data, test_images=test_images, test_labels=test_labels if conditional else None,
        baseline=categorical_baseline_bpd(baseline_images.cpu(), test_images.cpu(), n_bits),
        display_max=display_max_level(train_set, n_bits), health_x=health_x.to(device),
        health_y=health_y[:HEALTH_IMAGES].to(device) if conditional else None,
        steps_per_epoch=len(train_data) // cfg.batch_size, class_names=train_set.class_names,
        num_classes=train_set.num_classes)


def _check_data(model_config: GlowConfig, train_config: TrainConfig, train_set: ImageDataset,
                test_set: ImageDataset) -> None:
    """The image shape, the size of the training set and the classes fit the configs."""
    for ds in (train_set, test_set):
        if tuple(ds.image_shape) != model_config.image_shape:
            raise ConfigError(f"data set {ds.name} has images of shape {tuple(ds.image_shape)} but the model's "
                              f"image_shape is {model_config.image_shape}; set `image_shape` to match")
    if len(train_set) < train_config.batch_size:
        raise ConfigError(f"the training set {train_set.name} has {len(train_set)} images, fewer than "
                          f"`batch_size` {train_config.batch_size}")
    num_classes = model_config.num_classes
    if num_classes is not None and not train_set.num_classes:
        raise ConfigError(f"`num_classes` {num_classes} makes the model class-conditional, "
                          f"but data set {train_set.name} has no labels")
    if num_classes is not None and train_set.num_classes != num_classes:
        found = class_list(train_set.class_names) if train_set.class_names else \
            plural(train_set.num_classes, "class", "classes")
        raise ConfigError(f"data set {train_set.name} has {found}, but `num_classes` is {num_classes}: "
                          f"pass `num_classes` {train_set.num_classes}")


def data_line(model_config: GlowConfig, train_config: TrainConfig, data: TrainingData,
              defaults: str | None = None) -> str:
    """What a run trains on, in one line: the data set, image shape, n_bits, classes, images per
    split and (``defaults``) where the configs come from."""
    c, h, w = model_config.image_shape
    classes = class_list(data.class_names) if data.class_names else (
        plural(data.num_classes, "class", "classes") if data.num_classes else "unlabelled")
    line = (f"data {train_config.dataset}: {c}x{h}x{w} images at {model_config.n_bits} bits, {classes}; "
            f"{len(data.train):,} train / {len(data.test_images):,} test images")
    return f"{line}; {defaults}" if defaults else line
