"""Speed and memory benchmark: training, sampling and evaluation throughput and peak memory.

:func:`benchmark` takes a :class:`BenchConfig`: it builds a preset (optionally reduced with
``overrides``), initialises ActNorm from a batch, and times, after ``warmup`` untimed iterations,
``repeats`` iterations of each phase; the reported rate is ``batch_size / median(iteration time)``:

``train``
    The training step of :func:`torchglow.train.train`, the same object
    (:class:`torchglow.train.step.TrainStep`): device noise, forward, loss, backward, gradient norm,
    masked Adamax update, EMA; with ``fast`` its compiled form (:func:`torchglow.train.step.compile_step`).
    With ``compare`` the eager and the fast step run side by side in one process, in interleaved
    rounds (eager, fast, eager, fast, ...) so that a machine busy with other work slows both alike;
    the result has both rates, their ratio and the compile time (the fast step's first call).
``sample``
    ``model.sample(batch_size)`` in eval mode (``fast``: the decode as a CUDA graph, :func:`torchglow.tools.fast.fast_sampler`).
``eval``
    ``model.bits_per_dim(x_uint8)`` in eval mode under ``torch.no_grad`` (``fast``: :func:`torchglow.tools.fast.fast_forward`).

On CUDA every timed iteration is bracketed by ``torch.cuda.synchronize()`` and peak memory is
``torch.cuda.max_memory_allocated`` (reset before each phase). On CPU peak memory is the peak
resident set size (``resource.getrusage(...).ru_maxrss``), which is a property of the whole
process; by default (``isolate=None`` → True on CPU) each phase therefore runs in a fresh Python
subprocess, so the figure is the peak of a process that imported torch, built the model and ran
that phase only. ``*_baseline_rss_mb`` is that process's peak RSS *before* the phase's first
iteration (import, model, optimiser, ActNorm init), so ``peak - baseline`` bounds what the phase
itself added. With ``isolate=False`` the phases share this process and the RSS figures are the
process peak so far (monotone across phases, and including whatever ran before).

The parts, for scripts that time their own variants (``benchmarks/``): :func:`build` (a model and
its batch), :func:`train_step`, :func:`phase_calls` and :func:`time_calls` (interleaved rounds),
:func:`measure_phase` (one phase, everything measured), :func:`count_ops` (kernels per call) and
the environment of :mod:`torchglow.bench.report`. The command line is ``torchglow bench``
(:mod:`torchglow.cli.bench`): it prints a summary and writes the full result as JSON when asked.
"""

from .config import PHASES, BenchConfig
from .harness import benchmark, measure_isolated
from .ops import count_ops
from .phases import Built, build, measure_phase, phase_calls, time_calls, train_step
from .report import cpu_name, device_name, environment, git_commit, git_dirty, load_average, peak_rss_mb

__all__ = ["PHASES", "BenchConfig", "Built", "benchmark", "build", "count_ops", "cpu_name", "device_name",
           "environment", "git_commit", "git_dirty", "load_average", "measure_isolated", "measure_phase",
           "peak_rss_mb", "phase_calls", "time_calls", "train_step"]
