"""Invertible layers of Glow.

Every flow layer maps ``forward(x) -> (y, logdet)`` and ``inverse(y) -> x`` on (B, C, H, W)
tensors; ``logdet`` is ``log|det dy/dx|`` per sample, shape (B,), in float32. All state lives in
parameters and buffers, so ``load_state_dict`` restores a layer completely.

Numerics follow the official openai/glow code (``model.py``/``tfops.py``): data-dependent ActNorm
with a ``logscale_factor`` of 3, the zero-initialised last convolutions scaled by ``exp(3·logs)``,
the sigmoid(h + 2) affine scale and float64 log-determinants of the plain 1x1 convolution. The
3x3 convolutions pad as the official ones (zeros plus an "edge" channel marking the border) or
with zeros only (``padding="zero"``, as the PyTorch ports): the padding changes what the coupling
networks and priors compute, never how a log-determinant is computed.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
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


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution ``y = W x`` over channels, log-det ``H·W·log|det W|``.

    ``W`` starts as a random rotation (Q of the QR of a Gaussian). With ``lu=True`` it is
    parametrised as ``W = P·(L + I)·(U + diag(sign·exp(log_s)))`` with fixed P and sign, and the
    log-det is ``H·W·Σ log_s``; the inverse then comes from triangular solves with the factors.
    Without LU the log-det is computed in float64 as in the official code.
    """

    def __init__(self, num_channels: int, lu: bool = True):
        super().__init__()
        self.lu = lu
        self._inverse_cache: tuple[tuple, torch.Tensor] | None = None
        c = num_channels
        w = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0]
        if not lu:
            self.weight = nn.Parameter(w.float())
            return
        p, l, u = torch.linalg.lu(w)
        s = torch.diagonal(u)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(c, c), -1))
        self.register_buffer("eye", torch.eye(c))
        self.lower = nn.Parameter(l.float())
        self.upper = nn.Parameter(torch.triu(u, 1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def _lu_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight_matrix(self) -> torch.Tensor:
        if not self.lu:
            return self.weight
        lower, upper = self._lu_factors()
        return self.perm @ lower @ upper

    def inverse_matrix(self) -> torch.Tensor:
        """``W⁻¹``: from the LU factors by triangular solves (else a float64 inverse); cached while
        the weights are unchanged and no gradient is needed (sampling and evaluation)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self._compute_inverse()
        # In-place updates (optimiser steps, load_state_dict) bump a parameter's version.
        key = tuple((p._version, p.data_ptr(), p.device, p.dtype) for p in self.parameters())
        if self._inverse_cache is None or self._inverse_cache[0] != key:
            self._inverse_cache = (key, self._compute_inverse())
        return self._inverse_cache[1]

    def _compute_inverse(self) -> torch.Tensor:
        if not self.lu:
            return torch.linalg.inv(self.weight.double()).to(self.weight.dtype)
        # W⁻¹ = U⁻¹ L⁻¹ Pᵀ, solved in float64 so the inverse is accurate to float32 rounding.
        lower, upper = (m.double() for m in self._lu_factors())
        eye = self.eye.double()
        l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        u_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return (u_inv @ l_inv @ self.perm.double().T).to(self.log_s.dtype)

    def logabsdet(self) -> torch.Tensor:
        if self.lu:
            return self.log_s.sum()
        return torch.linalg.slogdet(self.weight.double())[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight_matrix()
        y = F.conv2d(x, w.to(x.dtype).reshape(*w.shape, 1, 1))
        logdet = (x.shape[2] * x.shape[3]) * self.logabsdet().to(logdet_dtype(x))
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inv = self.inverse_matrix().to(y.dtype)
        return F.conv2d(y, w_inv.reshape(*w_inv.shape, 1, 1))


class Permute(nn.Module):
    """Fixed channel permutation (``"reverse"`` or a seeded random ``"shuffle"``); log-det 0."""

    def __init__(self, num_channels: int, mode: str = "reverse"):
        super().__init__()
        if mode == "reverse":
            perm = torch.arange(num_channels - 1, -1, -1)
        elif mode == "shuffle":
            perm = torch.randperm(num_channels)
        else:
            raise ValueError(f"unknown permutation mode {mode!r}")
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0], dtype=logdet_dtype(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.inv_perm]


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth by 2, channel order of the official ``squeeze2d``: out[c·4 + 2i + j] = x[c, 2h+i, 2w+j]."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)  # (B, C, H/2, i, W/2, j)
    x = x.permute(0, 1, 3, 5, 2, 4)  # (B, C, i, j, H/2, W/2)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze2d`."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w)  # (B, C/4, i, j, H, W)
    x = x.permute(0, 1, 4, 2, 5, 3)  # (B, C/4, H, i, W, j)
    return x.reshape(b, c // 4, h * 2, w * 2)


def edge_image(height: int, width: int, pad: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The official "edge" channel of a zero-padded (height, width) input: a (1, 1, height + 2·pad,
    width + 2·pad) map, 1 on the ``pad`` rows and columns of padding and 0 inside (tfops.py's
    ``add_edge_padding``). A constant: built once per shape, device and dtype in eager mode; under
    torch.compile it is built in the graph, where the compiler folds it into a constant."""
    if torch.compiler.is_compiling():
        return _make_edge_image(height, width, pad, device, dtype)
    return _cached_edge_image(height, width, pad, device, dtype)


def _make_edge_image(height: int, width: int, pad: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    edge = torch.ones(1, 1, height + 2 * pad, width + 2 * pad, device=device, dtype=dtype)
    edge[:, :, pad : pad + height, pad : pad + width] = 0
    return edge


_cached_edge_image = functools.lru_cache(maxsize=64)(_make_edge_image)


def conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A stride-1 "SAME" convolution with an odd square kernel, with the official edge padding when
    ``weight`` has one input channel more than ``x``.

    Official: ``conv(cat[pad(x), E], W)``, ``E`` the :func:`edge_image` concatenated last. When the
    convolution widens (more outputs than inputs: the first conv of a coupling network) that is
    what runs, the copy being of the narrow input. Otherwise (the zero convs: wide hidden input,
    narrow output) it runs as ``conv(pad(x), W[:, :C]) + (conv(E, W[:, C:]) + b)``: the second term
    does not depend on the data, so it is one (1, out, H, W) map (a bias that varies by position)
    and no copy of the wide input is made. Both equal the official convolution up to rounding.
    """
    pad = weight.shape[-1] // 2
    b, c, h, w = x.shape
    if weight.shape[1] == c:
        return F.conv2d(x, weight, bias, padding=pad)
    edge = edge_image(h, w, pad, x.device, x.dtype)
    if weight.shape[0] > c:
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        x = torch.cat([F.pad(x, (pad, pad, pad, pad)), edge.expand(b, -1, -1, -1)], 1)  # (B, C + 1, H + 2p, W + 2p)
        return F.conv2d(x.contiguous(memory_format=layout), weight, bias)  # the input's layout (see Coupling._net)
    position_bias = F.conv2d(edge, weight[:, c:], bias)  # (1, out, H, W)
    return F.conv2d(x, weight[:, :c], padding=pad) + position_bias


def _conv_in_channels(in_channels: int, kernel_size: int, edge: bool) -> int:
    # the official edge padding adds its channel to 3x3 convolutions only (add_edge_padding
    # returns a 1x1 convolution's input unchanged)
    return in_channels + 1 if edge and kernel_size > 1 else in_channels


class ZeroConv2d(nn.Module):
    """Zero-initialised convolution whose output is scaled: ``(conv(x) + b) · exp(3·logs)``.

    The last layer of every coupling network and prior, so that each flow step starts as the
    identity and each prior as a standard normal (official ``conv2d_zeros``). With ``edge=True``
    the convolution also sees the official edge channel (:func:`conv2d_same`) and its weight has
    ``in_channels + 1`` input channels, the last one the edge channel's.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, edge: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(_conv_in_channels(in_channels, kernel_size, edge), out_channels, kernel_size,
                              padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale is folded into the (small) weight and bias instead of multiplying the output:
        # (conv(x, W) + b)·s = conv(x, W·s) + b·s, equal up to float rounding.
        scale = torch.exp(self.logs * LOGSCALE_FACTOR)
        return conv2d_same(x, self.conv.weight * scale.view(-1, 1, 1, 1), self.conv.bias * scale.view(-1))


class ConvActNorm(nn.Module):
    """Bias-free convolution followed by ActNorm (official ``conv2d`` with ``do_actnorm``),
    weights drawn from N(0, 0.05²); ``edge=True``: with the official edge channel, as
    :class:`ZeroConv2d` (3x3 kernels only)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, edge: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(_conv_in_channels(in_channels, kernel_size, edge), out_channels, kernel_size,
                              padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.conv.weight, std=0.05)
        self.actnorm = ActNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        actnorm = self.actnorm
        if actnorm._init_pending:  # data-dependent init needs the raw convolution output
            return actnorm(conv2d_same(x, self.conv.weight, None))[0]
        # ActNorm folded into the convolution: (conv(x, W) + b)·s = conv(x, W·s) + b·s (equal up to
        # float rounding), one pass over the activations instead of three, and a cheaper backward.
        scale = torch.exp(actnorm.log_scale())
        return conv2d_same(x, self.conv.weight * scale.view(-1, 1, 1, 1), (actnorm.bias * scale).view(-1))


class LinearZeros(nn.Linear):
    """Official ``linear_zeros``: ``y = (x·Wᵀ + b)·exp(3·logs)``, W, b and logs zero-initialised
    (the class embedding of the top prior and the classifier, with ``class_layers="linear_zeros"``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        self.logs = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.exp(self.logs * LOGSCALE_FACTOR)
        return F.linear(x, self.weight * scale[:, None], self.bias * scale)


_CHANNELS_LAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Coupling(nn.Module):
    """Affine or additive coupling on the channel halves ``x = [x_a, x_b]``.

    ``h = NN(x_a)``; additive: ``y_b = x_b + h``, log-det 0; affine: ``shift = h[:, 0::2]``,
    ``scale = sigmoid(h[:, 1::2] + 2)``, ``y_b = (x_b + shift)·scale``, log-det ``Σ log scale``
    (official code; the paper writes ``exp`` for the scale). ``y_a = x_a``.

    ``autocast_dtype`` (e.g. torch.bfloat16) runs only the network in reduced precision; the
    coupling arithmetic and its log-det stay in the input's precision. ``dropout`` acts on the
    network's hidden features in training mode; the layer is then a flow for each drawn mask, and
    is deterministic (exactly invertible) in eval mode. ``padding="edge"``: the network's 3x3
    convolutions see the official edge channel (:func:`conv2d_same`).
    """

    def __init__(self, num_channels: int, hidden_channels: int, affine: bool = True, dropout: float = 0.0,
                 padding: str = "zero"):
        super().__init__()
        self.affine = affine
        self.n_a = num_channels // 2
        n_b = num_channels - self.n_a
        edge = padding == "edge"
        self.nn = nn.Sequential(
            ConvActNorm(self.n_a, hidden_channels, 3, edge=edge),
            nn.ReLU(inplace=True),
            ConvActNorm(hidden_channels, hidden_channels, 1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            ZeroConv2d(hidden_channels, 2 * n_b if affine else n_b, edge=edge),
        )
        self.autocast_dtype: torch.dtype | None = None

    def _net(self, x_a: torch.Tensor) -> torch.Tensor:
        if x_a.device.type == "cpu" and x_a.dtype in _CHANNELS_LAST_DTYPES:
            # oneDNN's CPU convolutions are much faster on channels-last (NHWC) activations; the
            # network's output keeps that layout, which the elementwise coupling ops accept as is.
            x_a = x_a.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            return self.nn(x_a)
        with torch.autocast(x_a.device.type, dtype=self.autocast_dtype):
            return self.nn(x_a).to(x_a.dtype)

    def _shift_logscale(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # shift = h[:, 0::2], scale logits = h[:, 1::2], as views whose backward is one stack
        shift, logits = self._net(x_a).unflatten(1, (-1, 2)).unbind(2)
        return shift, F.logsigmoid(logits + 2.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x.split([self.n_a, x.shape[1] - self.n_a], 1)  # views; backward is one cat
        if not self.affine:
            y_b = x_b + self._net(x_a)
            return torch.cat([x_a, y_b], 1), x.new_zeros(x.shape[0], dtype=logdet_dtype(x))
        shift, log_scale = self._shift_logscale(x_a)
        y_b = (x_b + shift) * torch.exp(log_scale)
        return torch.cat([x_a, y_b], 1), log_scale.to(logdet_dtype(x)).sum(dim=(1, 2, 3))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y.split([self.n_a, y.shape[1] - self.n_a], 1)
        if not self.affine:
            return torch.cat([y_a, y_b - self._net(y_a)], 1)
        shift, log_scale = self._shift_logscale(y_a)
        return torch.cat([y_a, y_b * torch.exp(-log_scale) - shift], 1)


class FlowStep(nn.Module):
    """One step of flow: ActNorm -> permutation (1x1 conv, shuffle or reverse) -> coupling."""

    def __init__(self, num_channels: int, hidden_channels: int, coupling: str = "affine",
                 permutation: str = "invconv", lu: bool = True, dropout: float = 0.0, padding: str = "zero"):
        super().__init__()
        self.actnorm = ActNorm(num_channels)
        if permutation == "invconv":
            self.permute: nn.Module = InvConv1x1(num_channels, lu=lu)
        else:
            self.permute = Permute(num_channels, permutation)
        self.coupling = Coupling(num_channels, hidden_channels, affine=coupling == "affine", dropout=dropout,
                                 padding=padding)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, logdet = self.actnorm(x)
        x, ld = self.permute(x)
        logdet = logdet + ld
        x, ld = self.coupling(x)
        return x, logdet + ld

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y = self.coupling.inverse(y)
        y = self.permute.inverse(y)
        return self.actnorm.inverse(y)
