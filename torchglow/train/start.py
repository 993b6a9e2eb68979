"""Starting a training: the model (new, from ``init_from`` weights or resumed from ``last.pt``), its
EMA and training step; the data-dependent ActNorm initialisation; and restoring ``last.pt`` after
a run of non-finite steps."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed as dist_utils
from .. import preprocess as pp
from ..config import GlowConfig, TrainConfig, autocast_dtype
from ..files import make_readable
from ..model import Glow
from ..noise import INIT_NOISE, dequantization_noise
from .checkpoint import CheckpointError, config_diff, load_checkpoint, load_model, load_state
from .data import TrainingData, data_line, epoch_order
from .runs import prepare_run_folder
from .step import TrainStep, compile_step
from .text import plural
from .training import StopRequest, Training, TrainingError, max_steps

# the device counters of TrainStep and the keys of a checkpoint's host state that held them
COUNTED = (("steps", "step"), ("images", "images"), ("skipped", "skipped_steps"))


def build_model(model_config: GlowConfig, train_config: TrainConfig, device: torch.device) -> Glow:
    """A new Glow on ``device`` in the run's memory mode and precision (:meth:`Glow.set_memory`
    refuses a mode that cannot work with the model, before any data is read or file written)."""
    model = Glow(model_config).to(device)
    model.set_memory(train_config.memory)
    dtype = autocast_dtype(train_config.precision)
    if dtype is not None:
        model.set_autocast(dtype)
    return model


def start_training(model: Glow, train_config: TrainConfig, resume: bool, data: TrainingData, device: torch.device,
                   stop: StopRequest, say: Callable[[str], None], progress: bool = True, defaults: str | None = None,
                   command: str | None = None) -> Training:
    """The run folder, model weights, EMA and training step: resumed from ``last.pt``, or new (from
    ``init_from`` weights or a data-dependent initialisation). Says :func:`data_line` first."""
    cfg, model_config = train_config, model.config
    rank, world = dist_utils.rank_and_world()
    if rank == 0:
        say(f"torchglow train: {data_line(model_config, cfg, data, defaults)}")
    out, command = prepare_run_folder(model_config, cfg, resume, rank == 0, command)
    state = dict(epoch=0, best_bpd=math.inf, history=[], wall_time_s=0.0)
    ckpt = _resume_checkpoint(out, model_config, device) if resume else None
    if ckpt is not None:
        load_state(model, ckpt["model"], source=str(out / "last.pt"))
        state.update({k: v for k, v in ckpt["state"].items() if k not in dict(COUNTED).values()})
    else:
        _initialize(model, cfg, data, device, out if rank == 0 else None)
    ema = None
    if cfg.ema:
        ema = Glow(model_config).to(device)
        ema.load_state_dict(ckpt["ema"] if ckpt is not None and ckpt["ema"] is not None else model.state_dict())
        ema.eval().requires_grad_(False)
    beta2 = cfg.beta2 or 1.0 - 1.0 / max(data.steps_per_epoch, 2)
    train_step = TrainStep(model, cfg, beta2, ema, cfg.ema_decay or beta2, rank, world)
    if ckpt is not None:
        load_train_step(train_step, ckpt, str(out / "last.pt"))
    step = train_step.totals()["steps"]
    step_fn = compile_step(train_step, cfg.compile_mode) if cfg.fast else train_step
    model.train()
    if rank == 0:
        where = f"resuming {out} at step {step}" if resume else f"writing the run to {out}"
        say(f"torchglow train: {where} ({plural(len(data.train), 'training image')}, "
            f"{plural(data.steps_per_epoch, 'step')} per epoch, {plural(cfg.epochs, 'epoch')})")
    bar = _progress(max_steps(cfg, data.steps_per_epoch), step, out.name, progress and rank == 0)
    return Training(model_config, cfg, out, device, data, model, ema, train_step, step_fn, state, stop, bar, say,
                    metrics_file=open(out / "metrics.jsonl", "a") if rank == 0 else None,
                    tb=_tensorboard(out) if rank == 0 else None, command=command, segment_start=time.time(),
                    last_read=(step, time.time()))


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


def load_train_step(train_step: TrainStep, ckpt: dict[str, Any], source: str) -> None:
    """The step's state from a checkpoint; one of an earlier version holds a torch.optim state and
    no device counters (they come from its host state)."""
    try:
        if "trainer" in ckpt:
            train_step.load_state_dict(ckpt["trainer"], source)
            return
        train_step.load_state_dict(ckpt["optimizer"], source)
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume: {source} holds an unusable optimiser state ({e})") from None
    for name, key in COUNTED:
        train_step.counters[name].fill_(ckpt["state"][key])


def _initialize(model: Glow, train_config: TrainConfig, data: TrainingData, device: torch.device,
                init_dir: Path | None) -> None:
    """``init_from`` weights, else the data-dependent ActNorm initialisation: every rank draws the
    same images and noise and takes its share. Rank 0 saves the result in ``init_dir``."""
    cfg = train_config
    if cfg.init_from:
        source = load_model(cfg.init_from, device, use_ema=False)
        try:
            load_state(model, source.state_dict(), source=f"`init_from` {cfg.init_from}")
        except CheckpointError as e:
            diff = config_diff(source.config.to_dict(), model.config.to_dict())
            raise CheckpointError(f"`init_from` {cfg.init_from} has another model config (it vs this run: "
                                  f"{diff})" if diff else str(e)) from None
    else:
        rank, world = dist_utils.rank_and_world()
        n_init = min(cfg.init_images, len(data.train))
        x_init, y_init = next(data.train.batches([epoch_order(len(data.train), cfg.seed, -1)[:n_init]]))
        rows = torch.arange(n_init, device=x_init.device)
        noise = dequantization_noise(cfg.seed, INIT_NOISE, torch.zeros((), dtype=torch.long, device=x_init.device),
                                     rows, model.config.image_shape)
        x_init = pp.preprocess(x_init, model.config.n_bits) + noise / pp.n_bins(model.config.n_bits)
        model.initialize(x_init[rank::world], y_init[rank::world] if model.config.num_classes is not None else None)
    if init_dir is not None:
        model.save_pretrained(init_dir / "init")  # the model before its first step
        make_readable(init_dir / "init")


def restore_last_good(training: Training) -> None:
    """Weights, EMA and optimiser moments of ``last.pt``; the step counters go on."""
    path = training.out / "last.pt"
    if not path.is_file():
        raise TrainingError(f"{training.train_config.max_bad_steps} consecutive non-finite steps and no checkpoint "
                            f"to restore; lower `lr` or enable `grad_clip`")
    ckpt = load_checkpoint(path, map_location=training.device)
    training.model.load_state_dict(ckpt["model"])
    if training.ema is not None and ckpt["ema"] is not None:
        training.ema.load_state_dict(ckpt["ema"])
    counters = training.train_step.counters
    kept = {name: counters[name].clone() for name, _ in COUNTED}
    load_train_step(training.train_step, ckpt, str(path))
    for name, value in kept.items():
        counters[name].copy_(value)
    training.train_step.clear_bad_run()


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
