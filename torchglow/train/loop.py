"""Training: :func:`train` is a driver that reads top to bottom.

::

    data = load_data(...)        # the training and test images, the per-pixel baseline
    run = start_run(...)         # the run folder, model, EMA and training step: new or resumed
    while not run.done:
        train_epoch(run)         # steps on the device; the host reads it every log_every steps
        end_of_epoch(run)        # health, test bits/dim, samples, best.pt, last.pt
    finish(run)                  # the final score, summary.json, model/

One process or many (torchrun): every rank builds the same model, initialises ActNorm from its
share of the same images (statistics averaged across ranks), takes its rows of each global batch,
and the step averages the gradients with one all-reduce. The step (:mod:`torchglow.step`) draws
its noise from a counter-based hash of (seed, step, element), so a resumed run and a run on N
processes see exactly the noise of an uninterrupted single-process run.

A run folder holds ``config.json`` (model and training configs), ``metrics.jsonl`` (one JSON line
per log: ``epoch`` is always the training progress in epochs, ``step / steps_per_epoch``),
``init/`` (the model right after the data-dependent ActNorm initialisation, before any step),
``last.pt`` and ``best.pt`` (checkpoints), ``samples/epoch_NNN.png`` (``epoch_NNN_step_SSSSSSS.png``
for a final evaluation mid-epoch), ``bpd.png``, ``summary.json``
and ``model/`` (the evaluated weights as a pretrained folder).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed as dist_utils
from .. import health
from .. import preprocess as pp
from .checkpoint import FORMAT, CheckpointError, atomic_save, config_diff, load_checkpoint, load_model, load_state
from ..config import ConfigError, GlowConfig, TrainConfig, train_preset  # noqa: F401 (train_preset: re-exported)
from ..data import DatasetError, absolute_dataset
from ..tools.evaluate import categorical_baseline_bpd, evaluate_bpd, plot_curves
from ..files import make_readable, write_json_atomic
from ..memory import check_memory_mode
from ..model import Glow
from .runs import read_run_config
from ..noise import INIT_NOISE, dequantization_noise, mix_seed
from .step import TrainStep, compile_step

# The per-pixel baseline of data sets that are not held in memory is fitted on this many images.
BASELINE_IMAGES = 20_000
# Training images in the per-epoch health batch (torchglow.health): one small no-grad forward.
HEALTH_IMAGES = 16
# What a run writes into its folder (removed by --overwrite before a new run starts there).
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "bpd.png")
RUN_FOLDERS = ("samples", "init", "model", "tb")


@dataclass
class TrainResult:
    """What :func:`train` returns: the run summary (also in ``summary.json``), the trained model and
    the model used for evaluation (the EMA when enabled, else the same model)."""

    summary: dict[str, Any]
    model: Glow
    eval_model: Glow


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite after restoring a checkpoint)."""


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and returns."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one is fatal

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __bool__(self) -> bool:
        return self.signal is not None


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


class _Data:
    """The training and test images. Sets held in memory (digits, MNIST, CIFAR-10, ...) move to the
    device once and are indexed there; others go through a DataLoader with the same index order."""

    def __init__(self, dataset, device: torch.device, num_workers: int):
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


