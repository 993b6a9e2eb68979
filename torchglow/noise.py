"""Counter-based random numbers: noise as a pure function of ``(seed, stream, step, element)``.

No generator and no RNG state: a resumed run, a run on N processes and a compiled run all draw the
noise of an uninterrupted eager run, and evaluation draws reproducible dequantisation noise."""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor | int, c: int) -> torch.Tensor | int:
    """``x·c mod 2³²`` for int64 ``x`` in [0, 2³²) without overflowing int64: ``x`` in 16-bit halves."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & MASK32


def _mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash with full avalanche (Wellons' "lowbias32"):
    ``x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed: int, stream: int, step: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1) (24 random bits each) as a pure function of ``(seed, stream, step,
    index)``: ``u = mix(mix(mix(seed ⊕ stream) ⊕ step) ⊕ index) / 2³²`` (two rounds on the index).

    ``step`` is a 0-d int64 device tensor, ``index`` an int64 tensor of element indices < 2³²; the
    result has ``index``'s shape and device. Equal on every device, process and compiled or eager
    run, and needs no RNG state to resume."""
    base = _mix32((seed * 0x9E3779B1 + stream) & MASK32)  # a Python int: nothing to copy to the device
    key = _mix32((step & MASK32) ^ base)
    h = _mix32(_mix32(index ^ key) ^ key)
    return (h >> 8).to(torch.float32) * (1.0 / 2**24)


# streams of counter_uniform: one per kind of draw
NOISE, AUGMENT, INIT_NOISE = range(3)


def rows_of(batch: int, rank: int, world: int, device: torch.device) -> torch.Tensor:
    """Indices in the global batch of this process's rows (``rank::world``)."""
    return torch.arange(batch // world, device=device) * world + rank


def dequantization_noise(seed: int, stream: int, step: torch.Tensor, rows: torch.Tensor,
                         image_shape: tuple[int, int, int]) -> torch.Tensor:
    """``U(0, 1)`` noise of the global-batch ``rows``, shape (len(rows), C, H, W)."""
    d = math.prod(image_shape)
    index = rows[:, None] * d + torch.arange(d, device=rows.device)
    return counter_uniform(seed, stream, step, index).view(len(rows), *image_shape)


def mix_seed(*values: int) -> int:
    """One 63-bit seed from a run's seed and the integers that name a use of it (an epoch, a step,
    a draw, a rank), so that every use draws its own stream: ``h ← h·1000003 + v`` over the values."""
    h = 0x5EED
    for v in values:
        h = (h * 1_000_003 + int(v)) % 2**63
    return h
