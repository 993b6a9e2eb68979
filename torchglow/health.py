"""Numerical health of a Glow: how close it is to not being invertible in floating point.

Two quantities warn before sampling or the invertible backward goes wrong:

* :func:`invconv_condition_numbers`: the condition number of every 1x1 convolution ``W``
  (float64 ``torch.linalg.cond``). The inverse multiplies relative errors by up to ``cond(W)``;
  a random rotation starts at 1.
* :func:`min_coupling_scale`: the smallest affine coupling scale ``sigmoid(h + 2)`` on a batch.
  The inverse divides by it, so a scale of 1e-3 in each of K couplings can amplify a latent (or a
  rounding error) by up to 1e3**K; in float32 that overflows to inf, and then NaN, long before the
  forward pass shows a problem.

The trainer logs both once per epoch (``invconv_cond_max``, ``coupling_scale_min`` in
``metrics.jsonl``), computed on a small fixed batch outside the training step.

Sampling: :meth:`torchglow.Glow.sample` and :meth:`~torchglow.Glow.decode` return whatever the
arithmetic gives, inf and NaN included (high temperatures and collapsed scales overflow).
:func:`torchglow.preprocess.to_uint8` maps NaN and -inf to 0 and +inf to the top level, so images
never fail to save but such pixels are meaningless; :func:`sample_stats` counts them,
:func:`check_samples` warns (:class:`NumericalHealthWarning`, once per context). ``Glow.sample``,
the sample grids and the trainer's samples all go through that check; :func:`sample_checked` also
returns the statistics.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .layers import Coupling, InvConv1x1

# Thresholds above/below which the trainer prints a warning with the per-epoch numbers.
COND_WARN = 1e4
SCALE_WARN = 1e-4
# Samples and decoded frames warn when more than this share of their values lies outside the image
# range [-0.5, 0.5) and is clipped: most of the picture is then saturated black/white.
CLIP_WARN = 0.5


class NumericalHealthWarning(RuntimeWarning):
    """Samples or a model's numbers are no longer trustworthy (non-finite, or close to it)."""


def invconv_condition_numbers(model: torch.nn.Module) -> list[float]:
    """``cond(W)`` (2-norm, float64) of every :class:`~torchglow.layers.InvConv1x1`, in flow order;
    ``inf`` for a singular or non-finite ``W``. Empty for models without 1x1 convolutions."""
    out = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, InvConv1x1):
                w = m.weight_matrix().detach().double().cpu()
                if not torch.isfinite(w).all():
                    out.append(math.inf)
                    continue
                try:
                    out.append(float(torch.linalg.cond(w)))
                except RuntimeError:  # the SVD did not converge
                    out.append(math.inf)
    return out


