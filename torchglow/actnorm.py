"""ActNorm, the data-dependent per-channel affine layer that opens every flow step and follows
every hidden convolution, and the scalars every layer shares: the official ``logscale_factor``
(:data:`LOGSCALE_FACTOR`) and the precision of log-determinants (:func:`logdet_dtype`).

The initialisation follows the official code (Kingma & Dhariwal 2018, §3.1): the first batch seen
inside :func:`initializing` sets each channel to zero mean and unit variance.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .distributed import all_reduce_mean

# The official code stores log-scales divided by this factor, which multiplies their effective
# learning rate under Adam/Adamax by 3.
LOGSCALE_FACTOR = 3.0


def logdet_dtype(x: torch.Tensor) -> torch.dtype:
    """Log-dets and priors accumulate in float32 whatever the activations' precision (bf16, fp16),
    and in float64 when the model itself runs in float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class ActNorm(nn.Module):
    """Per-channel affine normalisation: ``y = (x + bias) · exp(logs)``, log-det ``H·W·Σ logs``.

    Initialised from data (Kingma & Dhariwal 2018, §3.1): the first batch seen inside
    :func:`initializing` gets zero mean and unit variance per channel. Whether that happened is the
    ``initialized`` buffer, saved in the ``state_dict``, so a loaded layer never re-initialises.
    The flag is checked only by the initialisation routine, never in ``forward``.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, num_channels, 1, 1))  # stored as logs / LOGSCALE_FACTOR
        self.register_buffer("initialized", torch.tensor(False))
        self._init_pending = False  # set by `initializing()`; a Python bool, so no device sync

    def log_scale(self) -> torch.Tensor:
        return self.logs * LOGSCALE_FACTOR

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._init_pending:
            self._initialize(x)
        logs = self.log_scale()
        y = (x + self.bias) * torch.exp(logs)
        logdet = (x.shape[2] * x.shape[3]) * logs.to(logdet_dtype(x)).sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale()) - self.bias

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        """Centre first, then scale: ``bias = -mean``, ``logs = log(1 / (std + 1e-6))`` (official).

        Under torch.distributed the moments are averaged over all ranks (equal batches per rank),
        so every rank gets the same initialisation.
        """
        x = x.to(logdet_dtype(x))
        mean = all_reduce_mean(x.mean(dim=(0, 2, 3), keepdim=True))
        var = all_reduce_mean(((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True))
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(1.0 / (var.sqrt() + 1e-6)) / LOGSCALE_FACTOR)
        self.initialized.fill_(True)
        self._init_pending = False


@contextlib.contextmanager
def initializing(module: nn.Module):
    """Within this context, each not-yet-initialised ActNorm in ``module`` initialises itself
    from the first input it sees (one forward pass initialises a whole model, in order)."""
    pending = [m for m in module.modules() if isinstance(m, ActNorm) and not bool(m.initialized)]
    for m in pending:
        m._init_pending = True
    try:
        yield
    finally:
        for m in pending:
            m._init_pending = False
