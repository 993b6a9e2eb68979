"""uint8 images for the tools: into model space at their bin centres, display scaling, grids.

Three separate concerns:

* **Bin centres.** :func:`bin_centres` puts uint8 images in model space at the centre of each
  ``n_bits`` bin, ``preprocess(x) + 0.5 / n_bins``: a deterministic stand-in for dequantisation
  noise, so that encoding an image twice gives the same latent and ``to_uint8`` of its
  reconstruction gives the ``n_bits`` image back exactly (the centre is ``0.5 / n_bins`` from either
  bin edge, far more than the flow's round-off).

* **Display scaling.** Images reduced to ``n_bits`` live in the bins ``0 .. 2**n_bits - 1``, stored
  in 8 bits as ``bin * 2**(8 - n_bits)`` (what :func:`torchglow.preprocess.to_uint8` returns), so
  their brightest value is ``255 - (2**(8 - n_bits) - 1)``, not 255. Some data sets also use only
  part of the range: scikit-learn's digits have 17 levels stored as ``level * 8`` (0..128), i.e.
  bins 0..16 of 32 with ``n_bits=5``, which look dim. :func:`display_uint8` maps bins linearly
  so that ``max_level`` becomes 255 (and clamps brighter bins); ``max_level`` defaults to the
  largest bin ``2**n_bits - 1``. Pass the data's own top bin (:func:`data_max_level`) to stretch
  a partial range to full contrast. Display scaling is for looking at images only: never feed
  displayed images back to a model.
* **Grids.** :func:`save_grid` lays out images (a batch, or a list of rows of different lengths)
  with nearest-neighbour upscaling so that small images (8x8 digits) are viewable, optional text
  labels left of each row, grey images saved as 8-bit grey PNG and colour as RGB. The output
  depends only on the pixel values, so the same images give byte-identical PNG files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import preprocess as pp

MIN_DISPLAY_PX = 32  # small images are upscaled by an integer factor to at least this size


def bin_centres(x_uint8: torch.Tensor, n_bits: int) -> torch.Tensor:
    """uint8 images -> float32 model space (CPU) at the centre of each ``n_bits`` bin:
    ``floor(x / 2**(8 - n_bits)) / n_bins - 0.5 + 0.5 / n_bins``. Every value is a dyadic fraction,
    exact in float32 and any wider dtype it is cast to."""
    return pp.preprocess(x_uint8.cpu(), n_bits) + 0.5 / pp.n_bins(n_bits)


def data_max_level(x_uint8: torch.Tensor, n_bits: int) -> int:
    """The largest ``n_bits`` bin used by uint8 images (e.g. 16 for the digits with ``n_bits=5``)."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x_uint8.dtype}")
    if x_uint8.numel() == 0:
        return 2**n_bits - 1
    return int(x_uint8.max().item()) >> (8 - n_bits)


def display_max_level(dataset, n_bits: int) -> int:
    """The bin that sample grids of a model trained on ``dataset`` show as white: the largest bin
    its images use when they are held in memory (``dataset.images``; 16 for the digits), else the
    top bin ``2**n_bits - 1`` (decoding every file of a folder to find out would be slow)."""
    images = getattr(dataset, "images", None)
    return 2**n_bits - 1 if images is None else data_max_level(images, n_bits)


