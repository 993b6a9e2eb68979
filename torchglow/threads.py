"""How many CPU threads torch uses (the CLI's ``--threads`` option of every subcommand but ``bench``,
which sets and records its own).

torch's default is one intra-op thread per core, and its OpenMP threads spin while they wait for
each other. That is fastest on an idle machine, but when another process keeps the cores busy a
spinning thread burns the time slice its partner needs, and every parallel region waits for the
thread that is not scheduled: on 2 shared cores a short digits run went from 3.9 s with one thread
to 121 s with two (benchmarks/README.md, "A busy CPU"). ``auto`` therefore gives torch only the
cores that other processes leave idle, judged from the 1-minute load average, and never fewer than
one; an ``OMP_NUM_THREADS`` set in the environment (torchrun sets 1 per process) is left as it is.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's CPU set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_threads(cores: int | None = None, load: float | None = None) -> int:
    """``cores`` minus the load other processes put on them (rounded), between 1 and ``cores``."""
    cores = available_cores() if cores is None else cores
    load = os.getloadavg()[0] if load is None else load
    return max(1, min(cores, round(cores - load)))


def set_threads(threads: int | None) -> int:
    """``torch.set_num_threads(threads)``; for None (auto), torch's own choice when the environment
    sets ``OMP_NUM_THREADS`` (as torchrun does, 1 per process), else :func:`auto_threads`.
    Returns the number of threads torch now uses."""
    import torch

    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    torch.set_num_threads(auto_threads() if threads is None else threads)
    return torch.get_num_threads()
