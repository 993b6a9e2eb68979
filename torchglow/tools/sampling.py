"""Sample grids: the paper's temperature sweep (Kingma & Dhariwal 2018, §5, Fig. 8), shared by the
trainer's per-epoch grids and ``torchglow sample``.

At every level ``z = mean + std · T · ε``, ``ε ~ N(0, I)``: the model decodes standardised latents
``T · ε``. One seeded ε draw (a CPU ``torch.Generator``, then moved to the model's device) is shared
by all temperatures, so a column shows one latent at every temperature and the same seed gives
the same images. T = 0 decodes the prior means.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..files import write_json_atomic
from ..health import check_samples
from ..model import Glow
from .fast import fast_decode
from .images import save_grid, to_display

DEFAULT_TEMPERATURES = (0.0, 0.5, 0.7, 0.8, 0.9, 1.0)


def check_labels(model: Glow, y, n: int, device: torch.device) -> torch.Tensor | None:
    """The class labels to condition ``n`` images on: None for an unconditional model (which must
    get none); for a class-conditional one, one label per image (a single label is repeated),
    each in ``0..num_classes - 1``, as int64 on ``device``. Raises ValueError otherwise."""
    if not model.config.num_classes:
        if y is not None:
            raise ValueError("this model is not class-conditional: do not pass y")
        return None
    if y is None:
        raise ValueError("this model is class-conditional: pass y, one label per image")
    y = torch.as_tensor(y, dtype=torch.long).reshape(-1)
    if y.numel() == 1 and n > 1:
        y = y.expand(n)
    if y.numel() != n:
        raise ValueError(f"expected {n} labels, got {y.numel()}")
    if (y < 0).any() or (y >= model.config.num_classes).any():
        raise ValueError(f"labels must be in 0..{model.config.num_classes - 1}")
    return y.to(device)


def seeded_eps(model: Glow, n: int, seed: int) -> list[torch.Tensor]:
    """ε ~ N(0, I) for every level, (n, *shape), float32 on the CPU, from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *s), generator=gen) for s in model.latent_shapes]


def _fmt(t: float) -> str:
    return f"{float(t):g}"


@torch.no_grad()
def temperature_rows(model: Glow, temperatures: Sequence[float] = DEFAULT_TEMPERATURES, n_per_row: int = 8,
                     seed: int = 0, y=None, fast: bool = False) -> list[torch.Tensor]:
    """One row of ``n_per_row`` samples per temperature, in model space (float32, CPU), from one
    seeded ε draw shared by all rows. For a class-conditional model, ``y`` gives the class of each
    column (one label, or ``n_per_row``); by default column j is class ``j % num_classes``.
    ``fast``: decode through :func:`torchglow.tools.fast.fast_decode` (a CUDA graph on CUDA, the same
    kernels as the eager decode). :func:`torchglow.tools.images.to_display` turns the rows into
    images for :func:`save_grid`."""
    return _rows(model, _decoder(model, fast), temperatures, n_per_row, seed, y)


def _decoder(model: Glow, fast: bool) -> Callable[..., torch.Tensor]:
    """The decode the rows go through: compiled (``fast``) or the model's own."""
    return fast_decode(model) if fast else model.decode


def _rows(model: Glow, decode: Callable[..., torch.Tensor], temperatures: Sequence[float], n_per_row: int,
          seed: int, y) -> list[torch.Tensor]:
    """:func:`temperature_rows` through ``decode``, so that a grid of many calls compiles it once."""
    if n_per_row < 1:
        raise ValueError(f"n_per_row must be >= 1, got {n_per_row}")
    device, dtype = model.device, model.dtype
    if model.config.num_classes and y is None:
        y = torch.arange(n_per_row) % model.config.num_classes
    y = check_labels(model, y, n_per_row, device)
    eps = seeded_eps(model, n_per_row, seed)
    return [decode([(e * float(t)).to(device=device, dtype=dtype) for e in eps], y, standardized=True)
            .float().cpu() for t in temperatures]