def default_run_dir(dataset: str) -> Path:
    path = Path(dataset.removeprefix("folder:"))
    stem = path.stem if path.exists() else dataset
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_run_configs(run_dir: str | Path) -> tuple[GlowConfig, TrainConfig]:
    """The model and training configs a run folder was started with (for ``--resume``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist (is {run_dir} a torchglow run folder?)")
    try:
        d = json.loads(path.read_text())
        return GlowConfig.from_dict(d["model"]), TrainConfig.from_dict(d["train"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot resume: {path} is not a torchglow run config ({e})") from None


# --------------------------------------------------------------------------- the driver
def train(model_config: GlowConfig, cfg: TrainConfig, resume: bool = False, progress: bool = True, *,
          defaults: str | None = None, command: str | None = None) -> TrainResult:
    """Train a Glow; the run summary is also written to ``<out>/summary.json``.

    With ``resume=True``, ``cfg.out`` must be an existing run folder; training continues from its
    ``last.pt`` and ends exactly where an uninterrupted run would have (a finished run says so and
    is left as it is: raise ``epochs`` or ``max_steps`` to extend it). Without it, ``cfg.out`` must
    not hold a run unless ``cfg.overwrite``.

    SIGINT/SIGTERM (once) at any point after this is called stop the run cleanly: ``last.pt`` is
    written at the next step boundary and the summary says ``interrupted_by``; a second signal is
    fatal (the previous ``last.pt`` stays intact, as every checkpoint is written atomically).

    A folder or ``.npz`` data set (and ``data_dir``) is stored in the run as an absolute path, so
    that the tools find it from any directory. The first line printed describes the data (shape,
    n_bits, classes, images per split) and ends with ``defaults``, the caller's words for where
    the configs come from; ``command`` (the command line that started the run) goes into
    ``config.json`` and the model card of ``model/``.
    """
    cfg = dataclasses.replace(cfg, dataset=absolute_dataset(cfg.dataset),
                              data_dir=None if cfg.data_dir is None else str(Path(cfg.data_dir).expanduser().resolve()))
    with _StopRequest() as stop:
        device = _setup(model_config, cfg)
        data = load_data(model_config, cfg, device)
        run = start_run(model_config, cfg, resume, data, device, stop, progress, defaults=defaults, command=command)
        try:
            if resume and run.done and run.is_main:
                print(f"{run.out} is finished ({run.state['epoch']} epochs, {run.state['step']} steps); to train "
                      f"longer: torchglow train --resume {run.out} --epochs N (N > {cfg.epochs}; or a larger "
                      f"--max-steps / --max-minutes when one of them ended it)", file=sys.stderr)
            while not run.done and not stop:
                train_epoch(run)
                if run.epoch_complete:
                    end_of_epoch(run)
            return finish(run)
        finally:
            run.close()


def _setup(model_config: GlowConfig, cfg: TrainConfig) -> torch.device:
    """This process's device (joining torchrun's process group), after the checks that need no data."""
    check_memory_mode(cfg.memory, model_config.dropout)
    device = dist_utils.setup(cfg.device)
    world = dist_utils.rank_and_world()[1]
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    torch.manual_seed(cfg.seed)
    return device


@dataclass
class TrainingData:
    """The training set (on the device when it is held in memory), the test images, the per-pixel
    categorical baseline, the data's top bin (shown as white in sample grids) and a fixed batch of
    training images at their bin centres for the per-epoch health numbers."""

    train: _Data
    test_images: torch.Tensor
    test_labels: torch.Tensor | None
    baseline: float
    display_max: int
    health_x: torch.Tensor
    health_y: torch.Tensor | None
    steps_per_epoch: int
    class_names: list[str] | None = None
    num_classes: int | None = None


def load_data(model_config: GlowConfig, cfg: TrainConfig, device: torch.device) -> TrainingData:
    """The training and test sets of ``cfg.dataset``, checked against the model config."""
    from ..data import load_dataset
    from ..tools.images import bin_centres, display_max_level

    c, h, w = model_config.image_shape
    is_main = dist_utils.rank_and_world()[0] == 0
    train_set = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, download=cfg.download and is_main,
                             image_size=h, channels=c, seed=cfg.seed)
    test_set = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, download=False,
                            image_size=h, channels=c, seed=cfg.seed)
    for ds in (train_set, test_set):
        if tuple(ds.image_shape) != model_config.image_shape:
            raise ConfigError(f"data set {ds.name} has images of shape {tuple(ds.image_shape)} but the model's "
                              f"image_shape is {model_config.image_shape}; set --image-shape to match")
    if len(train_set) < cfg.batch_size:
        raise ConfigError(f"the training set {train_set.name} has {len(train_set)} images, fewer than "
                          f"--batch-size {cfg.batch_size}")
    conditional = model_config.num_classes is not None
    if conditional and not train_set.num_classes:
        raise ConfigError(f"--num-classes {model_config.num_classes} makes the model class-conditional, "
                          f"but data set {train_set.name} has no labels")
    if conditional and train_set.num_classes != model_config.num_classes:
        found = _class_list(train_set.class_names) if train_set.class_names else \
            plural(train_set.num_classes, "class", "classes")
        raise ConfigError(f"data set {train_set.name} has {found}, but --num-classes is {model_config.num_classes}: "
                          f"pass --num-classes {train_set.num_classes}")
    train_data, test_data = _Data(train_set, device, cfg.num_workers), _Data(test_set, device, cfg.num_workers)
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


@dataclass
class TrainingRun:
    """A training run in progress: its configs, folder, data, model, EMA, step and host state.

    ``state`` (saved in every checkpoint): ``step`` (steps taken, skipped ones included),
    ``epoch`` (completed epochs), ``images`` (images of applied steps), ``best_bpd``, ``history``
    (the metrics.jsonl records), ``skipped_steps`` and ``wall_time_s`` (all segments of the run).
    """

    model_config: GlowConfig
    cfg: TrainConfig
    out: Path
    device: torch.device
    data: TrainingData
    model: Glow
    ema: Glow | None
    trainer: TrainStep
    step_fn: Callable[..., dict[str, torch.Tensor]]
    state: dict[str, Any]
    stop: _StopRequest
    bar: Any
    metrics_file: Any = None
    tb: Any = None
    command: str | None = None
    segment_start: float = 0.0
    last_read: tuple[int, float] = (0, 0.0)
    restored_at: int | None = None

    @property
    def is_main(self) -> bool:
        return self.trainer.rank == 0

    @property
    def max_steps(self) -> int:
        return _max_steps(self.cfg, self.data.steps_per_epoch)

    @property
    def out_of_time(self) -> bool:
        return bool(self.cfg.max_minutes) and self.wall_time() >= 60 * self.cfg.max_minutes

    @property
    def done(self) -> bool:
        return self.state["epoch"] >= self.cfg.epochs or self.state["step"] >= self.max_steps or self.out_of_time

    @property
    def epoch_complete(self) -> bool:
        return self.state["step"] == (self.state["epoch"] + 1) * self.data.steps_per_epoch

    @property
    def eval_model(self) -> Glow:
        return self.ema if self.ema is not None else self.model

    def epochs_done(self, step: int) -> float:
        """Training progress in epochs, the ``epoch`` of every metrics.jsonl line."""
        return round(step / self.data.steps_per_epoch, 4)

    def log(self, record: dict[str, Any]) -> None:
        self.state["history"].append(record)
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch", "images"):
                    self.tb.add_scalar(k, v, record["step"])

    def wall_time(self) -> float:
        return self.state["wall_time_s"] + time.time() - self.segment_start

    def checkpoint(self, name: str) -> None:
        if not self.is_main:
            return
        state = {**self.state, "wall_time_s": self.wall_time()}
        atomic_save({
            "format": FORMAT, "model_config": self.model_config.to_dict(), "train_config": self.cfg.to_dict(),
            "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "trainer": self.trainer.state_dict(), "state": state,
        }, self.out / name)

    def close(self) -> None:
        self.bar.close()
        if self.metrics_file:
            self.metrics_file.close()
        if self.tb:
            self.tb.close()


def start_run(model_config: GlowConfig, cfg: TrainConfig, resume: bool, data: TrainingData, device: torch.device,
              stop: _StopRequest, progress: bool = True, defaults: str | None = None,
              command: str | None = None) -> TrainingRun:
    """The run folder, model, EMA and training step: resumed from ``last.pt``, or new (from
    ``init_from`` weights or a data-dependent initialisation). Prints :func:`data_line` first."""
    rank, world = dist_utils.rank_and_world()
    if rank == 0:
        print(f"torchglow train: {data_line(model_config, cfg, data, defaults)}", file=sys.stderr)
    if resume and cfg.out:
        command = (read_run_config(cfg.out) or {}).get("command")  # the command that started the run
    out = _run_folder(model_config, cfg, resume, rank == 0, command)
    model = Glow(model_config).to(device)
    model.set_memory(cfg.memory)
    if cfg.precision != "fp32":
        model.set_autocast(torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
    state = dict(step=0, epoch=0, images=0, best_bpd=math.inf, history=[], skipped_steps=0, wall_time_s=0.0)
    ckpt = _resume_checkpoint(out, model_config, device) if resume else None
    if ckpt is not None:
        load_state(model, ckpt["model"], source=str(out / "last.pt"))
        state = {**state, **ckpt["state"]}
    else:
        _initialize(model, cfg, data, device, out if rank == 0 else None)
    ema = None
    if cfg.ema:
        ema = Glow(model_config).to(device)
        ema.load_state_dict(ckpt["ema"] if ckpt is not None and ckpt["ema"] is not None else model.state_dict())
        ema.eval().requires_grad_(False)
    beta2 = cfg.beta2 or 1.0 - 1.0 / max(data.steps_per_epoch, 2)
    trainer = TrainStep(model, cfg, beta2, ema, cfg.ema_decay or beta2, rank, world)
    if ckpt is not None:
        _load_trainer(trainer, ckpt, state, str(out / "last.pt"))
    step_fn = compile_step(trainer, cfg.compile_mode) if cfg.fast else trainer
    model.train()
    if rank == 0:
        where = f"resuming {out} at step {state['step']}" if resume else f"writing the run to {out}"
        print(f"torchglow train: {where} ({plural(len(data.train), 'training image')}, "
              f"{plural(data.steps_per_epoch, 'step')} per epoch, {plural(cfg.epochs, 'epoch')})", file=sys.stderr)
    bar = _progress(_max_steps(cfg, data.steps_per_epoch), state["step"], out.name, progress and rank == 0)
    return TrainingRun(model_config, cfg, out, device, data, model, ema, trainer, step_fn, state, stop, bar,
               metrics_file=open(out / "metrics.jsonl", "a") if rank == 0 else None,
               tb=_tensorboard(out) if rank == 0 else None, command=command, segment_start=time.time(),
               last_read=(state["step"], time.time()))


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 step``, ``2 steps``, ``1,497 training images``; ``many``: an irregular plural."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def _class_list(names: list[str] | None, limit: int = 10) -> str:
    """``2 classes: cat, ship`` (the first ``limit`` names), or ``unlabelled``."""
    if not names:
        return "unlabelled"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{plural(len(names), 'class', 'classes')}: {shown}"


def data_line(model_config: GlowConfig, cfg: TrainConfig, data: TrainingData, defaults: str | None = None) -> str:
    """What a run trains on, in one line: the data set, image shape, n_bits, classes, images per
    split and (``defaults``) where the configs come from."""
    c, h, w = model_config.image_shape
    classes = _class_list(data.class_names) if data.class_names else (
        plural(data.num_classes, "class", "classes") if data.num_classes else "unlabelled")
    line = (f"data {cfg.dataset}: {c}x{h}x{w} images at {model_config.n_bits} bits, {classes}; "
            f"{len(data.train):,} train / {len(data.test_images):,} test images")
    return f"{line}; {defaults}" if defaults else line


def _max_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Where the run ends: ``epochs`` full epochs, or ``max_steps`` when that comes first."""
    return min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch)


