"""What to benchmark: :class:`BenchConfig`, one frozen, validated dataclass that every function of
:mod:`torchglow.bench` takes, and :data:`PHASES`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, GlowConfig, TrainConfig, preset

PHASES = ("train", "sample", "eval")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: a preset (with ``overrides``, e.g. ``{"n_steps": 8, "hidden_channels": 128}``).

    Attributes:
        preset: a name from :data:`torchglow.config.PRESETS`.
        batch_size: images per iteration, in every phase.
        device: "cpu", "cuda", "cuda:N" (or "auto").
        precision: "fp32", or "bf16"/"fp16" autocast of the coupling networks
            (``model.set_autocast``; channels_last on CUDA). fp16 adds the step's loss scale, as training does.
        overrides: model config fields replacing the preset's.
        memory: the backward memory mode (``model.set_memory``): "none", "checkpoint", "invertible".
        fast: time the fast path (``TrainConfig.fast``: the compiled step; a compiled decode and
            forward for sample and eval); the first warm-up call compiles (``compile_seconds``).
        warmup, repeats: untimed and timed iterations per phase.
        phases: which of "train", "sample", "eval" to measure.
        threads: ``torch.set_num_threads`` (default: leave torch's default).
        isolate: measure each phase in a fresh subprocess so that CPU peak RSS is per phase;
            None means True on CPU and False on CUDA.
        seed: seeds the model and the images.
        compare: time the eager and the fast path side by side, interleaved (``speedup``).
        compile_mode: "regional", "whole" or "graph" (:func:`torchglow.train.step.compile_step`).
        fast_precision: the precision of the fast training step (default ``precision``), e.g. an
            eager fp32 step against a fast bf16 one.
        count: after the timing, profile one more call of each timed callable and report its
            kernel-launching ops (and on CUDA its kernels and graph launches): ``<phase>["kernels"]``,
            or per mode with ``compare`` (:func:`torchglow.bench.count_ops`; on the CPU meaningful
            for eager callables).

    Validated when made (before any time is spent): the preset and its overrides by
    :class:`GlowConfig`, batch size, precisions, memory and compile mode by :class:`TrainConfig`.
    """

    preset: str
    batch_size: int
    device: str = "auto"
    precision: str = "fp32"
    overrides: dict[str, Any] = field(default_factory=dict)
    memory: str = "none"
    fast: bool = False
    warmup: int = 3
    repeats: int = 10
    phases: tuple[str, ...] = PHASES
    threads: int | None = None
    isolate: bool | None = None
    seed: int = 0
    compare: bool = False
    compile_mode: str = "regional"
    fast_precision: str | None = None
    count: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", dict(self.overrides or {}))
        object.__setattr__(self, "phases", tuple(self.phases))
        self.model_config()
        self.train_config(fast=False)  # the eager step
        self.train_config(precision=self.fast_precision or self.precision, fast=self.fast or self.compare)
        if self.warmup < 0 or self.repeats < 1:
            raise ConfigError("`repeats` must be >= 1 and `warmup` >= 0")
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown or not self.phases:
            raise ConfigError(f"`phases` must be a non-empty subset of {PHASES}, got {list(self.phases)}")

    def model_config(self) -> GlowConfig:
        """The preset with the overrides."""
        return preset(self.preset, **self.overrides)

    def train_config(self, **changes: Any) -> TrainConfig:
        """The training options of the timed step (lr 1e-4 without warm-up, no clipping, EMA), with ``changes``."""
        options = dict(batch_size=self.batch_size, lr=1e-4, warmup_images=0, precision=self.precision,
                       fast=self.fast, compile_mode=self.compile_mode, memory=self.memory)
        return TrainConfig(**{**options, **changes})

    def replace(self, **changes: Any) -> BenchConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
