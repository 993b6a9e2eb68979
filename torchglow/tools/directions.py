"""Manipulation directions in the standardised latents, as the official demo
(``demo/get_manipulators.py``): from images labelled with binary attributes, and their
safetensors files. :func:`torchglow.tools.latent.manipulate` edits images along them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.labels import bool_labels
from ..model import Glow
from .latent import batch_slices, check_images, encode_eps
from .sampling import check_labels

DIRECTION_SCALE = 1.6  # official demo/get_manipulators.py: 1.6 * (mean ε with - mean ε without)


@torch.no_grad()
def attribute_directions(model: Glow, x_uint8: torch.Tensor, labels, names: Sequence[str] | None = None,
                         batch_size: int = 256, y=None, scale: float = DIRECTION_SCALE
                         ) -> dict[str, list[torch.Tensor]]:
    """Manipulation directions, as the official demo (``demo/get_manipulators.py``): encode every
    image to its standardised latents ε (all levels), and for each attribute
    ``direction = scale · (mean ε of the images with it − mean ε of those without)``, with
    ``scale = 1.6`` as the demo. ``labels``: bool (N, A) (or (N,); 0/1 and -1/1 accepted).

    Returns ``{name: [direction of level 0, ..., top level]}`` (float32, CPU, shapes
    ``model.latent_shapes``). Every attribute needs images with and without it.
    """
    check_images(model, x_uint8)
    labels = bool_labels(labels)
    n, n_attr = labels.shape
    if n != x_uint8.shape[0]:
        raise ValueError(f"{n} label rows for {x_uint8.shape[0]} images")
    names = [f"attr_{i}" for i in range(n_attr)] if names is None else [str(s) for s in names]
    if len(names) != n_attr or len(set(names)) != n_attr:
        raise ValueError(f"need {n_attr} distinct attribute names, got {names}")
    n_pos = labels.sum(0)
    for name, p in zip(names, n_pos.tolist()):
        if p == 0 or p == n:
            raise ValueError(f"attribute {name!r}: {p} of {n} images have it; need images with and without")
    device = model.device
    y = check_labels(model, y, n, device)
    lab = labels.to(device=device, dtype=torch.float64)
    pos_sum = [torch.zeros(n_attr, math.prod(s), dtype=torch.float64, device=device) for s in model.latent_shapes]
    tot_sum = [torch.zeros(math.prod(s), dtype=torch.float64, device=device) for s in model.latent_shapes]
    for sl in batch_slices(n, batch_size):
        for i, e in enumerate(encode_eps(model, x_uint8[sl], None if y is None else y[sl], batch_size)):
            flat = e.reshape(e.shape[0], -1).double()
            pos_sum[i] += lab[sl].T @ flat
            tot_sum[i] += flat.sum(0)
    n_pos = n_pos.to(device=device, dtype=torch.float64)[:, None]
    directions: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for i, shape in enumerate(model.latent_shapes):
        mean_pos = pos_sum[i] / n_pos
        mean_neg = (tot_sum[i][None] - pos_sum[i]) / (n - n_pos)
        d = (scale * (mean_pos - mean_neg)).float().cpu()
        for a, name in enumerate(names):
            directions[name].append(d[a].reshape(shape).contiguous())
    return directions


def save_directions(directions: dict[str, Sequence[torch.Tensor]], path: str | Path,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write directions to a safetensors file: tensor ``"{i}/level{l}"`` for the i-th name, the
    names (in order) and ``metadata`` as JSON in the file's metadata."""
    from safetensors.torch import save_file

    names = list(directions)
    tensors = {}
    for i, name in enumerate(names):
        for lvl, d in enumerate(directions[name]):
            tensors[f"{i}/level{lvl}"] = d.detach().float().contiguous().cpu()
    meta = {"format": "torchglow-directions", "names": json.dumps(names),
            "n_levels": str(len(directions[names[0]]) if names else 0),
            "metadata": json.dumps(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_directions(path: str | Path) -> dict[str, list[torch.Tensor]]:
    """Inverse of :func:`save_directions`: ``{name: [per-level direction]}`` in the saved order.
    ValueError (naming the file) for a missing, foreign or damaged file."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ValueError(f"directions file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") == "torchglow-directions":
                names = json.loads(meta["names"])
                n_levels = int(meta["n_levels"])
                return {name: [f.get_tensor(f"{i}/level{lvl}") for lvl in range(n_levels)]
                        for i, name in enumerate(names)}
    except Exception as e:  # safetensors raises its own error types for files of other formats
        raise ValueError(f"cannot read directions file {path}: {e}") from None
    raise ValueError(f"cannot read directions file {path}: not a torchglow directions file")