def _run_folder(model_config: GlowConfig, cfg: TrainConfig, resume: bool, is_main: bool,
                command: str | None = None) -> Path:
    """``cfg.out`` checked (a resumable run, or no run unless ``overwrite``) with its config.json,
    which also records ``command``."""
    out = Path(cfg.out) if cfg.out else default_run_dir(cfg.dataset)
    if resume and not (out / "config.json").is_file():
        raise CheckpointError(f"cannot resume: {out} is not a run folder (no config.json)")
    if resume and not (out / "last.pt").is_file():
        raise CheckpointError(f"cannot resume: {out} has no last.pt (the run stopped before its first "
                              f"checkpoint); start it again in that folder with --out {out} --overwrite")
    if not resume and any((out / name).exists() for name in RUN_FILES):
        if not cfg.overwrite and not (out / "last.pt").exists():
            raise ConfigError(f"{out} holds a run that stopped before its first checkpoint (no last.pt): start it "
                              f"again there with --overwrite, or choose another --out")
        if not cfg.overwrite:
            raise ConfigError(f"{out} already holds a run: continue it with --resume {out}, choose another "
                              f"--out, or pass --overwrite to replace it")
        if is_main:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            for name in RUN_FOLDERS:
                shutil.rmtree(out / name, ignore_errors=True)
    dist_utils.barrier()
    if is_main:
        try:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / "config.json", {"model": model_config.to_dict(),
                                                    "train": {**cfg.to_dict(), "out": str(out), "overwrite": False},
                                                    "command": command})
        except OSError as e:
            raise CheckpointError(f"cannot write to run folder {out}: {e.strerror or e}") from None
    return out


