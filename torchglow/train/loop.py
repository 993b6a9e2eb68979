"""Training: :func:`train` is a driver that reads top to bottom.

::

    model = build_model(...)          # the model in its memory mode and precision
    data = load_data(...)             # the training and test images, the per-pixel baseline
    training = start_training(...)    # the run folder, weights, EMA and training step: new or resumed
    while not training.done:
        train_epoch(training)         # steps on the device; the host reads it every log_every steps
        end_of_epoch(training)        # health, test bits/dim, samples, best.pt, last.pt
    finish(training)                  # the final score, summary.json, model/

One process or many (torchrun): every rank builds the same model, initialises ActNorm from its
share of the same images (statistics averaged across ranks), takes its rows of each global batch,
and the step averages the gradients with one all-reduce. The step (:mod:`torchglow.train.step`)
draws its noise from a counter-based hash of (seed, step, element), so a resumed run and a run on N
processes see exactly the noise of an uninterrupted single-process run. What a run folder holds:
:mod:`torchglow.train.runs`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import distributed as dist_utils
from .. import health
from ..config import ConfigError, GlowConfig, TrainConfig
from ..data import DatasetError, absolute_dataset, user_path
from ..files import make_readable, write_json_atomic
from ..model import Glow
from ..noise import mix_seed
from ..tools.evaluate import evaluate_bpd, plot_curves
from .checkpoint import CheckpointError
from .data import epoch_order, load_data
from .start import build_model, restore_last_good, start_training
from .text import already_finished_line, stopped_line
from .training import StopRequest, Training, TrainingError


@dataclass
class TrainResult:
    """What :func:`train` returns: the run summary (also in ``summary.json``), the trained model and
    the model used for evaluation (the EMA when enabled, else the same model)."""

    summary: dict[str, Any]
    model: Glow
    eval_model: Glow


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def train(model_config: GlowConfig, train_config: TrainConfig, resume: bool = False, progress: bool = True, *,
          defaults: str | None = None, command: str | None = None,
          say: Callable[[str], None] = _to_stderr) -> TrainResult:
    """Train a Glow; the run summary is also written to ``<out>/summary.json``.

    With ``resume=True``, ``train_config.out`` must be an existing run folder; training continues
    from its ``last.pt`` and ends exactly where an uninterrupted run would have (a finished run says
    so and is left as it is: raise ``epochs`` or ``max_steps`` to extend it). Without it, ``out``
    must not hold a run unless ``overwrite``.

    SIGINT/SIGTERM (once) at any point after this is called stop the run cleanly: ``last.pt`` is
    written at the next step boundary and the summary says ``interrupted_by``; a second signal is
    fatal (the previous ``last.pt`` stays intact, as every checkpoint is written atomically).

    A folder or ``.npz`` data set (and ``data_dir``) is stored in the run as an absolute path, so
    that the tools find it from any directory. The first line said describes the data (shape,
    n_bits, classes, images per split) and ends with ``defaults``, the caller's words for where
    the configs come from; ``command`` (the command line that started the run) goes into
    ``config.json`` and the model card of ``model/``. ``say`` prints the lines for a person
    (stderr; options in them are fields in backticks, which the CLI turns into its flags).
    """
    data_dir = train_config.data_dir
    train_config = dataclasses.replace(train_config, dataset=absolute_dataset(train_config.dataset),
                                       data_dir=None if data_dir is None else str(user_path(data_dir).resolve()))
    with StopRequest() as stop:
        device = _setup(train_config)
        model = build_model(model_config, train_config, device)
        data = load_data(model_config, train_config, device)
        training = start_training(model, train_config, resume, data, device, stop, say, progress,
                                  defaults=defaults, command=command)
        try:
            if resume and training.done and training.is_main:
                say(already_finished_line(training.out, training.state["epoch"], training.step, train_config.epochs))
            while not training.done and not stop:
                train_epoch(training)
                if training.epoch_complete:
                    end_of_epoch(training)
            return finish(training, say)
        finally:
            training.close()


def _setup(train_config: TrainConfig) -> torch.device:
    """This process's device (joining torchrun's process group), after the checks that need no data."""
    device = dist_utils.setup(train_config.device)
    world = dist_utils.rank_and_world()[1]
    if train_config.batch_size % world:
        raise ConfigError(f"`batch_size` {train_config.batch_size} is not divisible by the {world} processes")
    torch.manual_seed(train_config.seed)
    return device


def train_epoch(training: Training) -> None:
    """The current epoch's remaining steps, up to ``max_steps`` or a stop request. The device is read
    only every ``log_every`` steps and at the end (:func:`read_device`)."""
    cfg, data = training.train_config, training.data
    epoch, spe, first = training.state["epoch"], data.steps_per_epoch, training.step
    order = epoch_order(len(data.train), cfg.seed, epoch)
    if data.train.in_memory:
        order = order.to(training.device)  # a device permutation: the batches are gathered on the device
    rank, world = training.train_step.rank, training.train_step.world
    index_batches = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size][rank::world]
                     for i in range(first - epoch * spe, min(spe, training.max_steps - epoch * spe))]
    batches = _reraise_data_errors(data.train.batches(index_batches), DatasetError,
                                   lambda e: _data_error(training, e))
    for step, (x_uint8, y) in enumerate(batches, start=first):
        if training.model_config.dropout:
            # dropout draws from the global RNG: seeded per (step, rank), a resumed run draws the masks
            # of an uninterrupted one
            torch.manual_seed(mix_seed(cfg.seed, step, rank))
        training.step_fn(x_uint8, y)
        training.bar.update(1)
        if (step + 1) % cfg.log_every == 0:
            read_device(training)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            training.checkpoint("last.pt")
        if training.stop or training.out_of_time:
            break
    read_device(training)


def read_device(training: Training) -> None:
    """Read the step's device counters (the host's one sync per ``log_every`` steps): log each
    skipped step and the window's train bits/dim, and after ``max_bad_steps`` non-finite steps in
    a row restore ``last.pt`` (or stop, when all steps since the last restore were non-finite).
    Skipped steps change nothing on the device, so acting at the read instead of at once loses
    nothing but the good steps after such a run."""
    cfg = training.train_config
    since, since_time = training.last_read
    c = training.train_step.read_counters()
    step = c["steps"]
    skipped = sorted(since + 1 + (offset - since) % cfg.log_every for offset in c["skipped_offsets"])
    for s in skipped:
        training.log_at(s, c["images"], {"event": "non-finite loss or gradient: step skipped"})
    now = time.time()
    if c["bpd_count"]:
        train_bpd = float(dist_utils.all_reduce_mean(torch.tensor(c["bpd_sum"] / c["bpd_count"],
                                                                  device=training.device)))
        rate = (step - since) * cfg.batch_size / max(now - since_time, 1e-9)
        training.log_at(step, c["images"], {"train_bpd": train_bpd, "lr": c["lr"], "grad_norm": c["grad_norm"],
                                            "images_per_sec": rate, "time_s": round(training.wall_time(), 3)})
        training.bar.set_postfix(bpd=f"{train_bpd:.3f}", img_s=f"{rate:.0f}")
    training.last_read = (step, now)
    if c["worst_run"] >= cfg.max_bad_steps:
        if training.restored_at is not None and c["bad_run"] >= step - training.restored_at:
            raise TrainingError(f"training diverged at step {step}: still non-finite after "
                                f"restoring {training.out / 'last.pt'}; lower `lr` or set `grad_clip`")
        restore_last_good(training)
        training.restored_at = step
        training.log_at(step, c["images"], {
            "event": f"restored {training.out / 'last.pt'} after {c['worst_run']} non-finite steps in a row"})


def end_of_epoch(training: Training) -> None:
    """Health numbers, test bits/dim and samples (every ``eval_every`` epochs and the last), then
    ``last.pt``."""
    state = training.state
    state["epoch"] += 1
    record = _epoch_health(training)
    if state["epoch"] % training.train_config.eval_every == 0 or state["epoch"] == training.train_config.epochs:
        score(training, f"epoch {state['epoch']}", record)
    elif record:
        training.log_at_step(record)
    training.checkpoint("last.pt")


def score(training: Training, label: str, extra: dict[str, Any] | None = None) -> float:
    """Test bits/dim of the evaluated model and a sample grid, logged and printed; ``best.pt`` when
    it is the best so far."""
    from ..tools.images import save_grid, to_display
    from ..tools.sampling import temperature_rows

    cfg, state, m = training.train_config, training.state, training.eval_model
    m.eval()
    test_bpd = evaluate_bpd(m, training.data.test_images, training.data.test_labels, cfg.eval_batch_size,
                            cfg.eval_draws, seed=cfg.seed)
    if training.is_main:
        rows = temperature_rows(m, cfg.sample_temperatures, n_per_row=8, seed=cfg.seed)
        health.check_samples(torch.cat(rows), context=f"samples of {training.out}")
        save_grid([to_display(r, training.model_config.n_bits, training.data.display_max) for r in rows],
                  training.out / "samples" / f"{_grid_name(training)}.png",
                  row_labels=[f"T={t:g}" for t in cfg.sample_temperatures])
    training.model.train()
    training.log_at_step({"time_s": round(training.wall_time(), 3), "test_bpd": test_bpd, **(extra or {})})
    if training.is_main:
        training.say(f"{label}: test {test_bpd:.4f} bits/dim (baseline {training.data.baseline:.4f})")
    if test_bpd < state["best_bpd"]:
        state["best_bpd"] = test_bpd
        training.checkpoint("best.pt")
    if training.is_main:
        plot_curves(state["history"], training.out / "bpd.png", training.data.baseline)
    return test_bpd


def _grid_name(training: Training) -> str:
    """``epoch_007`` at the end of epoch 7, ``epoch_007_step_0001234`` mid-epoch (names sort in order)."""
    epoch, step = training.state["epoch"], training.step
    name = f"epoch_{epoch:03d}"
    return name if step == epoch * training.data.steps_per_epoch else f"{name}_step_{step:07d}"


def _epoch_health(training: Training) -> dict[str, Any]:
    """invconv_cond_max and coupling_scale_min of the evaluated model (rank 0, one small batch)."""
    if not training.is_main:
        return {}
    record = health.health_record(training.eval_model, training.data.health_x, training.data.health_y)
    for message in health.health_warnings(record):
        training.say(f"epoch {training.state['epoch']}: warning: {message}")
    return health.json_safe(record)


def finish(training: Training, say: Callable[[str], None]) -> TrainResult:
    """``last.pt``; the final score when the run is done (an evaluation of its own when it stopped
    mid-epoch at ``max_steps``, compared with the best); ``summary.json`` and ``model/``."""
    state = training.state
    interrupted = signal.Signals(training.stop.signal).name if training.stop else None
    finished = training.done and not interrupted
    totals = training.train_step.totals()
    final_bpd = None
    if finished:
        tested = [h for h in state["history"] if "test_bpd" in h]
        final_bpd = tested[-1]["test_bpd"] if tested and tested[-1]["step"] == totals["steps"] else None
        if final_bpd is None:
            final_bpd = score(training, f"step {totals['steps']} (epoch {training.epochs_done(totals['steps']):.2f})")
    # the same total in last.pt and summary
    state["wall_time_s"], training.segment_start = training.wall_time(), time.time()
    training.checkpoint("last.pt")
    summary = {
        "run": str(training.out), "finished": finished, "interrupted_by": interrupted,
        "test_bpd": final_bpd, "best_test_bpd": state["best_bpd"] if math.isfinite(state["best_bpd"]) else None,
        "baseline_bpd": training.data.baseline, "steps": totals["steps"], "epochs": state["epoch"],
        "images_seen": totals["images"], "skipped_steps": totals["skipped"], "wall_time_s": state["wall_time_s"],
        "evaluated_with": "ema" if training.ema is not None else "weights",
        "ema_decay": training.train_step.ema_decay if training.ema is not None else None,
        "samples": (str(training.out / "samples" / f"{_grid_name(training)}.png")
                    if final_bpd is not None else None),
    }
    if training.is_main:
        if state["history"]:
            plot_curves(state["history"], training.out / "bpd.png", training.data.baseline)
        write_json_atomic(training.out / "summary.json", summary)
        _save_model(training, final_bpd)
        if interrupted:
            say(stopped_line(interrupted, totals["steps"], training.out))
    dist_utils.barrier()
    return TrainResult(summary, training.model, training.eval_model)


def _save_model(training: Training, test_bpd: float | None) -> None:
    """``model/``: the evaluated weights as a pretrained folder, its model card naming the data set,
    the test bits/dim and the command (rewritten, so that a resumed run's card is up to date)."""
    from ..hub import write_model_card

    folder = training.out / "model"
    training.eval_model.save_pretrained(folder)
    write_model_card(folder, training.model_config, dataset=training.train_config.dataset, test_bpd=test_bpd,
                     command=training.command)
    make_readable(folder)


def _data_error(training: Training, e: Exception) -> Exception:
    """A file that cannot be read mid-run: checkpoint at this step boundary, then stop."""
    message = _last_error_line(str(e))
    try:
        training.checkpoint("last.pt")
        return DatasetError(f"{message}; the run is checkpointed at step {training.step}: fix or remove "
                            f"the file, then `resume` {training.out}")
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
