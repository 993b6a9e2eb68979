"""Speed and memory benchmark: training, sampling and evaluation throughput and peak memory.

``torchglow bench``: the options of :class:`torchglow.bench.BenchConfig`, :func:`torchglow.bench.benchmark`
of them, a printed summary and, with ``--out DIR``, the full result in ``DIR/<name>.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..bench import PHASES, BenchConfig, benchmark
from ..config import COMPILE_MODES, MEMORY_MODES, PRECISIONS, PRESETS
from ..devices import resolve_device

# the model config fields that have their own option, and their letters in a result's name
_SHORT_OVERRIDES = {"n_steps": "K", "n_levels": "L", "hidden_channels": "w"}


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``torchglow bench``."""
    _add_model_arguments(parser)
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


def _bench_config(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed :func:`add_arguments` options (the device resolved)."""
    overrides = dict(args.overrides or [])
    for key in _SHORT_OVERRIDES:
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return BenchConfig(preset=args.preset, batch_size=args.batch_size, device=str(resolve_device(args.device)),
                       precision=args.precision, overrides=overrides, memory=args.memory, fast=args.fast,
                       warmup=args.warmup, repeats=args.repeats, phases=tuple(args.phases), threads=args.threads,
                       isolate=args.isolate, seed=args.seed, compare=args.compare, compile_mode=args.compile_mode,
                       fast_precision=args.fast_precision, count=args.count)


def _default_name(config: BenchConfig) -> str:
    """A result's name from its config: ``cifar10-K8-w128-b16-cpu-fp32-compare-regional-t1``."""
    overrides = config.overrides
    parts = [config.preset]
    parts += [f"{letter}{overrides[k]}" for k, letter in _SHORT_OVERRIDES.items() if k in overrides]
    parts += [f"{k}{json.dumps(v).replace(' ', '')}" for k, v in sorted(overrides.items()) if k not in _SHORT_OVERRIDES]
    parts += [f"b{config.batch_size}", config.device.replace(":", ""), config.precision]
    if config.memory != "none":
        parts.append(config.memory)
    if config.compare or config.fast:
        parts.append("compare" if config.compare else "fast")
        parts.append(config.compile_mode + (f"-{config.fast_precision}" if config.fast_precision else ""))
    if config.threads:
        parts.append(f"t{config.threads}")
    return "-".join(str(p) for p in parts)


def _summary(result: dict[str, Any], fast: bool) -> dict[str, Any]:
    """The printed part of a result: rates, speedups, compile seconds, kernel counts, peak memory."""
    brief = {k: round(v, 2) for k, v in result.items() if k.endswith("_images_per_s")}
    for phase in PHASES:
        r = result.get(phase, {})
        if "speedup" in r:
            brief[f"{phase}_images_per_s"] = {"eager": round(r["eager"]["images_per_s"], 2),
                                              "fast": round(r["fast"]["images_per_s"], 2)}
            brief[f"{phase}_speedup"] = round(r["speedup"], 3)
        if "compile_seconds" in r:
            brief[f"{phase}_compile_seconds"] = round(r["compile_seconds"], 1)
        modes = {m: r[m] for m in ("eager", "fast") if isinstance(r.get(m), dict)} or {"fast" if fast else "eager": r}
        for mode, timings in modes.items():
            if "kernels" in timings:
                brief[f"{phase}_{mode}_kernels"] = {k: v for k, v in timings["kernels"].items() if k != "ops_by_name"}
    brief["peak_memory_mb"] = {k: round(v, 1) for k, v in result["peak_memory_mb"].items()}
    return brief


def cmd_bench(args: argparse.Namespace) -> int:
    """Run :func:`torchglow.bench.benchmark` from parsed :func:`add_arguments` options, print a
    summary and, with ``--out DIR``, write the full result to ``DIR/<name>.json``."""
    config = _bench_config(args)
    name = args.name or _default_name(config)
    result = {"name": name, **benchmark(config)}
    brief = _summary(result, config.fast)
    if args.out_dir:
        out = Path(args.out_dir) / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        brief["written"] = str(out)
    print(json.dumps({"name": name, "device_name": result["device_name"], "threads": result["threads"],
                      "load_average": [result["load_average_before"], result["load_average_after"]],
                      **brief}, indent=2))
    return 0