def _resume_checkpoint(out: Path, model_config: GlowConfig, device: torch.device) -> dict[str, Any]:
    ckpt = load_checkpoint(out / "last.pt", map_location=device)
    if ckpt["model_config"] != model_config.to_dict():
        raise CheckpointError(f"cannot resume: {out / 'last.pt'} was made with another model config "
                              f"(checkpoint vs run: {config_diff(ckpt['model_config'], model_config.to_dict())})")
    missing = [k for k in ("state", "ema") if k not in ckpt] + ([] if "trainer" in ckpt or "optimizer" in ckpt
                                                                 else ["trainer"])
    if missing:
        raise CheckpointError(f"cannot resume: {out / 'last.pt'} has no training state ({', '.join(missing)})")
    return ckpt


def _load_trainer(trainer: TrainStep, ckpt: dict[str, Any], state: dict[str, Any], source: str) -> None:
    """The step's state from a checkpoint; one of an earlier version holds a torch.optim state and
    no device counters (they come from its host state)."""
    try:
        if "trainer" in ckpt:
            trainer.load_state_dict(ckpt["trainer"], source)
            return
        trainer.load_state_dict(ckpt["optimizer"], source)
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume: {source} holds an unusable optimiser state ({e})") from None
    for name, key in (("steps", "step"), ("images", "images"), ("skipped", "skipped_steps")):
        trainer.counters[name].fill_(state[key])


