"""Pixel <-> model-space maps, exactly as the official Glow code.

8-bit images are reduced to ``n_bits`` (``floor(x / 2**(8 - n_bits))``), scaled to
``x / n_bins - 0.5`` (so the model space is [-0.5, 0.5)) and dequantised with ``U(0, 1/n_bins)``
noise. The discretisation term ``-D·log(n_bins)`` turns the continuous density of the dequantised
input into a (lower bound on the) discrete likelihood of the ``n_bits`` image; it is added exactly
once, in :func:`bits_per_dim_from_log_prob`.
"""

from __future__ import annotations

import math

import torch

from .devices import random_tensor


def n_bins(n_bits: int) -> int:
    return 2**n_bits


def preprocess(x_uint8: torch.Tensor, n_bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images (B, C, H, W) in 0..255 -> model space in ``dtype``, bin centres not yet noised
    (every value is ``k / 2**n_bits - 0.5``, exact in any float dtype)."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"preprocess expects uint8 images, got {x_uint8.dtype}")
    x = x_uint8.to(dtype)
    if n_bits < 8:
        x = torch.floor(x / 2 ** (8 - n_bits))
    return x / n_bins(n_bits) - 0.5


def dequantize(x: torch.Tensor, n_bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add uniform noise U(0, 1/n_bins) to preprocessed images, drawn from ``generator`` on its own
    device (see :func:`torchglow.devices.random_tensor`)."""
    noise = random_tensor(torch.rand, x.shape, generator, x.device, x.dtype)
    return x + noise / n_bins(n_bits)


def to_uint8(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Model-space tensors (e.g. samples) -> uint8 images in 0..255.

    Inverts :func:`preprocess`: the value is clamped into [-0.5, 0.5), floored to its ``n_bits``
    bin and scaled back to 8 bits (``bin * 2**(8 - n_bits)``), so ``to_uint8(preprocess(x))`` is
    ``x`` with its low ``8 - n_bits`` bits cleared. Non-finite values become 0.
    """
    nb = n_bins(n_bits)
    x = torch.nan_to_num(x.float(), nan=-0.5, posinf=0.5, neginf=-0.5)
    bins = torch.floor((x + 0.5) * nb).clamp_(0, nb - 1)
    return (bins * 2 ** (8 - n_bits)).to(torch.uint8)


def bits_per_dim_from_log_prob(log_prob: torch.Tensor, n_dims: int, n_bits: int) -> torch.Tensor:
    """bits/dim = -(log p(x) - D·log n_bins) / (D·ln 2), with log p the continuous density in nats."""
    return -(log_prob - n_dims * math.log(n_bins(n_bits))) / (n_dims * math.log(2.0))
