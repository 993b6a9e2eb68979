"""One phase of a benchmark in this process: :func:`build` the model and its batch,
:func:`train_step` and :func:`phase_calls` the callables to time, :func:`time_calls` them in
interleaved rounds, and :func:`measure_phase`, all of it with its rates, memory and kernel counts."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, NamedTuple

import torch

from .. import preprocess as pp
from ..config import ConfigError, autocast_dtype
from ..devices import resolve_device
from ..model import Glow
from ..tools.fast import fast_forward, fast_sampler
from ..train.step import GraphedStep, TrainStep, compile_step
from .config import PHASES, BenchConfig
from .ops import count_ops
from .report import peak_rss_mb


class Built(NamedTuple):
    """A model on its device, ActNorm initialised, and the batch it is timed on."""

    model: Glow
    x_uint8: torch.Tensor
    y: torch.Tensor | None


def build(config: BenchConfig) -> Built:
    """The model of ``config`` on its device, ActNorm initialised from a dequantised batch, plus that
    batch (uint8 images and, for a conditional model, labels), all seeded by ``config.seed``."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model_config = config.model_config()
    model = Glow(model_config).to(device)
    model.set_memory(config.memory)
    channels_last = False
    if config.precision != "fp32":
        model.set_autocast(autocast_dtype(config.precision))
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            channels_last = True
    g = torch.Generator().manual_seed(config.seed)
    shape = (config.batch_size, *model_config.image_shape)
    x_uint8 = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device)
    y = None
    if model_config.num_classes:
        y = torch.randint(0, model_config.num_classes, (config.batch_size,), generator=g).to(device)
    if channels_last:
        x_uint8 = x_uint8.contiguous(memory_format=torch.channels_last)
    x_init = pp.dequantize(pp.preprocess(x_uint8, model_config.n_bits), model_config.n_bits)
    model.initialize(x_init, y)
    return Built(model, x_uint8, y)


def train_step(config: BenchConfig, built: Built) -> Callable[[], Any]:
    """One training step of ``built`` exactly as :func:`torchglow.train.train` takes it (the same
    :class:`torchglow.train.step.TrainStep`; :meth:`BenchConfig.train_config`), compiled when
    ``config.fast``. Its ``graphed`` attribute is the CUDA-graphed step (None if not graphed), for
    its warm-up and capture time."""
    model, x_uint8, y = built
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    step = TrainStep(model, config.train_config(), beta2=0.999, ema=ema, ema_decay=0.999)
    model.train()
    fn = compile_step(step, config.compile_mode) if config.fast else step

    def call():
        return fn(x_uint8, y)

    call.graphed = fn if isinstance(fn, GraphedStep) else None
    return call


def _sample_call(config: BenchConfig, built: Built) -> Callable[[], Any]:
    built.model.eval()
    sample = fast_sampler(built.model, config.batch_size) if config.fast else built.model.sample

    def call():
        return sample(config.batch_size, y=built.y)

    call.graphed = getattr(sample, "graphed", None)
    return call


def _eval_call(config: BenchConfig, built: Built) -> Callable[[], Any]:
    model, x_uint8, y = built
    model.eval()
    n_bits, n_dims = model.config.n_bits, model.config.n_dims
    # the fast forward: a CUDA graph, its flow steps compiled unless compile_mode is "graph"
    forward = fast_forward(model, compile=config.compile_mode != "graph") if config.fast else model

    def call():
        with torch.no_grad():
            x = pp.dequantize(pp.preprocess(x_uint8, n_bits), n_bits)
            pp.bits_per_dim_from_log_prob(forward(x, y).log_prob, n_dims, n_bits)

    call.graphed = getattr(forward, "graphed", None)
    return call


_CALLS = {"train": train_step, "sample": _sample_call, "eval": _eval_call}