def _initialize(model: Glow, cfg: TrainConfig, data: TrainingData, device: torch.device,
                init_dir: Path | None) -> None:
    """``init_from`` weights, else the data-dependent ActNorm initialisation: every rank draws the
    same images and noise and takes its share. Rank 0 saves the result in ``init_dir``."""
    if cfg.init_from:
        source = load_model(cfg.init_from, device, use_ema=False)
        try:
            load_state(model, source.state_dict(), source=f"--init-from {cfg.init_from}")
        except CheckpointError as e:
            diff = config_diff(source.config.to_dict(), model.config.to_dict())
            raise CheckpointError(f"--init-from {cfg.init_from} has another model config (it vs this run: "
                                  f"{diff})" if diff else str(e)) from None
    else:
        rank, world = dist_utils.rank_and_world()
        n_init = min(cfg.init_images, len(data.train))
        x_init, y_init = next(data.train.batches([_epoch_order(len(data.train), cfg.seed, -1)[:n_init]]))
        rows = torch.arange(n_init, device=x_init.device)
        noise = dequantization_noise(cfg.seed, INIT_NOISE, torch.zeros((), dtype=torch.long, device=x_init.device),
                                     rows, model.config.image_shape)
        x_init = pp.preprocess(x_init, model.config.n_bits) + noise / pp.n_bins(model.config.n_bits)
        model.initialize(x_init[rank::world], y_init[rank::world] if model.config.num_classes is not None else None)
    if init_dir is not None:
        model.save_pretrained(init_dir / "init")  # the model before its first step
        make_readable(init_dir / "init")


