"""The machine and the checkout a benchmark ran on: device and CPU names, git commit, load
average, peak memory, and :func:`environment`, the header of every result."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import BenchConfig


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


def peak_memory_kind(device: torch.device, isolate: bool) -> str:
    """What ``peak_memory_mb`` measures on ``device`` (see :mod:`torchglow.bench`)."""
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    return "peak_rss_of_a_fresh_process_per_phase" if isolate else "process_peak_rss_so_far"


def environment(config: BenchConfig, device: torch.device, isolate: bool) -> dict[str, Any]:
    """The head of a result: the config, the machine, the checkout and the load before the phases."""
    return {
        "preset": config.preset,
        "overrides": config.overrides,
        "config": config.model_config().to_dict(),
        "batch_size": config.batch_size,
        "device": str(device),
        "device_name": device_name(device),
        "precision": config.precision,
        "fast_precision": config.fast_precision or config.precision,
        "memory": config.memory,
        "fast": config.fast or config.compare,
        "compare": config.compare,
        "compile_mode": config.compile_mode,
        "warmup": config.warmup,
        "repeats": config.repeats,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "isolated_phases": isolate,
        "load_average_before": load_average(),
        "peak_memory_kind": peak_memory_kind(device, isolate),
    }
