"""Evaluation: test bits/dim of a model, a per-pixel baseline, and the learning-curve plot."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import preprocess as pp
from ..distributed import all_reduce_sum, rank_and_world
from ..model import Glow

# A test bits/dim from fewer images carries a caveat: the mean of N per-image scores whose spread is
# typically 0.1-0.5 bits/dim has a standard error of 0.01-0.05 at N = 100, more below.
MIN_EVAL_IMAGES = 100


def few_images_caveat(n: int, name: str) -> str | None:
    """The caveat of a bits/dim scored on ``n`` < :data:`MIN_EVAL_IMAGES` images of ``name``; None when enough."""
    if n >= MIN_EVAL_IMAGES:
        return None
    return (f"the score rests on {n} image(s) of {name}, fewer than {MIN_EVAL_IMAGES}: read its later digits as "
            f"noise (a folder's whole set: `dataset` FOLDER `split` all)")


@torch.no_grad()
def evaluate_bpd(model: Glow, images: torch.Tensor, labels: torch.Tensor | None = None,
                 batch_size: int = 256, n_draws: int = 1, seed: int = 0, fast: bool = False) -> float:
    """Mean bits/dim of uint8 ``images`` (N, C, H, W), averaged over ``n_draws`` seeded
    dequantisation draws. Under torch.distributed each rank scores its share and the result is
    the mean over the whole set. ``fast``: the forward replayed as a CUDA graph on CUDA (the eager
    kernels elsewhere; :func:`torchglow.tools.fast.fast_forward`, its flow steps not compiled), at
    a fixed batch (``batch_size``, or fewer when the set is smaller), the last batch padded with
    copies of its first images, which are not counted; equal to the eager forward up to float
    rounding."""
    from .fast import fast_forward
    from ..noise import mix_seed

    device = model.device
    n_bits, n_dims = model.config.n_bits, model.config.n_dims
    forward = fast_forward(model) if fast else model
    rank, world = rank_and_world()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    idx = torch.arange(rank, images.shape[0], world)
    batch_size = min(batch_size, len(idx)) if fast else batch_size  # a small set is not padded to a big batch
    for draw in range(n_draws):
        gen = torch.Generator(device=device).manual_seed(mix_seed(seed, draw, rank))
        for start in range(0, len(idx), batch_size):
            i = idx[start : start + batch_size]
            n = len(i)
            if fast and n < batch_size:
                i = torch.cat([i, i[:1].expand(batch_size - n)])
            x = images[i.to(images.device)].to(device, non_blocking=True)
            y = None if labels is None else labels[i.to(labels.device)].to(device)
            x = pp.dequantize(pp.preprocess(x, n_bits, model.dtype), n_bits, gen)
            bpd = pp.bits_per_dim_from_log_prob(forward(x, y).log_prob, n_dims, n_bits)[:n]
            total += bpd.double().sum()
            count += n
    return float(all_reduce_sum(total) / all_reduce_sum(count))


def categorical_baseline_bpd(train_uint8: torch.Tensor, test_uint8: torch.Tensor, n_bits: int,
                             alpha: float = 0.5) -> float:
    """Bits/dim on the test images of independent per-pixel categorical distributions over the
    ``2**n_bits`` levels, fitted by counting on the training images (additive smoothing ``alpha``).
    The simplest discrete model a flow must beat."""
    shift = 8 - n_bits
    n_levels = 2**n_bits
    train = (train_uint8.long() >> shift).flatten(1)  # (N, D) levels
    test = (test_uint8.long() >> shift).flatten(1)
    d = train.shape[1]
    counts = torch.zeros(d, n_levels, dtype=torch.float64)
    counts.scatter_add_(1, train.T, torch.ones_like(train.T, dtype=torch.float64))
    log_p = torch.log((counts + alpha) / (train.shape[0] + alpha * n_levels))  # (D, levels)
    nll = -log_p.gather(1, test.T)  # (D, N_test)
    return float(nll.mean() / math.log(2))


X_LABELS = {"images": "images seen", "time_s": "seconds of training", "step": "steps"}


def plot_curves(history: list[dict], path: str | Path, baseline: float | None = None,
                x_keys: tuple[str, ...] = ("images",)) -> None:
    """``bpd.png``: train (logged) and test (per evaluation) bits/dim, one panel per x axis of
    ``x_keys`` (``images``, ``time_s`` or ``step``: fields of the metrics.jsonl records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(x_keys), figsize=(6 * len(x_keys), 4), squeeze=False)
    for ax, key in zip(axes[0], x_keys):
        train = [(h[key], h["train_bpd"]) for h in history if "train_bpd" in h and key in h]
        test = [(h[key], h["test_bpd"]) for h in history if "test_bpd" in h and key in h]
        if train:
            ax.plot(*zip(*train), label="train", alpha=0.7)
        if test:
            ax.plot(*zip(*test), "o-", label="test")
        if baseline is not None:
            ax.axhline(baseline, color="grey", ls="--", label="per-pixel baseline")
        ax.set_xlabel(X_LABELS.get(key, key))
        ax.set_ylabel("bits/dim")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
