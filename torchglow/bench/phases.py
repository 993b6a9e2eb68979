"""Speed and memory benchmark: training, sampling and evaluation throughput and peak memory.

:func:`run_benchmark` builds a preset (optionally reduced with ``overrides``), initialises ActNorm
from a batch, and times, after ``warmup`` untimed iterations, ``repeats`` iterations of each phase;
the reported rate is ``batch_size / median(iteration time)``:

``train``
    The training step of :func:`torchglow.train.train`, the same object
    (:class:`torchglow.step.TrainStep`): device noise, forward, loss, backward, gradient norm,
    masked Adamax update, EMA; with ``fast`` its compiled form (:func:`torchglow.step.compile_step`).
    With ``compare`` the eager and the fast step run side by side in one process, in interleaved
    rounds (eager, fast, eager, fast, ...) so that a machine busy with other work slows both alike;
    the result has both rates, their ratio and the compile time (the fast step's first call).
``sample``
    ``model.sample(batch_size)`` in eval mode (``fast``: the decode as a CUDA graph, :func:`torchglow.fast.fast_sampler`).
``eval``
    ``model.bits_per_dim(x_uint8)`` in eval mode under ``torch.no_grad`` (``fast``: :func:`torchglow.fast.fast_forward`).

On CUDA every timed iteration is bracketed by ``torch.cuda.synchronize()`` and peak memory is
``torch.cuda.max_memory_allocated`` (reset before each phase). On CPU peak memory is the peak
resident set size (``resource.getrusage(...).ru_maxrss``), which is a property of the whole
process; by default (``isolate=None`` → True on CPU) each phase therefore runs in a fresh Python
subprocess, so the figure is the peak of a process that imported torch, built the model and ran
that phase only. ``*_baseline_rss_mb`` is that process's peak RSS *before* the phase's first
iteration (import, model, optimiser, ActNorm init), so ``peak - baseline`` bounds what the phase
itself added. With ``isolate=False`` the phases share this process and the RSS figures are the
process peak so far (monotone across phases, and including whatever ran before).

The command line (``torchglow bench`` or ``python -m torchglow.bench``, see :func:`main`) prints a
summary; it writes the full result as JSON only when asked (``--out DIR`` writes ``DIR/<name>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import COMPILE_MODES, PRECISIONS
from ..devices import resolve_device

PHASES = ("train", "sample", "eval")


# --------------------------------------------------------------------------- environment
def cpu_name() -> str:
    """The CPU model string from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def git_commit() -> str:
    """``git rev-parse HEAD`` of the checkout this module lives in, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def git_dirty() -> bool | None:
    """Whether the checkout has uncommitted changes to tracked files (None if unknown)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# --------------------------------------------------------------------------- kernels per call
# aten ops that only make a view or read metadata: no kernel on any device
VIEW_OPS = frozenset("aten::" + name for name in (
    "view", "view_as", "reshape", "_reshape_alias", "_unsafe_view", "expand", "expand_as", "as_strided",
    "slice", "select", "unsqueeze", "squeeze", "t", "transpose", "permute", "detach", "alias", "lift_fresh",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resolve_conj", "resolve_neg",
    "split", "split_with_sizes", "unbind", "narrow", "chunk", "flatten", "unflatten", "movedim", "diagonal",
    "numpy_T", "size", "stride", "numel", "dim", "is_nonzero", "result_type", "set_", "resize_",
    "requires_grad_", "_has_compatible_shallow_copy_type", "is_same_size", "to", "contiguous", "type_as"))
# of these, composites that launch work only through the ops they call (a real copy)
PASS_THROUGH = frozenset("aten::" + name for name in ("to", "contiguous", "type_as", "reshape", "flatten", "dropout"))
# CUDA runtime/driver calls that launch one kernel each
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel")


