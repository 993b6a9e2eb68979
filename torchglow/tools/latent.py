"""Latent-space tools: reconstructions, interpolations and attribute manipulation (Kingma &
Dhariwal 2018, §5; the official ``demo/``). Sample grids are in :mod:`torchglow.tools.sampling`, the
directions to manipulate along in :mod:`torchglow.tools.directions`.

Every tool is one function taking a model, uint8 images (B, C, H, W) and options; it writes a PNG
grid and a JSON summary into ``out_dir`` and returns the summary (JSON-serialisable). Nothing is
random: the same images give the same latents and, on one device, byte-identical PNGs.

Images are encoded at their **bin centres** (:func:`torchglow.tools.images.bin_centres`), not dequantised
with random noise (the official encoder adds ``U(0, 1/n_bins)`` noise): the encoding is then
deterministic and ``to_uint8(decode(encode(x)))`` gives back exactly the ``n_bits`` image.

All edits happen on the **standardised** latents ``ε = (z - mean) / std`` of every level
(``encode(..., standardized=True)``), as in the official demo. For a class-conditional model
``y`` (one label per image) is used to encode and to decode: the top prior's mean and std depend
on it, the ``z``s do not.

Displayed images go through :func:`torchglow.tools.images.display_uint8`: bin ``max_level`` -> 255.
``max_level=None`` uses the input images' own top bin (so the digits, which use bins 0..16 of 32,
are shown at full contrast); pass ``max_level`` to choose.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .. import preprocess as pp
from ..files import write_json_atomic
from ..health import check_frames, frame_stats, warn_frames
from ..model import Glow
from .images import bin_centres, data_max_level, display_uint8, save_grid
from .sampling import check_labels


# ---------------------------------------------------------------------------- helpers
def _centres(model: Glow, x_uint8: torch.Tensor) -> torch.Tensor:
    """:func:`bin_centres` on the model's device, in its dtype."""
    device, dtype = model.device, model.dtype
    return bin_centres(x_uint8, model.config.n_bits).to(device=device, dtype=dtype)


def _reduced(x_uint8: torch.Tensor, n_bits: int) -> torch.Tensor:
    """uint8 images with the bits below ``n_bits`` cleared: what the model can reproduce."""
    return pp.to_uint8(pp.preprocess(x_uint8.cpu(), n_bits), n_bits)


def _exactness(model: Glow, decoded: torch.Tensor, x_uint8: torch.Tensor) -> tuple[float, bool]:
    """How well ``decoded`` (model space, CPU) gives back ``x_uint8``: the largest error against the
    bin centres, and whether ``to_uint8`` of it equals the ``n_bits`` images exactly."""
    n_bits = model.config.n_bits
    error = float((decoded - _centres(model, x_uint8).float().cpu()).abs().max())
    return error, bool((pp.to_uint8(decoded, n_bits) == _reduced(x_uint8, n_bits)).all())


def check_images(model: Glow, x_uint8: torch.Tensor, what: str = "images") -> None:
    """TypeError unless ``x_uint8`` is a uint8 tensor, ValueError unless shaped (N, *image_shape)."""
    if not isinstance(x_uint8, torch.Tensor) or x_uint8.dtype != torch.uint8:
        raise TypeError(f"{what} must be a uint8 tensor (N, C, H, W)")
    if x_uint8.dim() != 4 or tuple(x_uint8.shape[1:]) != tuple(model.config.image_shape):
        raise ValueError(f"{what} must have shape (N, {', '.join(map(str, model.config.image_shape))}), "
                         f"got {tuple(x_uint8.shape)}")


def batch_slices(n: int, batch_size: int) -> Iterable[slice]:
    """Slices of ``range(n)`` of ``batch_size`` items (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


@torch.no_grad()
def encode_eps(model: Glow, x_uint8: torch.Tensor, y=None, batch_size: int = 256) -> list[torch.Tensor]:
    """Standardised latents ε (one tensor per level, shapes ``model.latent_shapes``) of uint8
    images encoded at their bin centres, on the model's device."""
    check_images(model, x_uint8)
    device = model.device
    y = check_labels(model, y, x_uint8.shape[0], device)
    parts: list[list[torch.Tensor]] = []
    for sl in batch_slices(x_uint8.shape[0], batch_size):
        eps, _ = model.encode(_centres(model, x_uint8[sl]), None if y is None else y[sl], standardized=True)
        parts.append(eps)
    return [torch.cat([p[i] for p in parts]) for i in range(len(model.latent_shapes))]