def default_name(temperatures: Sequence[float], n_per_row: int, seed: int) -> str:
    """``samples_T0-0.5-1_n8_seed0``: the options that decide the images, so that another call with
    other options writes other files and the same call rewrites the same images."""
    return f"samples_T{'-'.join(_fmt(t) for t in temperatures)}_n{n_per_row}_seed{seed}"


@torch.no_grad()
def sample_grid(model: Glow, out_dir: str | Path, temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
                n_per_row: int = 8, seed: int = 0, classes: Sequence[int] | None = None,
                max_level: int | None = None, name: str | None = None, fast: bool = False) -> dict[str, Any]:
    """The temperature sweep as PNG grids in ``out_dir``, named ``name`` (default
    :func:`default_name` of the options).

    * Unconditional model: ``{name}.png``, one row per temperature.
    * Class-conditional model: one grid per temperature, ``{name}_T{T}.png``, one row per class
      (``classes``, default all), the same ε in every row so that columns differ only by class.

    Pixels are shown with bin ``max_level`` as white (default the top bin ``2**n_bits - 1``; see
    :func:`torchglow.tools.images.display_uint8`). Writes ``{name}.json`` and returns that summary: the
    files, the options and per-temperature :func:`torchglow.health.sample_stats` (non-finite values,
    the fraction clipped into [-0.5, 0.5)); non-finite samples, and a temperature whose samples
    mostly clip, also raise a :class:`~torchglow.health.NumericalHealthWarning`. ``fast``: as in
    :func:`temperature_rows`, one compiled decode for the whole grid.
    """
    temperatures = [float(t) for t in temperatures]
    if not temperatures:
        raise ValueError("give at least one temperature")
    if any(t < 0 or not math.isfinite(t) for t in temperatures):
        raise ValueError(f"temperatures must be finite and >= 0, got {temperatures}")
    conditional = bool(model.config.num_classes)
    if classes is not None and not conditional:
        raise ValueError("classes are only for class-conditional models")
    if conditional:
        classes = list(range(model.config.num_classes)) if classes is None else [int(c) for c in classes]
        check_labels(model, classes, len(classes), torch.device("cpu"))
    name = name or default_name(temperatures, n_per_row, seed)
    n_bits = model.config.n_bits
    out_dir = Path(out_dir)
    decode = _decoder(model, fast)
    files: list[str] = []
    per_t: dict[str, dict[str, Any]] = {}
    if not conditional:
        xs = _rows(model, decode, temperatures, n_per_row, seed, None)
        for t, x in zip(temperatures, xs):
            per_t[_fmt(t)] = check_samples(x, context=f"samples at T={_fmt(t)}", warn_clipped=True)
        rows = [to_display(x, n_bits, max_level) for x in xs]
        labels = [f"T={_fmt(t)}" for t in temperatures]
        files.append(str(save_grid(rows, out_dir / f"{name}.png", row_labels=labels)))
    else:
        for t in temperatures:
            xs = [_rows(model, decode, [t], n_per_row, seed, c)[0] for c in classes]
            per_t[_fmt(t)] = check_samples(torch.cat(xs), context=f"samples at T={_fmt(t)}", warn_clipped=True)
            rows = [to_display(x, n_bits, max_level) for x in xs]
            files.append(str(save_grid(rows, out_dir / f"{name}_T{_fmt(t)}.png",
                                       row_labels=[f"class {c}" for c in classes])))
    summary = {
        "tool": "sample", "seed": seed, "temperatures": temperatures, "n_per_row": n_per_row,
        "classes": classes if conditional else None, "n_bits": n_bits,
        "max_level": max_level if max_level is not None else 2**n_bits - 1, "fast": fast,
        "per_temperature": per_t, "files": files,
    }
    write_json_atomic(out_dir / f"{name}.json", summary)
    return summary