def count_ops(fn, warmup: int = 1) -> dict[str, Any]:
    """Kernel-launching operations of one call of ``fn`` (after ``warmup`` untimed calls), from
    ``torch.profiler``.

    The rule, on every device: count the *top-level* aten ops (those not called from within another
    aten op, so ``aten::linear`` counts once and its ``aten::addmm`` not again; an autograd node of
    the backward is not an aten op, so each backward op counts) that are not view or metadata ops
    (:data:`VIEW_OPS`: ``view``, ``reshape``, ``_reshape_alias``, ``expand``, ``as_strided``,
    ``slice``, ``select``, ``(un)squeeze``, ``t``, ``transpose``, ``permute``, ``detach``,
    ``alias``, ``empty*``, ``resolve_*``, ``split``, ``unbind``, ``narrow``, ``_unsafe_view``, ...);
    ``to``, ``contiguous``, ``type_as``, ``reshape``, ``flatten`` and ``dropout`` count when they
    call a non-view op (a real copy, a mask). On a GPU each counted op is at least one kernel launch. Code
    generated by torch.compile is not made of aten ops and is not counted: count eager callables.

    On CUDA also (``ProfilerActivity.CUDA``): ``cuda_kernels``, the kernels that ran on the device
    (memcpy and memset excluded), ``graph_launches``, the ``cudaGraphLaunch`` calls, and
    ``kernel_launch_calls``, the kernels launched one by one from the host.

    Returns ``{"ops": N, "ops_by_name": {name: count, ...}}`` (most frequent first) plus the CUDA
    counts when a GPU is present.
    """
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()

    def inside_aten(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    def launches(event) -> bool:
        if event.name not in PASS_THROUGH:
            return event.name not in VIEW_OPS
        stack = list(event.cpu_children)
        while stack:
            child = stack.pop()
            if child.name.startswith("aten::") and child.name not in VIEW_OPS:
                return True
            stack.extend(child.cpu_children)
        return False

    cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    counted = Counter(e.name for e in cpu_events
                      if e.name.startswith("aten::") and not inside_aten(e) and launches(e))
    result: dict[str, Any] = {"ops": sum(counted.values()), "ops_by_name": dict(counted.most_common())}
    if cuda:
        device_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        result["cuda_kernels"] = sum(1 for e in device_events if not e.name.lower().startswith(("memcpy", "memset")))
        result["graph_launches"] = sum(1 for e in cpu_events if e.name.startswith("cudaGraphLaunch"))
        result["kernel_launch_calls"] = sum(1 for e in cpu_events if e.name.startswith(LAUNCH_CALLS))
    return result


# --------------------------------------------------------------------------- the phases
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fns: dict[str, Any], device: torch.device, warmup: int, repeats: int) -> dict[str, dict[str, list]]:
    """Per callable of ``fns``: wall seconds of ``warmup`` untimed and ``repeats`` timed calls, each
    synchronised, and the CPU seconds (user + system, all threads) of the timed calls. The
    callables take turns call by call (interleaved rounds)."""
    times = {name: {"warm": [], "timed": [], "cpu": []} for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
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


def _build(preset_name: str, overrides: dict[str, Any], batch_size: int, device: torch.device,
           precision: str, memory: str, seed: int):
    """The model on ``device``, ActNorm initialised from a dequantised batch, plus that batch."""
    from .. import preprocess as pp
    from ..config import preset
    from ..model import Glow

    torch.manual_seed(seed)
    config = preset(preset_name, **overrides)
    model = Glow(config).to(device)
    model.set_memory(memory)
    channels_last = False
    if precision != "fp32":
        model.set_autocast(torch.bfloat16 if precision == "bf16" else torch.float16)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            channels_last = True
    g = torch.Generator().manual_seed(seed)
    x_uint8 = torch.randint(0, 256, (batch_size, *config.image_shape), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, config.num_classes, (batch_size,), generator=g).to(device) if config.num_classes else None
    if channels_last:
        x_uint8 = x_uint8.contiguous(memory_format=torch.channels_last)
    x_init = pp.dequantize(pp.preprocess(x_uint8, config.n_bits), config.n_bits)
    model.initialize(x_init, y)
    return model, config, x_uint8, y


def _train_step_fn(model, x_uint8, y, precision: str, memory: str, fast: bool, compile_mode: str):
    """One training step exactly as :func:`torchglow.train.train` takes it (the same
    :class:`torchglow.step.TrainStep`; lr 1e-4 without warm-up, no clipping, EMA)."""
    import copy

    from ..config import TrainConfig
    from .step import GraphedStep, TrainStep, compile_step

    cfg = TrainConfig(batch_size=x_uint8.shape[0], lr=1e-4, warmup_images=0, precision=precision, fast=fast,
                      compile_mode=compile_mode, memory=memory)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    step = TrainStep(model, cfg, beta2=0.999, ema=ema, ema_decay=0.999)
    model.train()
    fn = compile_step(step, compile_mode) if fast else step

    def call():
        return fn(x_uint8, y)

    call.graphed = fn if isinstance(fn, GraphedStep) else None  # for its warm-up and capture time
    return call


def _phase_fns(phase: str, preset_name: str, overrides: dict[str, Any], batch_size: int, dev: torch.device,
               precision: str, memory: str, fast: bool, compare: bool, compile_mode: str, seed: int,
               fast_precision: str | None = None):
    """The callables timed in one phase: ``{"eager": ...}``, ``{"fast": ...}`` or both (``compare``),
    each on its own model built from the same seed; the fast one in ``fast_precision`` when given."""
    from ..tools.fast import fast_forward, fast_sampler

    modes = ("eager", "fast") if compare else (("fast",) if fast else ("eager",))
    fns = {}
    for mode in modes:
        precision = (fast_precision or precision) if mode == "fast" and phase == "train" else precision
        model, config, x_uint8, y = _build(preset_name, overrides, batch_size, dev, precision, memory, seed)
        if phase == "train":
            fns[mode] = _train_step_fn(model, x_uint8, y, precision, memory, mode == "fast", compile_mode)
        elif phase == "sample":
            model.eval()
            sample = fast_sampler(model, batch_size) if mode == "fast" else model.sample
            fns[mode] = lambda sample=sample, y=y: sample(batch_size, y=y)
            fns[mode].graphed = getattr(sample, "graphed", None)
        elif phase == "eval":
            model.eval()
            # the fast forward: a CUDA graph, its flow steps compiled unless compile_mode is "graph"
            forward = fast_forward(model, compile=compile_mode != "graph") if mode == "fast" else model

            def fns_eval(forward=forward, x_uint8=x_uint8, y=y, n_bits=config.n_bits, n_dims=config.n_dims):
                from .. import preprocess as pp

                with torch.no_grad():
                    x = pp.dequantize(pp.preprocess(x_uint8, n_bits), n_bits)
                    pp.bits_per_dim_from_log_prob(forward(x, y).log_prob, n_dims, n_bits)

            fns[mode] = fns_eval
            fns_eval.graphed = getattr(forward, "graphed", None)
        else:
            raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")
    return fns, sum(p.numel() for p in model.parameters())


def _stats(batch_size: int, t: dict[str, list]) -> dict[str, Any]:
    median = statistics.median(t["timed"])
    return {"images_per_s": batch_size / median, "seconds_median": median, "seconds_min": min(t["timed"]),
            "seconds_max": max(t["timed"]), "seconds": t["timed"], "warmup_seconds": t["warm"],
            "cpu_seconds_median": statistics.median(t["cpu"]), "cpu_seconds": t["cpu"]}


def _run_phase(phase: str, preset_name: str, overrides: dict[str, Any], batch_size: int, device: str,
               precision: str, memory: str, fast: bool, warmup: int, repeats: int, seed: int,
               compare: bool = False, compile_mode: str = "regional",
               fast_precision: str | None = None, count: bool = True) -> dict[str, Any]:
    """Build, initialise and time one phase in this process."""
    dev = torch.device(device)
    fns, n_params = _phase_fns(phase, preset_name, overrides, batch_size, dev, precision, memory, fast, compare,
                               compile_mode, seed, fast_precision)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    baseline = peak_rss_mb()
    times = _time(fns, dev, max(warmup, 1 if "fast" in fns else 0), repeats)
    per_mode = {mode: _stats(batch_size, t) for mode, t in times.items()}
    if count:
        for mode, fn in fns.items():
            try:
                per_mode[mode]["kernels"] = count_ops(fn, warmup=0)
            except RuntimeError as e:  # a profiler that cannot run here must not cost the timings
                per_mode[mode]["kernels_error"] = f"{type(e).__name__}: {e}"
    result = dict(per_mode["fast" if "fast" in per_mode else "eager"])
    graphed = getattr(fns.get("fast"), "graphed", None)
    result["graphed"] = graphed is not None and graphed.captured
    if graphed is not None:
        result["capture_seconds"] = graphed.capture_seconds  # warm-up calls and capture, compile included
        if graphed.failure:
            result["capture_failure"] = graphed.failure
    if "fast" in per_mode:
        # the first call compiles; the later warm-up calls are already fast
        result["compile_seconds"] = per_mode["fast"]["warmup_seconds"][0] - per_mode["fast"]["seconds_median"]
    if compare:
        result["eager"], result["fast"] = per_mode["eager"], per_mode["fast"]
        result["speedup"] = per_mode["eager"]["seconds_median"] / per_mode["fast"]["seconds_median"]
        result["speedup_per_round"] = [e / f for e, f in zip(times["eager"]["timed"], times["fast"]["timed"])]
    result.update(peak_rss_mb=peak_rss_mb(), baseline_rss_mb=baseline, n_params=n_params)
    if dev.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


def _run_phase_subprocess(kwargs: dict[str, Any], threads: int) -> dict[str, Any]:
    """:func:`_run_phase` in a fresh interpreter (so its peak RSS is its own)."""
    env = {**os.environ, "TORCHGLOW_BENCH_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "torchglow.train.bench", "_phase", json.dumps(kwargs)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark phase {kwargs['phase']!r} failed in its subprocess:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the benchmark
def run_benchmark(preset: str, batch_size: int, device: str, precision: str = "fp32",
                  overrides: dict[str, Any] | None = None, memory: str = "none", fast: bool = False,
                  warmup: int = 3, repeats: int = 10, phases: Sequence[str] = PHASES,
                  threads: int | None = None, isolate: bool | None = None, seed: int = 0,
                  compare: bool = False, compile_mode: str = "regional",
                  fast_precision: str | None = None, count: bool = True) -> dict[str, Any]:
    """Benchmark a preset (with ``overrides``, e.g. ``{"n_steps": 8, "hidden_channels": 128}``).

    Args:
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
        phases: which of "train", "sample", "eval" to run.
        threads: ``torch.set_num_threads`` (default: leave torch's default).
        isolate: run each phase in a fresh subprocess so that CPU peak RSS is per phase;
            None means True on CPU and False on CUDA.
        seed: seeds the model and the images.
        compare: time the eager and the fast path side by side, interleaved (``speedup``).
        compile_mode: "regional" or "whole" (:func:`torchglow.step.compile_step`).
        fast_precision: the precision of the fast training step (default ``precision``), e.g. an
            eager fp32 step against a fast bf16 one.
        count: after the timing, profile one more call of each timed callable and report its
            kernel-launching ops (and on CUDA its kernels and graph launches): ``<phase>["kernels"]``,
            or per mode with ``compare`` (:func:`count_ops`; on the CPU meaningful for eager callables).

    Returns:
        A JSON-serialisable dict: environment (device name, torch version, git commit, threads,
        load average before/after), the config, and per phase ``<phase>_images_per_s`` plus a
        ``<phase>`` dict of timings and memory; ``peak_memory_mb`` maps each phase to its peak
        memory in MiB (CUDA max allocated, or the CPU peak RSS described in the module docstring),
        ``peak_memory_kind`` says which.
    """
    from ..config import preset as make_preset
    from ..memory import check_memory_mode

    overrides = dict(overrides or {})
    config = make_preset(preset, **overrides)  # validate before spending any time
    check_memory_mode(memory, config.dropout)
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    for p in (precision, fast_precision or precision):
        if p not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {p!r}")
    if batch_size < 1 or warmup < 0 or repeats < 1:
        raise ValueError("batch_size and repeats must be >= 1 and warmup >= 0")
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise ValueError(f"phases must be a non-empty subset of {PHASES}, got {list(phases)}")
    dev = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    isolate = dev.type == "cpu" if isolate is None else isolate

    result: dict[str, Any] = {
        "preset": preset,
        "overrides": overrides,
        "config": config.to_dict(),
        "batch_size": batch_size,
        "device": str(dev),
        "device_name": device_name(dev),
        "precision": precision,
        "fast_precision": fast_precision or precision,
        "memory": memory,
        "fast": fast or compare,
        "compare": compare,
        "compile_mode": compile_mode,
        "warmup": warmup,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "isolated_phases": isolate,
        "load_average_before": load_average(),
    }
    if dev.type == "cuda":
        result["peak_memory_kind"] = "cuda_max_memory_allocated"
    elif isolate:
        result["peak_memory_kind"] = "peak_rss_of_a_fresh_process_per_phase"
    else:
        result["peak_memory_kind"] = "process_peak_rss_so_far"
    peaks: dict[str, float] = {}
    for phase in PHASES:
        if phase not in phases:
            continue
        kwargs = dict(phase=phase, preset_name=preset, overrides=overrides, batch_size=batch_size,
                      device=str(dev), precision=precision, memory=memory, fast=fast, warmup=warmup,
                      repeats=repeats, seed=seed, compare=compare, compile_mode=compile_mode,
                      fast_precision=fast_precision, count=count)
        r = _run_phase_subprocess(kwargs, torch.get_num_threads()) if isolate else _run_phase(**kwargs)
        result[phase] = r
        result[f"{phase}_images_per_s"] = r["images_per_s"]
        peaks[phase] = r["peak_cuda_mb"] if dev.type == "cuda" else r["peak_rss_mb"]
    result["peak_memory_mb"] = peaks
    result["load_average_after"] = load_average()
    return result


# --------------------------------------------------------------------------- command line
def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``torchglow bench`` / ``python -m torchglow.bench``."""
    from ..config import PRESETS
    from ..memory import MEMORY_MODES

    parser.add_argument("--preset", choices=sorted(PRESETS), default="cifar10", help="model architecture")
    parser.add_argument("--batch-size", type=int, default=16, help="images per iteration")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32, or bf16/fp16 autocast of the coupling networks")
    parser.add_argument("--n-steps", type=int, help="override K, steps per level")
    parser.add_argument("--n-levels", type=int, help="override L, levels")
    parser.add_argument("--hidden-channels", type=int, help="override the coupling width")
    parser.add_argument("--set", dest="overrides", type=_parse_override, action="append", default=None,
                        metavar="KEY=VALUE", help="override any model config field (JSON value), repeatable")
    parser.add_argument("--memory", choices=MEMORY_MODES, default="none",
                        help="none, checkpoint (per-step gradient checkpointing) or invertible (recompute through "
                             "each step's inverse)")
    parser.add_argument("--fast", action="store_true",
                        help="time the fast path (compiled step; CUDA graphs and channels_last on CUDA)")
    parser.add_argument("--compare", action="store_true",
                        help="time the eager and the fast path side by side in interleaved rounds; print the ratio")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="regional",
                        help="how --fast compiles the training step")
    parser.add_argument("--fast-precision", choices=PRECISIONS,
                        help="precision of the fast training step (default: --precision), e.g. bf16 against eager fp32")
    parser.add_argument("--no-count", dest="count", action="store_false",
                        help="skip the profiled call that counts kernel-launching ops per phase")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation, caches)")
    parser.add_argument("--repeats", type=int, default=10, help="timed iterations; the median is reported")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="what to time")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's, one per core)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false", default=None,
                        help="run the phases in this process (CPU peak RSS is then the process peak)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the images")
    parser.add_argument("--name", help="result name (default: derived from the options)")
    parser.add_argument("--out", "--out-dir", dest="out_dir", metavar="DIR",
                        help="also write the full result to DIR/<name>.json (default: print only)")


def _default_name(args: argparse.Namespace, overrides: dict[str, Any], device: str) -> str:
    parts = [args.preset]
    abbrev = {"n_steps": "K", "n_levels": "L", "hidden_channels": "w"}
    for k in abbrev:
        if k in overrides:
            parts.append(f"{abbrev[k]}{overrides[k]}")
    for k, v in sorted(overrides.items()):
        if k not in abbrev:
            parts.append(f"{k}{json.dumps(v).replace(' ', '')}")
    parts += [f"b{args.batch_size}", device.replace(":", ""), args.precision]
    if args.memory != "none":
        parts.append(args.memory)
    if args.compare or args.fast:
        parts.append("compare" if args.compare else "fast")
        parts.append(args.compile_mode + (f"-{args.fast_precision}" if args.fast_precision else ""))
    if args.threads:
        parts.append(f"t{args.threads}")
    return "-".join(str(p) for p in parts)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run :func:`run_benchmark` from parsed :func:`add_arguments` options, print a summary and,
    with ``--out DIR``, write the full result to ``DIR/<name>.json``."""
    overrides = dict(args.overrides or [])
    for key in ("n_steps", "n_levels", "hidden_channels"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    device = str(resolve_device(args.device))
    name = args.name or _default_name(args, overrides, device)
    result = run_benchmark(args.preset, args.batch_size, device, args.precision, overrides, args.memory,
                           args.fast, args.warmup, args.repeats, tuple(args.phases), args.threads,
                           args.isolate, args.seed, args.compare, args.compile_mode, args.fast_precision,
                           args.count)
    result = {"name": name, **result}
    summary = {k: round(v, 2) for k, v in result.items() if k.endswith("_images_per_s")}
    for phase in PHASES:
        r = result.get(phase, {})
        if "speedup" in r:
            summary[f"{phase}_images_per_s"] = {"eager": round(r["eager"]["images_per_s"], 2),
                                                "fast": round(r["fast"]["images_per_s"], 2)}
            summary[f"{phase}_speedup"] = round(r["speedup"], 3)
        if "compile_seconds" in r:
            summary[f"{phase}_compile_seconds"] = round(r["compile_seconds"], 1)
        modes = {m: r[m] for m in ("eager", "fast") if isinstance(r.get(m), dict)} or {
            "fast" if args.fast else "eager": r}
        for mode, timings in modes.items():
            if "kernels" in timings:
                summary[f"{phase}_{mode}_kernels"] = {k: v for k, v in timings["kernels"].items() if k != "ops_by_name"}
    summary["peak_memory_mb"] = {k: round(v, 1) for k, v in result["peak_memory_mb"].items()}
    if args.out_dir:
        out = Path(args.out_dir) / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        summary["written"] = str(out)
    print(json.dumps({"name": name, "device_name": result["device_name"], "threads": result["threads"],
                      "load_average": [result["load_average_before"], result["load_average_after"]],
                      **summary}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m torchglow.bench [options]``; see :func:`add_arguments`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_phase"]:  # internal: one phase in a fresh process (see run_benchmark)
        threads = os.environ.get("TORCHGLOW_BENCH_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        print(json.dumps(_run_phase(**json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="torchglow bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
