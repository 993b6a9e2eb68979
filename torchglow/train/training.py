"""A training in progress (:class:`Training`): its configs, run folder, data, model, EMA, step and
host state, with its log and its checkpoints; and the stop request that SIGINT/SIGTERM set."""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import GlowConfig, TrainConfig
from ..model import Glow
from .checkpoint import FORMAT, atomic_save
from .data import TrainingData
from .step import TrainStep


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite after restoring a checkpoint)."""


class StopRequest:
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


def max_steps(train_config: TrainConfig, steps_per_epoch: int) -> int:
    """Where the run ends: ``epochs`` full epochs, or ``max_steps`` when that comes first."""
    return min(train_config.max_steps or math.inf, train_config.epochs * steps_per_epoch)


@dataclass
class Training:
    """A training in progress.

    The steps taken (skipped ones included), the images of applied steps and the skipped steps
    are the training step's device counters (:meth:`TrainStep.totals`); the host reads them where
    it logs, evaluates or checkpoints. ``state`` holds the rest: ``epoch`` (completed epochs),
    ``best_bpd``, ``history`` (the metrics.jsonl records) and ``wall_time_s`` (all segments of the
    run). A checkpoint's ``state`` holds both.
    """

    model_config: GlowConfig
    train_config: TrainConfig
    out: Path
    device: torch.device
    data: TrainingData
    model: Glow
    ema: Glow | None
    train_step: TrainStep
    step_fn: Callable[..., dict[str, torch.Tensor]]
    state: dict[str, Any]
    stop: StopRequest
    bar: Any
    say: Callable[[str], None]  # the lines for a person (the CLI puts them in its words)
    metrics_file: Any = None
    tb: Any = None
    command: str | None = None
    segment_start: float = 0.0
    last_read: tuple[int, float] = (0, 0.0)
    restored_at: int | None = None

    @property
    def is_main(self) -> bool:
        return self.train_step.rank == 0

    @property
    def step(self) -> int:
        """Steps taken (a device read)."""
        return self.train_step.totals()["steps"]

    @property
    def max_steps(self) -> int:
        return max_steps(self.train_config, self.data.steps_per_epoch)

    @property
    def out_of_time(self) -> bool:
        return bool(self.train_config.max_minutes) and self.wall_time() >= 60 * self.train_config.max_minutes

    @property
    def done(self) -> bool:
        return (self.state["epoch"] >= self.train_config.epochs or self.step >= self.max_steps
                or self.out_of_time)

    @property
    def epoch_complete(self) -> bool:
        return self.step == (self.state["epoch"] + 1) * self.data.steps_per_epoch

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

    def log_at(self, step: int, images: int, record: dict[str, Any]) -> None:
        """:meth:`log` of ``record`` after its ``step``, epoch and ``images``."""
        self.log({"step": step, "epoch": self.epochs_done(step), "images": images, **record})

    def log_at_step(self, record: dict[str, Any]) -> None:
        """:meth:`log_at` the step and images of now."""
        totals = self.train_step.totals()
        self.log_at(totals["steps"], totals["images"], record)

    def wall_time(self) -> float:
        return self.state["wall_time_s"] + time.time() - self.segment_start

    def checkpoint(self, name: str) -> None:
        if not self.is_main:
            return
        totals, s = self.train_step.totals(), self.state
        state = {"step": totals["steps"], "epoch": s["epoch"], "images": totals["images"], "best_bpd": s["best_bpd"],
                 "history": s["history"], "skipped_steps": totals["skipped"], "wall_time_s": self.wall_time()}
        atomic_save({
            "format": FORMAT, "model_config": self.model_config.to_dict(),
            "train_config": self.train_config.to_dict(), "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "trainer": self.train_step.state_dict(), "state": state,
        }, self.out / name)

    @property
    def eval_model(self) -> Glow:
        return self.ema if self.ema is not None else self.model

    def close(self) -> None:
        self.bar.close()
        if self.metrics_file:
            self.metrics_file.close()
        if self.tb:
            self.tb.close()