def train_epoch(run: TrainingRun) -> None:
    """The current epoch's remaining steps, up to ``max_steps`` or a stop request. The device is read
    only every ``log_every`` steps and at the end (:func:`read_device`)."""
    cfg, state, data = run.cfg, run.state, run.data
    epoch, spe = state["epoch"], data.steps_per_epoch
    order = _epoch_order(len(data.train), cfg.seed, epoch)
    if data.train.in_memory:
        order = order.to(run.device)  # a device permutation: the batches are gathered on the device
    rank, world = run.trainer.rank, run.trainer.world
    index_batches = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size][rank::world]
                     for i in range(state["step"] - epoch * spe, min(spe, run.max_steps - epoch * spe))]
    batches = _reraise_data_errors(data.train.batches(index_batches), DatasetError, lambda e: _data_error(run, e))
    for x_uint8, y in batches:
        if run.model_config.dropout:
            # dropout draws from the global RNG: seeded per (step, rank), a resumed run draws the masks
            # of an uninterrupted one
            torch.manual_seed(mix_seed(cfg.seed, state["step"], rank))
        run.step_fn(x_uint8, y)
        state["step"] += 1
        run.bar.update(1)
        if state["step"] % cfg.log_every == 0:
            read_device(run)
        if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
            run.checkpoint("last.pt")
        if run.stop or run.out_of_time:
            break
    read_device(run)


def read_device(run: TrainingRun) -> None:
    """Read the step's device counters (the host's one sync per ``log_every`` steps): log each
    skipped step and the window's train bits/dim, and after ``max_bad_steps`` non-finite steps in
    a row restore ``last.pt`` (or stop, when all steps since the last restore were non-finite).
    Skipped steps change nothing on the device, so acting at the read instead of at once loses
    nothing but the good steps after such a run."""
    cfg, state = run.cfg, run.state
    since, since_time = run.last_read
    c = run.trainer.read_counters()
    skipped = sorted(since + 1 + (offset - since) % cfg.log_every for offset in c["skipped_offsets"])
    for step in skipped:
        run.log({"step": step, "epoch": run.epochs_done(step), "images": c["images"],
                 "event": "non-finite loss or gradient: step skipped"})
    state["images"], state["skipped_steps"] = c["images"], c["skipped"]
    now = time.time()
    if c["bpd_count"]:
        train_bpd = float(dist_utils.all_reduce_mean(torch.tensor(c["bpd_sum"] / c["bpd_count"], device=run.device)))
        rate = (state["step"] - since) * cfg.batch_size / max(now - since_time, 1e-9)
        run.log({"step": state["step"], "epoch": run.epochs_done(state["step"]), "images": state["images"],
                 "train_bpd": train_bpd, "lr": c["lr"], "grad_norm": c["grad_norm"], "images_per_sec": rate,
                 "time_s": round(run.wall_time(), 3)})
        run.bar.set_postfix(bpd=f"{train_bpd:.3f}", img_s=f"{rate:.0f}")
    run.last_read = (state["step"], now)
    if c["worst_run"] >= cfg.max_bad_steps:
        if run.restored_at is not None and c["bad_run"] >= state["step"] - run.restored_at:
            raise TrainingError(f"training diverged at step {state['step']}: still non-finite after "
                                f"restoring {run.out / 'last.pt'}; lower --lr or set --grad-clip")
        _restore_last_good(run)
        run.restored_at = state["step"]
        run.log({"step": state["step"], "epoch": run.epochs_done(state["step"]), "images": state["images"],
                 "event": f"restored {run.out / 'last.pt'} after {c['worst_run']} non-finite steps in a row"})


def _restore_last_good(run: TrainingRun) -> None:
    """Weights, EMA and optimiser moments of ``last.pt``; the step counters go on."""
    path = run.out / "last.pt"
    if not path.is_file():
        raise TrainingError(f"{run.cfg.max_bad_steps} consecutive non-finite steps and no checkpoint to "
                            f"restore; lower --lr or enable --grad-clip")
    ckpt = load_checkpoint(path, map_location=run.device)
    run.model.load_state_dict(ckpt["model"])
    if run.ema is not None and ckpt["ema"] is not None:
        run.ema.load_state_dict(ckpt["ema"])
    counters = {k: v.clone() for k, v in run.trainer.counters.items()}
    _load_trainer(run.trainer, ckpt, run.state, str(path))
    for name in ("steps", "images", "skipped"):
        run.trainer.counters[name].copy_(counters[name])
    run.trainer.clear_bad_run()