def display_uint8(x_uint8: torch.Tensor, n_bits: int, max_level: int | None = None) -> torch.Tensor:
    """uint8 images -> uint8 images for display: the ``n_bits`` bin of each value
    (``x >> (8 - n_bits)``) is scaled linearly so that bin ``max_level`` is 255 (bins above it
    clamp to 255). ``max_level`` defaults to ``2**n_bits - 1``, the top bin, which for
    ``n_bits=8`` is the identity."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x_uint8.dtype}")
    top = 2**n_bits - 1
    max_level = top if max_level is None else int(max_level)
    if max_level < 1:
        max_level = 1  # an all-black set: nothing to stretch
    levels = (x_uint8.to(torch.int32) >> (8 - n_bits)).to(torch.float32)
    out = torch.round(levels * (255.0 / max_level)).clamp_(0, 255)
    return out.to(torch.uint8)


def to_display(x_model: torch.Tensor, n_bits: int, max_level: int | None = None) -> torch.Tensor:
    """Model-space tensors (e.g. samples in [-0.5, 0.5)) -> uint8 images for display:
    :func:`torchglow.preprocess.to_uint8` (quantise to ``n_bits`` bins, exactly as the data), then
    :func:`display_uint8` (bin ``max_level`` -> 255, default the top bin ``2**n_bits - 1``)."""
    return display_uint8(pp.to_uint8(x_model.detach().cpu(), n_bits), n_bits, max_level)


def _as_rows(images, nrow: int) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
        if nrow < 1:
            raise ValueError(f"nrow must be >= 1, got {nrow}")
        return [images[i : i + nrow] for i in range(0, images.shape[0], nrow)]
    rows = []
    for row in images:
        row = torch.stack(list(row)) if not isinstance(row, torch.Tensor) else row
        if row.dim() == 3:
            row = row.unsqueeze(0)
        rows.append(row)
    return rows


def grid_array(images, nrow: int = 8, scale: int | None = None, padding: int = 2,
               pad_value: int = 255) -> np.ndarray:
    """The grid as a uint8 array, (H, W) for grey images or (H, W, 3) for colour.

    ``images``: uint8 (N, C, H, W), laid out ``nrow`` per row, or a list of rows, each a
    (n_i, C, H, W) tensor or a list of (C, H, W) tensors (rows may differ in length; short rows
    are padded). ``scale``: integer nearest-neighbour upscaling; None picks the smallest factor
    that makes images at least :data:`MIN_DISPLAY_PX` pixels high.
    """
    rows = _as_rows(images, nrow)
    rows = [r for r in rows if r.shape[0] > 0]
    if not rows:
        raise ValueError("no images to lay out")
    c, h, w = rows[0].shape[1:]
    for r in rows:
        if r.dtype != torch.uint8:
            raise TypeError(f"save_grid expects uint8 images, got {r.dtype}")
        if tuple(r.shape[1:]) != (c, h, w):
            raise ValueError(f"all images must have one shape, got {tuple(r.shape[1:])} and {(c, h, w)}")
    if c not in (1, 3):
        raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels, got {c}")
    if scale is None:
        scale = max(1, -(-MIN_DISPLAY_PX // h))
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    sh, sw = h * scale, w * scale
    ncol = max(r.shape[0] for r in rows)
    canvas = np.full((padding + len(rows) * (sh + padding), padding + ncol * (sw + padding), c),
                     pad_value, dtype=np.uint8)
    for i, row in enumerate(rows):
        arr = row.detach().cpu().permute(0, 2, 3, 1).numpy()  # (n, H, W, C)
        if scale > 1:
            arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
        top = padding + i * (sh + padding)
        for j in range(arr.shape[0]):
            left = padding + j * (sw + padding)
            canvas[top : top + sh, left : left + sw] = arr[j]
    return canvas[:, :, 0] if c == 1 else canvas


def save_grid(images, path: str | Path, nrow: int = 8, row_labels: Sequence[str] | None = None,
              scale: int | None = None, padding: int = 2, pad_value: int = 255) -> Path:
    """Write uint8 images as a PNG grid (see :func:`grid_array` for the layout) and return the path.

    ``row_labels``: one text per row, drawn (PIL's default font) in a white margin left of the row.
    Grey images are saved as mode ``L``, colour as ``RGB``; the parent folder is created.
    """
    from PIL import Image, ImageDraw, ImageFont

    arr = grid_array(images, nrow, scale, padding, pad_value)
    img = Image.fromarray(arr)  # (H, W) uint8 -> "L", (H, W, 3) uint8 -> "RGB"
    if row_labels is not None:
        n_rows = len(_as_rows(images, nrow))
        if len(row_labels) != n_rows:
            raise ValueError(f"{len(row_labels)} row labels for {n_rows} rows")
        font = ImageFont.load_default()
        probe = ImageDraw.Draw(img)
        widths = [probe.textbbox((0, 0), str(t), font=font)[2] for t in row_labels]
        margin = max(widths, default=0) + 2 * padding + 4
        labelled = Image.new(img.mode, (img.width + margin, img.height), 255 if img.mode == "L" else (255, 255, 255))
        labelled.paste(img, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        row_h = (img.height - padding) / n_rows
        ink = 0 if img.mode == "L" else (0, 0, 0)
        for i, text in enumerate(row_labels):
            box = draw.textbbox((0, 0), str(text), font=font)
            y = padding + i * row_h + (row_h - padding - (box[3] - box[1])) / 2 - box[1]
            draw.text((padding + 2, y), str(text), fill=ink, font=font)
        img = labelled
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