@torch.no_grad()
def coupling_scales(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> list[float]:
    """The smallest affine scale ``sigmoid(h + 2)`` of every affine coupling (flow order) when
    ``model.encode(x, y)`` runs; computed in float64 from the network outputs (forward hooks), so a
    scale below float32's range is reported rather than rounded to 0. Empty for additive models."""
    couplings = [m for m in model.modules() if isinstance(m, Coupling) and m.affine]
    if not couplings:
        return []
    h_min: dict[int, float] = {}

    def hook(index):
        def record(module, inputs, output):
            h = output[:, 1::2].detach()
            h_min[index] = float(h.min()) if h.numel() and torch.isfinite(h).all() else -math.inf

        return record

    handles = [c.nn.register_forward_hook(hook(i)) for i, c in enumerate(couplings)]
    mode = getattr(model, "memory_mode", "none")
    try:
        model.memory_mode = "none"  # the plain forward: the hooks see every coupling once
        model.encode(x, y)
    finally:
        model.memory_mode = mode
        for handle in handles:
            handle.remove()
    return [_sigmoid(h_min[i] + 2.0) if i in h_min else math.nan for i in range(len(couplings))]


def min_coupling_scale(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> float | None:
    """The smallest affine coupling scale on the batch ``x`` (model space); None for additive models."""
    scales = coupling_scales(model, x, y)
    return min(scales) if scales else None


def health_record(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, Any]:
    """``{"invconv_cond_max", "coupling_scale_min"}`` on the batch ``x``: None where the model has
    no such layer; ``inf``/0.0 where the numbers have broken down (see :func:`json_safe`)."""
    conds = invconv_condition_numbers(model)
    return {"invconv_cond_max": max(conds) if conds else None, "coupling_scale_min": min_coupling_scale(model, x, y)}


def health_warnings(record: dict[str, Any]) -> list[str]:
    """Human-readable warnings for a :func:`health_record` (empty when all is well)."""
    out = []
    cond, scale = record.get("invconv_cond_max"), record.get("coupling_scale_min")
    if cond is not None and not cond <= COND_WARN:
        out.append(f"a 1x1 convolution has condition number {cond:.3g} (> {COND_WARN:g}): its inverse loses precision")
    if scale is not None and not scale >= SCALE_WARN:
        out.append(f"an affine coupling scale is down to {scale:.3g} (< {SCALE_WARN:g}): sampling and the inverse "
                   f"may overflow; consider a lower `lr` or `grad_clip`")
    return out


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """The record with non-finite floats replaced by None (JSON has no inf or NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def sample_stats(x: torch.Tensor) -> dict[str, Any]:
    """Counts of a model-space batch: ``nonfinite`` values, the ``clipped_fraction`` of finite
    values outside [-0.5, 0.5) that ``to_uint8`` clamps, and the largest finite ``max_abs``."""
    finite = torch.isfinite(x)
    values = x[finite]
    clipped = (values < -0.5) | (values >= 0.5)
    return {
        "nonfinite": int((~finite).sum()),
        "clipped_fraction": float(clipped.float().sum() / max(x.numel(), 1)),
        "max_abs": float(values.abs().max()) if values.numel() else None,
    }


_warned: set[str] = set()


def check_samples(x: torch.Tensor, context: str = "samples", warn_clipped: bool = False) -> dict[str, Any]:
    """:func:`sample_stats` of ``x``; warns once per ``context`` (a :class:`NumericalHealthWarning`)
    when some values are inf or NaN, which ``to_uint8`` would silently turn into black or white, and,
    with ``warn_clipped`` (the sample grids a person asked for), when more than :data:`CLIP_WARN` of
    the values are clipped (a temperature too high)."""
    stats = sample_stats(x)
    if stats["nonfinite"] and context not in _warned:
        _warned.add(context)
        warnings.warn(
            f"{context}: {stats['nonfinite']} of {x.numel()} values are inf/NaN (the inverse overflowed: lower the "
            f"temperature, or the model's coupling scales have collapsed); they show as black/white pixels",
            NumericalHealthWarning, stacklevel=2,
        )
    elif warn_clipped and stats["clipped_fraction"] > CLIP_WARN and context + " clipped" not in _warned:
        _warned.add(context + " clipped")
        warnings.warn(
            f"{context}: {stats['clipped_fraction']:.0%} of the values lie outside the image range and are clipped "
            f"to black/white (lower the temperature)", NumericalHealthWarning, stacklevel=2,
        )
    return stats


def frame_stats(x: torch.Tensor) -> dict[str, Any]:
    """Per-image counts of a model-space batch (N, C, H, W) of decoded frames: ``frames`` (N),
    ``nonfinite_frames`` (images with an inf or NaN value) and ``clipped_frames`` (finite images
    with more than :data:`CLIP_WARN` of their values outside [-0.5, 0.5))."""
    flat = x.reshape(x.shape[0], -1)
    finite = torch.isfinite(flat)
    broken = ~finite.all(1)
    clipped = ((flat < -0.5) | (flat >= 0.5)) & finite
    mostly_clipped = (clipped.float().mean(1) > CLIP_WARN) & ~broken
    return {"frames": int(x.shape[0]), "nonfinite_frames": int(broken.sum()),
            "clipped_frames": int(mostly_clipped.sum())}


def check_frames(x: torch.Tensor, context: str) -> dict[str, Any]:
    """:func:`frame_stats` of ``x``; a :class:`NumericalHealthWarning` naming ``context`` when some
    frames are non-finite or mostly clipped (every call: each names other frames)."""
    stats = frame_stats(x)
    warn_frames(stats, context)
    return stats


def warn_frames(stats: dict[str, Any], context: str) -> None:
    """The warning of :func:`check_frames` for counts already made (e.g. summed over a grid)."""
    parts = [f"{stats['nonfinite_frames']} of {stats['frames']} frames are non-finite (the inverse overflowed; "
             f"saved as black/white)" if stats["nonfinite_frames"] else "",
             f"{stats['clipped_frames']} of {stats['frames']} frames are mostly clipped to black/white"
             if stats["clipped_frames"] else ""]
    parts = [p for p in parts if p]
    if parts:
        warnings.warn(f"{context}: {'; '.join(parts)}: the latents left the region the model was trained on "
                      f"(smaller edits, or a longer-trained model)", NumericalHealthWarning, stacklevel=3)


def sample_checked(model: torch.nn.Module, n: int, temperature: float = 1.0, y: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """``model.sample(...)`` (which warns once if non-finite) and its :func:`sample_stats`."""
    x = model.sample(n, temperature, y, generator)
    return x, sample_stats(x)


def _sigmoid(v: float) -> float:
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    if v < -745:  # exp(v) underflows float64
        return 0.0
    e = math.exp(v)
    return e / (1.0 + e)