def end_of_epoch(run: TrainingRun) -> None:
    """Health numbers, test bits/dim and samples (every ``eval_every`` epochs and the last), then
    ``last.pt``."""
    state = run.state
    state["epoch"] += 1
    record = _epoch_health(run)
    if state["epoch"] % run.cfg.eval_every == 0 or state["epoch"] == run.cfg.epochs:
        score(run, f"epoch {state['epoch']}", record)
    elif record:
        run.log({"step": state["step"], "epoch": run.epochs_done(state["step"]), "images": state["images"], **record})
    run.checkpoint("last.pt")


def score(run: TrainingRun, label: str, extra: dict[str, Any] | None = None) -> float:
    """Test bits/dim of the evaluated model and a sample grid, logged and printed; ``best.pt`` when
    it is the best so far."""
    from ..tools.images import save_grid, to_display
    from ..tools.sampling import temperature_rows

    cfg, state, m = run.cfg, run.state, run.eval_model
    m.eval()
    test_bpd = evaluate_bpd(m, run.data.test_images, run.data.test_labels, cfg.eval_batch_size, cfg.eval_draws,
                            seed=cfg.seed)
    if run.is_main:
        rows = temperature_rows(m, cfg.sample_temperatures, n_per_row=8, seed=cfg.seed)
        health.check_samples(torch.cat(rows), context=f"samples of {run.out}")
        save_grid([to_display(r, run.model_config.n_bits, run.data.display_max) for r in rows],
                  run.out / "samples" / f"{_grid_name(run)}.png",
                  row_labels=[f"T={t:g}" for t in cfg.sample_temperatures])
    run.model.train()
    run.log({"step": state["step"], "epoch": run.epochs_done(state["step"]), "images": state["images"],
             "time_s": round(run.wall_time(), 3), "test_bpd": test_bpd, **(extra or {})})
    if run.is_main:
        print(f"{label}: test {test_bpd:.4f} bits/dim (baseline {run.data.baseline:.4f})", file=sys.stderr)
    if test_bpd < state["best_bpd"]:
        state["best_bpd"] = test_bpd
        run.checkpoint("best.pt")
    if run.is_main:
        plot_curves(state["history"], run.out / "bpd.png", run.data.baseline)
    return test_bpd


def _grid_name(run: TrainingRun) -> str:
    """``epoch_007`` at the end of epoch 7, ``epoch_007_step_0001234`` mid-epoch (names sort in order)."""
    state = run.state
    name = f"epoch_{state['epoch']:03d}"
    return name if state["step"] == state["epoch"] * run.data.steps_per_epoch else f"{name}_step_{state['step']:07d}"


def _epoch_health(run: TrainingRun) -> dict[str, Any]:
    """invconv_cond_max and coupling_scale_min of the evaluated model (rank 0, one small batch)."""
    if not run.is_main:
        return {}
    record = health.health_record(run.eval_model, run.data.health_x, run.data.health_y)
    for message in health.health_warnings(record):
        print(f"epoch {run.state['epoch']}: warning: {message}", file=sys.stderr)
    return health.json_safe(record)


def finish(run: TrainingRun) -> TrainResult:
    """``last.pt``; the final score when the run is done (an evaluation of its own when it stopped
    mid-epoch at ``max_steps``, compared with the best); ``summary.json`` and ``model/``."""
    state = run.state
    interrupted = signal.Signals(run.stop.signal).name if run.stop else None
    finished = run.done and not interrupted
    final_bpd = None
    if finished:
        tested = [h for h in state["history"] if "test_bpd" in h]
        final_bpd = tested[-1]["test_bpd"] if tested and tested[-1]["step"] == state["step"] else None
        if final_bpd is None:
            final_bpd = score(run, f"step {state['step']} (epoch {run.epochs_done(state['step']):.2f})")
    state["wall_time_s"], run.segment_start = run.wall_time(), time.time()  # the same total in last.pt and summary
    run.checkpoint("last.pt")
    summary = {
        "run": str(run.out), "finished": finished, "interrupted_by": interrupted,
        "test_bpd": final_bpd, "best_test_bpd": state["best_bpd"] if math.isfinite(state["best_bpd"]) else None,
        "baseline_bpd": run.data.baseline, "steps": state["step"], "epochs": state["epoch"],
        "images_seen": state["images"], "skipped_steps": state["skipped_steps"], "wall_time_s": state["wall_time_s"],
        "evaluated_with": "ema" if run.ema is not None else "weights",
        "ema_decay": run.trainer.ema_decay if run.ema is not None else None,
        "samples": str(run.out / "samples" / f"{_grid_name(run)}.png") if final_bpd is not None else None,
    }
    if run.is_main:
        if state["history"]:
            plot_curves(state["history"], run.out / "bpd.png", run.data.baseline)
        write_json_atomic(run.out / "summary.json", summary)
        _save_model(run, final_bpd)
        if interrupted:
            print(f"stopped by {interrupted} at step {state['step']}; resume with: torchglow train --resume {run.out}",
                  file=sys.stderr)
    dist_utils.barrier()
    return TrainResult(summary, run.model, run.eval_model)