def phase_calls(config: BenchConfig, phase: str) -> tuple[dict[str, Callable[[], Any]], int]:
    """The callables timed in one phase: ``{"eager": ...}``, ``{"fast": ...}`` or both
    (``config.compare``), each on its own model built from the same seed (the fast training step in
    ``config.fast_precision`` when given), and the model's parameter count."""
    if phase not in PHASES:
        raise ConfigError(f"unknown phase {phase!r}; choose from {PHASES}")
    modes = ("eager", "fast") if config.compare else (("fast",) if config.fast else ("eager",))
    calls = {}
    for mode in modes:
        precision = config.precision
        if mode == "fast" and phase == "train":
            precision = config.fast_precision or precision
        mode_config = config.replace(fast=mode == "fast", compare=False, precision=precision)
        built = build(mode_config)
        calls[mode] = _CALLS[phase](mode_config, built)
    return calls, sum(p.numel() for p in built.model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(calls: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
               repeats: int) -> dict[str, dict[str, list]]:
    """Per callable of ``calls``: wall seconds of ``warmup`` untimed and ``repeats`` timed calls, each
    synchronised, and the CPU seconds (user + system, all threads) of the timed calls. The
    callables take turns call by call (interleaved rounds)."""
    times = {name: {"warm": [], "timed": [], "cpu": []} for name in calls}
    for i in range(warmup + repeats):
        for name, fn in calls.items():
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            _sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            if i < warmup:
                times[name]["warm"].append(t1 - t0)
            else:
                times[name]["timed"].append(t1 - t0)
                times[name]["cpu"].append(c1 - c0)
    return times


def _stats(batch_size: int, t: dict[str, list]) -> dict[str, Any]:
    """Images/s and seconds of one callable's :func:`time_calls` entry ``t``."""
    median = statistics.median(t["timed"])
    return {"images_per_s": batch_size / median, "seconds_median": median, "seconds_min": min(t["timed"]),
            "seconds_max": max(t["timed"]), "seconds": t["timed"], "warmup_seconds": t["warm"],
            "cpu_seconds_median": statistics.median(t["cpu"]), "cpu_seconds": t["cpu"]}


def _count(calls: dict[str, Callable[[], Any]], per_mode: dict[str, dict[str, Any]]) -> None:
    for mode, fn in calls.items():
        try:
            per_mode[mode]["kernels"] = count_ops(fn, warmup=0)
        except RuntimeError as e:  # a profiler that cannot run here must not cost the timings
            per_mode[mode]["kernels_error"] = f"{type(e).__name__}: {e}"


def measure_phase(config: BenchConfig, phase: str) -> dict[str, Any]:
    """Build, initialise and time one phase in this process: the images/s and seconds (of the
    fast callable when there is one), ``graphed`` and the capture and compile seconds, with
    ``config.compare`` both modes and their ``speedup``, the peak RSS before (``baseline_rss_mb``)
    and after, the parameter count and on CUDA ``peak_cuda_mb``."""
    dev = resolve_device(config.device)
    calls, n_params = phase_calls(config, phase)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    baseline = peak_rss_mb()
    times = time_calls(calls, dev, max(config.warmup, 1 if "fast" in calls else 0), config.repeats)
    per_mode = {mode: _stats(config.batch_size, t) for mode, t in times.items()}
    if config.count:
        _count(calls, per_mode)
    result = dict(per_mode["fast" if "fast" in per_mode else "eager"])
    graphed = getattr(calls.get("fast"), "graphed", None)
    result["graphed"] = graphed is not None and graphed.captured
    if graphed is not None:
        result["capture_seconds"] = graphed.capture_seconds  # warm-up calls and capture, compile included
        if graphed.failure:
            result["capture_failure"] = graphed.failure
    if "fast" in per_mode:
        # the first call compiles; the later warm-up calls are already fast
        result["compile_seconds"] = per_mode["fast"]["warmup_seconds"][0] - per_mode["fast"]["seconds_median"]
    if config.compare:
        result["eager"], result["fast"] = per_mode["eager"], per_mode["fast"]
        result["speedup"] = per_mode["eager"]["seconds_median"] / per_mode["fast"]["seconds_median"]
        result["speedup_per_round"] = [e / f for e, f in zip(times["eager"]["timed"], times["fast"]["timed"])]
    result.update(peak_rss_mb=peak_rss_mb(), baseline_rss_mb=baseline, n_params=n_params)
    if dev.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return result
