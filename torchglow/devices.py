"""Devices: one resolver for every ``device`` setting (the CLI's ``--device``), and random draws
from any generator."""

from __future__ import annotations

from typing import Callable

import torch

from .config import ConfigError

DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` and
    ``mps`` as given. Raises :class:`~torchglow.config.ConfigError` (one line naming the parameter) for
    an unknown name or a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConfigError(f"`device` {name}: unknown device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"`device` {name}: no CUDA GPU is available here (use `device` cpu or auto)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"`device` {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"`device` {name}: MPS (Apple GPU) is not available here (use `device` cpu or auto)")
    return device


def random_tensor(draw: Callable[..., torch.Tensor], shape: tuple[int, ...], generator: torch.Generator | None,
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``draw(shape)`` (``torch.randn``, ``torch.rand``) on ``device`` in ``dtype``, from ``generator``
    wherever that lives: torch only draws with a generator on its own device, so the numbers are
    drawn there and moved. A seeded CPU generator thus gives the same numbers to a model on any
    device; ``None`` uses the default generator of ``device``."""
    where = device if generator is None else generator.device
    return draw(shape, generator=generator, device=where, dtype=dtype).to(device)