@torch.no_grad()
def decode_eps(model: Glow, eps: Sequence[torch.Tensor], y=None, batch_size: int = 256,
               check: str | None = "decoded latents", decode: Callable[..., torch.Tensor] | None = None
               ) -> torch.Tensor:
    """Model-space images from standardised latents (inverse of :func:`encode_eps`). ``check``:
    the words of a :class:`~torchglow.health.NumericalHealthWarning` when some images are non-finite
    or mostly clipped (:func:`~torchglow.health.check_frames`); None when the caller counts them.
    ``decode``: the model's decode (default) or one with its arguments, e.g.
    :func:`torchglow.tools.fast.fast_decode`."""
    decode = decode or model.decode
    device, dtype = model.device, model.dtype
    n = eps[0].shape[0]
    y = check_labels(model, y, n, device)
    out = []
    for sl in batch_slices(n, batch_size):
        out.append(decode([e[sl].to(device=device, dtype=dtype) for e in eps],
                          None if y is None else y[sl], standardized=True))
    x = torch.cat(out)
    if check is not None:
        check_frames(x, check)
    return x


def _add_frames(total: dict[str, int], x: torch.Tensor) -> None:
    """Add :func:`~torchglow.health.frame_stats` of ``x`` to the running counts ``total``."""
    for key, value in frame_stats(x).items():
        total[key] = total.get(key, 0) + value


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "direction"


