"""The whole benchmark: :func:`benchmark` measures each phase of a :class:`BenchConfig`, in this
process or each in a fresh one (``python -m torchglow.bench``), and gathers the result."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import torch

from ..config import ConfigError
from ..devices import resolve_device
from .config import PHASES, BenchConfig
from .phases import measure_phase
from .report import environment, load_average

# the exit status of an isolated phase whose config the model refused (its stdout: the message)
EXIT_CONFIG_ERROR = 3


def measure_isolated(config: BenchConfig, phase: str) -> dict[str, Any]:
    """:func:`measure_phase` in a fresh interpreter (so its peak RSS is its own), with this process's
    threads. A :class:`ConfigError` there is raised here."""
    request = {"phase": phase, "config": config.replace(threads=torch.get_num_threads()).to_dict()}
    proc = subprocess.run([sys.executable, "-m", "torchglow.bench", json.dumps(request)],
                          capture_output=True, text=True)
    if proc.returncode == EXIT_CONFIG_ERROR:
        raise ConfigError(json.loads(proc.stdout.strip().splitlines()[-1])["config_error"])
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark phase {phase!r} failed in its subprocess:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(config: BenchConfig) -> dict[str, Any]:
    """Benchmark ``config``: each of its phases in :data:`PHASES` order (see :mod:`torchglow.bench`).

    Returns:
        A JSON-serialisable dict: environment (device name, torch version, git commit, threads,
        load average before/after), the config, and per phase ``<phase>_images_per_s`` plus a
        ``<phase>`` dict of timings and memory; ``peak_memory_mb`` maps each phase to its peak
        memory in MiB (CUDA max allocated, or the CPU peak RSS described in :mod:`torchglow.bench`),
        ``peak_memory_kind`` says which.
    """
    dev = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    isolate = dev.type == "cpu" if config.isolate is None else config.isolate
    config = config.replace(device=str(dev), isolate=isolate)
    result = environment(config, dev, isolate)
    peaks: dict[str, float] = {}
    for phase in PHASES:
        if phase not in config.phases:
            continue
        r = measure_isolated(config, phase) if isolate else measure_phase(config, phase)
        result[phase] = r
        result[f"{phase}_images_per_s"] = r["images_per_s"]
        peaks[phase] = r["peak_cuda_mb"] if dev.type == "cuda" else r["peak_rss_mb"]
    result["peak_memory_mb"] = peaks
    result["load_average_after"] = load_average()
    return result
