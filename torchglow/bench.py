"""Speed and memory benchmark: training, sampling and evaluation throughput and peak memory.

:func:`run_benchmark` builds a preset (optionally reduced with ``overrides``), initialises ActNorm
from a batch, and times, after ``warmup`` untimed iterations, ``repeats`` iterations of each phase;
the reported rate is ``batch_size / median(iteration time)``:

``train``
    The training step of :func:`torchglow.train.train`: preprocess + dequantisation noise,
    ``model(x, y)``, bits/dim loss (plus the classification term of class-conditional models),
    ``zero_grad``, backward, ``clip_grad_norm_`` (foreach), the finiteness check (one host sync),
    an Adamax step and the EMA update (:class:`torchglow.train.EMA`).
``sample``
    ``model.sample(batch_size)`` in eval mode.
``eval``
    ``model.bits_per_dim(x_uint8)`` in eval mode under ``torch.no_grad``.

On CUDA every timed iteration is bracketed by ``torch.cuda.synchronize()`` and peak memory is
``torch.cuda.max_memory_allocated`` (reset before each phase). On CPU peak memory is the peak
resident set size (``resource.getrusage(...).ru_maxrss``), which is a property of the whole
process; by default (``isolate=None`` → True on CPU) each phase therefore runs in a fresh Python
subprocess, so the figure is the peak of a process that imported torch, built the model and ran
that phase only. ``*_baseline_rss_mb`` is that process's peak RSS *before* the phase's first
iteration (import, model, optimiser, ActNorm init), so ``peak - baseline`` bounds what the phase
itself added. With ``isolate=False`` the phases share this process and the RSS figures are the
process peak so far (monotone across phases, and including whatever ran before).

The command line (``python -m torchglow.bench``, see :func:`main`) writes the result as JSON to
``benchmarks/results/<name>.json``.
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

from .devices import resolve_device

PHASES = ("train", "sample", "eval")
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_OUT_DIR = Path("benchmarks") / "results"


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


# --------------------------------------------------------------------------- the phases
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, repeats: int) -> tuple[list[float], list[float], list[float]]:
    """Wall seconds of ``warmup`` untimed and ``repeats`` timed calls of ``fn``, each synchronised,
    and the CPU seconds (user + system, all threads of this process) of the timed calls."""
    warm, timed, cpu = [], [], []
    for i in range(warmup + repeats):
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        _sync(device)
        t1, c1 = time.perf_counter(), time.process_time()
        if i < warmup:
            warm.append(t1 - t0)
        else:
            timed.append(t1 - t0)
            cpu.append(c1 - c0)
    return warm, timed, cpu


def _build(preset_name: str, overrides: dict[str, Any], batch_size: int, device: torch.device,
           precision: str, memory: str, seed: int):
    """The model on ``device``, ActNorm initialised from a dequantised batch, plus that batch."""
    from . import preprocess as pp
    from .config import preset
    from .model import Glow

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


def _train_step_fn(model, config, x_uint8, y, precision: str, compile: bool):
    """One training step exactly as :func:`torchglow.train.train` takes it (fixed lr, no clipping)."""
    from . import preprocess as pp
    from .train import EMA, apply_step, backward, objective

    device = x_uint8.device
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-4, betas=(0.9, 0.999), foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = EMA(model, 0.999)
    train_model = torch.compile(model) if compile else model
    params = list(model.parameters())
    model.train()

    def step() -> None:
        noise = torch.rand(x_uint8.shape, device=device)
        x = pp.preprocess(x_uint8, config.n_bits) + noise / pp.n_bins(config.n_bits)
        loss, _ = objective(train_model(x, y), y, config)
        _, finite = backward(loss, optimizer, scaler, params, 0.0, precision)
        apply_step(finite, model, optimizer, scaler, params, 0.0, ema)

    return step


def _run_phase(phase: str, preset_name: str, overrides: dict[str, Any], batch_size: int, device: str,
               precision: str, memory: str, compile: bool, warmup: int, repeats: int, seed: int) -> dict[str, Any]:
    """Build, initialise and time one phase in this process."""
    dev = torch.device(device)
    model, config, x_uint8, y = _build(preset_name, overrides, batch_size, dev, precision, memory, seed)
    if phase == "train":
        fn = _train_step_fn(model, config, x_uint8, y, precision, compile)
    elif phase == "sample":
        model.eval()
        gen_y = y

        def fn():
            model.sample(batch_size, y=gen_y)
    elif phase == "eval":
        model.eval()

        def fn():
            with torch.no_grad():
                model.bits_per_dim(x_uint8, y)
    else:
        raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    baseline = peak_rss_mb()
    warm, timed, cpu = _time(fn, dev, warmup, repeats)
    median = statistics.median(timed)
    result = {
        "images_per_s": batch_size / median,
        "seconds_median": median,
        "seconds_min": min(timed),
        "seconds_max": max(timed),
        "seconds": timed,
        "warmup_seconds": warm,
        "cpu_seconds_median": statistics.median(cpu),
        "cpu_seconds": cpu,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    if dev.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


def _run_phase_subprocess(kwargs: dict[str, Any], threads: int) -> dict[str, Any]:
    """:func:`_run_phase` in a fresh interpreter (so its peak RSS is its own)."""
    env = {**os.environ, "TORCHGLOW_BENCH_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "torchglow.bench", "_phase", json.dumps(kwargs)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark phase {kwargs['phase']!r} failed in its subprocess:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the benchmark
def run_benchmark(preset: str, batch_size: int, device: str, precision: str = "fp32",
                  overrides: dict[str, Any] | None = None, memory: str = "none", compile: bool = False,
                  warmup: int = 3, repeats: int = 10, phases: Sequence[str] = PHASES,
                  threads: int | None = None, isolate: bool | None = None, seed: int = 0) -> dict[str, Any]:
    """Benchmark a preset (with ``overrides``, e.g. ``{"n_steps": 8, "hidden_channels": 128}``).

    Args:
        preset: a name from :data:`torchglow.config.PRESETS`.
        batch_size: images per iteration, in every phase.
        device: "cpu", "cuda", "cuda:N" (or "auto").
        precision: "fp32", or "bf16"/"fp16" autocast of the coupling networks
            (``model.set_autocast``; channels_last on CUDA). fp16 adds a GradScaler as training does.
        overrides: model config fields replacing the preset's.
        memory: the backward memory mode (``model.set_memory``): "none", "checkpoint", "invertible".
        compile: ``torch.compile`` the training forward (as ``TrainConfig.compile``); the
            compilation happens in the warm-up iterations (``train_warmup_seconds``).
        warmup, repeats: untimed and timed iterations per phase.
        phases: which of "train", "sample", "eval" to run.
        threads: ``torch.set_num_threads`` (default: leave torch's default).
        isolate: run each phase in a fresh subprocess so that CPU peak RSS is per phase;
            None means True on CPU and False on CUDA.
        seed: seeds the model, the images and the noise.

    Returns:
        A JSON-serialisable dict: environment (device name, torch version, git commit, threads,
        load average before/after), the config, and per phase ``<phase>_images_per_s`` plus a
        ``<phase>`` dict of timings and memory; ``peak_memory_mb`` maps each phase to its peak
        memory in MiB (CUDA max allocated, or the CPU peak RSS described in the module docstring),
        ``peak_memory_kind`` says which.
    """
    from .config import preset as make_preset
    from .memory import check_memory_mode

    overrides = dict(overrides or {})
    config = make_preset(preset, **overrides)  # validate before spending any time
    check_memory_mode(memory, config.dropout)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
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
        "memory": memory,
        "compile": compile,
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
                      device=str(dev), precision=precision, memory=memory, compile=compile and phase == "train",
                      warmup=warmup, repeats=repeats, seed=seed)
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
    from .config import PRESETS
    from .memory import MEMORY_MODES

    parser.add_argument("--preset", choices=sorted(PRESETS), default="cifar10")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--n-steps", type=int, help="override K, steps per level")
    parser.add_argument("--n-levels", type=int, help="override L, levels")
    parser.add_argument("--hidden-channels", type=int, help="override the coupling width")
    parser.add_argument("--set", dest="overrides", type=_parse_override, action="append", default=[],
                        metavar="KEY=VALUE", help="override any model config field (JSON value), repeatable")
    parser.add_argument("--memory", choices=MEMORY_MODES, default="none")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false", default=None,
                        help="run the phases in this process (CPU peak RSS is then the process peak)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="result name (default: derived from the options)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help="where <name>.json is written")


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
    if args.compile:
        parts.append("compile")
    if args.threads:
        parts.append(f"t{args.threads}")
    return "-".join(str(p) for p in parts)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run :func:`run_benchmark` from parsed :func:`add_arguments` options, print the result and
    write it to ``<out_dir>/<name>.json``."""
    overrides = dict(args.overrides)
    for key in ("n_steps", "n_levels", "hidden_channels"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    device = str(resolve_device(args.device))
    name = args.name or _default_name(args, overrides, device)
    result = run_benchmark(args.preset, args.batch_size, device, args.precision, overrides, args.memory,
                           args.compile, args.warmup, args.repeats, tuple(args.phases), args.threads,
                           args.isolate, args.seed)
    result = {"name": name, **result}
    out = Path(args.out_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: round(v, 2) for k, v in result.items() if k.endswith("_images_per_s")}
    summary["peak_memory_mb"] = {k: round(v, 1) for k, v in result["peak_memory_mb"].items()}
    print(json.dumps({"name": name, "device_name": result["device_name"], "threads": result["threads"],
                      "load_average": [result["load_average_before"], result["load_average_after"]],
                      **summary, "written": str(out)}, indent=2))
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