# ---------------------------------------------------------------------------- reconstruction
@torch.no_grad()
def reconstruct(model: Glow, x_uint8: torch.Tensor, out_dir: str | Path, y=None, nrow: int = 8,
                batch_size: int = 256, max_level: int | None = None, info: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Originals next to ``decode(encode(x))`` (bin centres in, no noise).

    ``reconstruction.png``: for every ``nrow`` images a row of originals (reduced to ``n_bits``)
    above a row of reconstructions. The summary reports the largest and mean absolute error in
    model space (the [0, 1] pixel scale: model space is [-0.5, 0.5)), and whether ``to_uint8`` of
    the reconstructions equals the ``n_bits``-reduced originals exactly (``uint8_exact``, with the
    count of pixels that differ). ``info`` (e.g. where the images came from) is added to the summary.
    """
    check_images(model, x_uint8)
    n_bits = model.config.n_bits
    device, dtype = model.device, model.dtype
    y = check_labels(model, y, x_uint8.shape[0], device)
    max_err, sum_err, count = 0.0, 0.0, 0
    recs = []
    for sl in batch_slices(x_uint8.shape[0], batch_size):
        x = _centres(model, x_uint8[sl])
        yb = None if y is None else y[sl]
        latents, _ = model.encode(x, yb)
        x_rec = model.decode(latents, yb)
        err = (x_rec - x).abs()
        max_err = max(max_err, float(err.max()))
        sum_err += float(err.double().sum())
        count += err.numel()
        recs.append(x_rec.float().cpu())
    x_rec = torch.cat(recs)
    rec_uint8 = pp.to_uint8(x_rec, n_bits)
    orig = _reduced(x_uint8, n_bits)
    mismatched = int((rec_uint8 != orig).sum())
    max_level = data_max_level(x_uint8, n_bits) if max_level is None else max_level
    rows, row_labels = [], []
    for s in range(0, x_uint8.shape[0], nrow):
        rows += [display_uint8(orig[s : s + nrow], n_bits, max_level),
                 display_uint8(rec_uint8[s : s + nrow], n_bits, max_level)]
        row_labels += ["original", "reconstructed"]
    out_dir = Path(out_dir)
    png = save_grid(rows, out_dir / "reconstruction.png", row_labels=row_labels)
    summary = {
        "tool": "reconstruct", "images": int(x_uint8.shape[0]), "dtype": str(dtype).replace("torch.", ""),
        "max_abs_error": max_err, "mean_abs_error": sum_err / max(count, 1),
        "uint8_exact": mismatched == 0, "mismatched_pixels": mismatched,
        "n_bits": n_bits, "files": [str(png)], **(info or {}),
    }
    write_json_atomic(out_dir / "reconstruction.json", summary)
    return summary


# ---------------------------------------------------------------------------- interpolation
def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """``(1 - t) · a + t · b``, exactly ``a`` at t=0 and ``b`` at t=1."""
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    return (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, tol: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation between the rows of ``a`` and ``b`` (B, ...), each row flattened:
    ``sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b`` with Ω the angle between the rows; rows that
    are (anti)parallel or zero fall back to linear interpolation. Exact at t=0 and t=1."""
    if t in (0.0, 1.0):
        return lerp(a, b, t)
    shape = a.shape
    a2, b2 = a.reshape(shape[0], -1).double(), b.reshape(shape[0], -1).double()
    na, nb = a2.norm(dim=1), b2.norm(dim=1)
    cos = ((a2 * b2).sum(1) / (na * nb).clamp_min(1e-300)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    ok = (so > tol) & (na > 0) & (nb > 0)
    wa = torch.where(ok, torch.sin((1 - t) * omega) / torch.where(ok, so, 1.0), torch.full_like(so, 1 - t))
    wb = torch.where(ok, torch.sin(t * omega) / torch.where(ok, so, 1.0), torch.full_like(so, t))
    out = wa[:, None] * a2 + wb[:, None] * b2
    return out.reshape(shape).to(a.dtype)


INTERPOLATIONS = {"linear": lerp, "slerp": slerp}


@torch.no_grad()
def interpolate(model: Glow, x_a: torch.Tensor, x_b: torch.Tensor, out_dir: str | Path, steps: int = 8,
                method: str | Sequence[str] = ("linear", "slerp"), y=None, batch_size: int = 256,
                max_level: int | None = None, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Interpolate between pairs of images (``x_a[i]``, ``x_b[i]``) through their standardised
    latents: every level's ε is interpolated (``linear``, or ``slerp`` on its flattened rows) at
    ``t = 0, 1/(steps-1), ..., 1`` and decoded. ``y``: one label per pair for a
    class-conditional model, used for both ends (any label reconstructs both ends exactly).

    Writes ``interpolation_{method}.png`` (one row per pair, ``steps`` columns from ``x_a`` to
    ``x_b``) per method and ``interpolation.json``; the summary reports, per method, the largest
    model-space error of the decoded endpoints against the images and whether they give back the
    ``n_bits`` images exactly, and counts the frames that are non-finite or mostly clipped
    (``nonfinite_frames``, ``clipped_frames`` of ``frames``; a warning when there are any). ``info``
    is added to the summary.
    """
    check_images(model, x_a, "x_a")
    check_images(model, x_b, "x_b")
    if x_a.shape[0] != x_b.shape[0]:
        raise ValueError(f"x_a and x_b must hold the same number of images, got {x_a.shape[0]} and {x_b.shape[0]}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the two ends), got {steps}")
    methods = [method] if isinstance(method, str) else list(method)
    for m in methods:
        if m not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {m!r}; choose from {sorted(INTERPOLATIONS)}")
    n_bits = model.config.n_bits
    n = x_a.shape[0]
    eps_a = encode_eps(model, x_a, y, batch_size)
    eps_b = encode_eps(model, x_b, y, batch_size)
    ts = [i / (steps - 1) for i in range(steps)]
    if max_level is None:
        max_level = max(data_max_level(x_a, n_bits), data_max_level(x_b, n_bits))
    out_dir = Path(out_dir)
    files, per_method = [], {}
    for m in methods:
        fn = INTERPOLATIONS[m]
        frames, counts = [], {}
        for t in ts:
            eps_t = [fn(a, b, t) for a, b in zip(eps_a, eps_b)]
            frames.append(decode_eps(model, eps_t, y, batch_size, check=None).float().cpu())
            _add_frames(counts, frames[-1])
        warn_frames(counts, f"interpolation ({m})")
        (error_a, exact_a), (error_b, exact_b) = _exactness(model, frames[0], x_a), _exactness(model, frames[-1], x_b)
        per_method[m] = {"endpoint_max_abs_error": max(error_a, error_b), "endpoints_uint8_exact": exact_a and exact_b,
                         **counts}
        uint8 = torch.stack([pp.to_uint8(f, n_bits) for f in frames], 1)  # (n, steps, C, H, W)
        rows = [display_uint8(uint8[i], n_bits, max_level) for i in range(n)]
        files.append(str(save_grid(rows, out_dir / f"interpolation_{m}.png")))
    summary = {"tool": "interpolate", "pairs": n, "steps": steps, "t": ts, "methods": methods,
               "per_method": per_method, "n_bits": n_bits, "files": files, **(info or {})}
    write_json_atomic(out_dir / "interpolation.json", summary)
    return summary


@torch.no_grad()
def manipulate(model: Glow, x_uint8: torch.Tensor, direction: Sequence[torch.Tensor], out_dir: str | Path,
               alphas: Sequence[float] = (-1.0, -0.5, 0.0, 0.5, 1.0), y=None, name: str = "direction",
               batch_size: int = 256, max_level: int | None = None,
               eps: Sequence[torch.Tensor] | None = None, suffix: str | None = None) -> dict[str, Any]:
    """Edit images along a direction (per-level list, e.g. from
    :func:`~torchglow.tools.directions.attribute_directions`): ``ε + α · direction`` at every
    level, decoded, as the official demo's ``manipulate`` (α in [-1, 1]). Writes ``manipulate_{name}.png`` (one row per image, one column per α) and
    ``manipulate_{name}.json``; the summary reports, for α = 0 when given, the model-space error
    against the image and whether the ``n_bits`` image comes back exactly, and counts the frames
    that are non-finite or mostly clipped (``nonfinite_frames``, ``clipped_frames`` of ``frames``;
    a warning when there are any). ``eps``: the images' :func:`encode_eps` when the caller has it
    already (:func:`manipulate_all` encodes once). ``suffix`` goes after the name in the file
    names; None picks the first of "", "-2", "-3", ... that overwrites no file.
    """
    check_images(model, x_uint8)
    if len(direction) != len(model.latent_shapes):
        raise ValueError(f"a direction needs {len(model.latent_shapes)} levels, got {len(direction)}")
    for d, s in zip(direction, model.latent_shapes):
        if d.numel() != math.prod(s):
            raise ValueError(f"direction level of shape {tuple(d.shape)} does not fit latent shape {s}")
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("give at least one alpha")
    n_bits = model.config.n_bits
    device, dtype = model.device, model.dtype
    dirs = [d.reshape(1, *s).to(device=device, dtype=dtype) for d, s in zip(direction, model.latent_shapes)]
    eps = encode_eps(model, x_uint8, y, batch_size) if eps is None else eps
    cols = []
    summary_extra: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for a in alphas:
        x = decode_eps(model, [e + a * d for e, d in zip(eps, dirs)], y, batch_size, check=None).float().cpu()
        _add_frames(counts, x)
        if a == 0.0:
            error, exact = _exactness(model, x, x_uint8)
            summary_extra = {"alpha0_max_abs_error": error, "alpha0_uint8_exact": exact}
        cols.append(pp.to_uint8(x, n_bits))
    warn_frames(counts, f"manipulate {name}")
    grid = torch.stack(cols, 1)  # (N, len(alphas), C, H, W)
    max_level = data_max_level(x_uint8, n_bits) if max_level is None else max_level
    rows = [display_uint8(grid[i], n_bits, max_level) for i in range(grid.shape[0])]
    out_dir = Path(out_dir)
    stem = f"manipulate_{_slug(name)}"
    suffix = free_suffix(out_dir, [f"{stem}.png", f"{stem}.json"]) if suffix is None else suffix
    png = save_grid(rows, out_dir / f"{stem}{suffix}.png")
    summary = {"tool": "manipulate", "name": name, "images": int(x_uint8.shape[0]), "alphas": alphas,
               "direction_norm_per_level": [float(d.norm()) for d in dirs], **summary_extra, **counts,
               "n_bits": n_bits, "files": [str(png)]}
    write_json_atomic(out_dir / f"{stem}{suffix}.json", summary)
    return summary


def free_suffix(out_dir: str | Path, names: Sequence[str]) -> str:
    """The first of "", "-2", "-3", ... that, put before the extension of every one of ``names``,
    names no existing file in ``out_dir``: a second call of a tool keeps the first one's files."""
    out_dir = Path(out_dir)
    for i in range(1, 10_000):
        suffix = "" if i == 1 else f"-{i}"
        if not any((out_dir / f"{Path(n).stem}{suffix}{Path(n).suffix}").exists() for n in names):
            return suffix
    raise ValueError(f"{out_dir} holds 9,999 outputs of this tool: choose another output folder")


def manipulate_all(model: Glow, x_uint8: torch.Tensor, directions: dict[str, Sequence[torch.Tensor]],
                   out_dir: str | Path, alphas: Sequence[float] = (-1.0, -0.5, 0.0, 0.5, 1.0), y=None,
                   batch_size: int = 256, max_level: int | None = None, info: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """:func:`manipulate` along each of ``directions`` (``{name: per-level direction}``); writes
    ``manipulate.json``, the summaries per attribute with ``info`` added, and returns it. The
    images are encoded once for all directions. A folder that holds an earlier call's files gets
    this call's with a suffix (``manipulate-2.json``, ``manipulate_class_cat-2.png``)."""
    eps = encode_eps(model, x_uint8, y, batch_size)
    stems = ["manipulate"] + [f"manipulate_{_slug(name)}" for name in directions]
    suffix = free_suffix(out_dir, [f"{stem}{ext}" for stem in stems for ext in (".png", ".json")])
    per_attribute = {name: manipulate(model, x_uint8, d, out_dir, alphas=alphas, y=y, name=name,
                                      batch_size=batch_size, max_level=max_level, eps=eps, suffix=suffix)
                     for name, d in directions.items()}
    summary = {"tool": "manipulate", "alphas": [float(a) for a in alphas], **(info or {}),
               "attributes": per_attribute, "files": [f for s in per_attribute.values() for f in s["files"]]}
    write_json_atomic(Path(out_dir) / f"manipulate{suffix}.json", summary)
    return summary