def _save_model(run: TrainingRun, test_bpd: float | None) -> None:
    """``model/``: the evaluated weights as a pretrained folder, its model card naming the data set,
    the test bits/dim and the command (rewritten, so that a resumed run's card is up to date)."""
    from ..hub import write_model_card

    folder = run.out / "model"
    run.eval_model.save_pretrained(folder)
    write_model_card(folder, run.model_config, dataset=run.cfg.dataset, test_bpd=test_bpd, command=run.command)
    make_readable(folder)


def summary_text(summary: dict[str, Any]) -> str:
    """The end of ``torchglow train`` for a person: the scores, what bits/dim means, where the
    pictures are and what to run next; which weights were scored (the EMA or the raw weights).
    Empty for an interrupted run, whose "resume with" line :func:`finish` has printed."""
    run = summary["run"]
    if summary["interrupted_by"]:
        return ""
    lines = []
    if summary["test_bpd"] is not None:
        best = summary["best_test_bpd"]
        weights = (f"the EMA of the weights (decay {summary['ema_decay']:.4g}, with warm-up)" if summary["evaluated_with"] == "ema"
                   else "the raw weights (no EMA)")
        lines.append(f"test {summary['test_bpd']:.4f} bits/dim" + (f" (best {best:.4f}, in best.pt)" if best is not None else "")
                     + f" after {plural(summary['epochs'], 'epoch')}, {plural(summary['steps'], 'step')}, "
                       f"{summary['wall_time_s'] / 60:.1f} min; scored with {weights}")
    lines += [f"baseline (each pixel on its own, counted from the training images): {summary['baseline_bpd']:.4f} "
              f"bits/dim",
              "bits/dim: the code length of a test image per pixel and colour channel under the model; lower is "
              "better, and below the baseline means the model learned how pixels go together",
              f"samples: {summary['samples'] or run + '/samples/'} (one grid per evaluation), "
              f"learning curve: {run}/bpd.png",
              f"next: torchglow sample {run}   torchglow evaluate {run}"]
    return "\n".join(lines)


def _data_error(run: TrainingRun, e: Exception) -> Exception:
    """A file that cannot be read mid-run: checkpoint at this step boundary, then stop."""
    message = _last_error_line(str(e))
    try:
        run.checkpoint("last.pt")
        return DatasetError(f"{message}; the run is checkpointed at step {run.state['step']}: fix or remove "
                            f"the file, then --resume {run.out}")
    except CheckpointError as ce:
        return DatasetError(f"{message} (and {ce})")


def _reraise_data_errors(batches, error_type: type, convert):
    """Yield from ``batches``; an ``error_type`` raised while fetching one becomes ``convert(error)``."""
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except error_type as e:
            raise convert(e) from None
        yield item


def _last_error_line(text: str) -> str:
    """The message itself, also when a DataLoader worker wrapped it with its traceback."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return text
    line = lines[-1] if len(lines) > 1 else lines[0]
    return re.sub(r"^[\w.]*Error: ", "", line) if len(lines) > 1 else line


def _progress(total: int, initial: int, desc: str, enabled: bool):
    """One bar for the whole run, with its ETA."""
    from tqdm.auto import tqdm

    # disable=None: tqdm stays quiet when stderr is not a terminal
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=None if enabled else True)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))
