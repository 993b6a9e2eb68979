"""The convolutions inside the coupling networks and priors: the official "SAME" convolution with an
optional edge channel (:func:`conv2d_same`, :func:`edge_image`), :class:`ZeroConv2d` (the
zero-initialised last layer of every network and prior), :class:`ConvActNorm` (a convolution then
ActNorm), :class:`LinearZeros` (class embeddings), :class:`CouplingNetwork` (the network of a
coupling layer) and :func:`full_precision_convolutions` (cuDNN without TF32).

None of these layers is invertible; each scales its weights by ``exp(3·logs)`` rather than its
output. The 3x3 convolutions pad as the official ones (zeros plus an "edge" channel marking the
border) or with zeros only (``padding="zero"``, as the PyTorch ports).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .actnorm import LOGSCALE_FACTOR, ActNorm

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


def full_precision_convolutions(x: torch.Tensor):
    """cuDNN's float32 convolutions without TF32 for CUDA inputs (a no-op elsewhere). The inverse of a
    coupling recomputes its network on a reconstructed input that carries float rounding; in TF32
    (a 10-bit mantissa, on by default in cuDNN) that rounding flips the network's own roundings and
    the reconstruction error grows to ~1e-3 over a trained level (measured on an H200). In float32
    the flow inverts as on the CPU. bf16/fp16 networks (``autocast_dtype``) are a choice of speed."""
    if x.device.type != "cuda":
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


class CouplingNetwork(nn.Sequential):
    """A coupling network: ConvActNorm (3x3), ReLU, ConvActNorm (1x1), ReLU, Dropout, ZeroConv2d
    (an ``nn.Sequential``, so the state_dict keys are the layers' indices)."""

    def forward(self, x: torch.Tensor, net: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """From ``net`` (its scaled weights from :func:`torchglow.fold.fold_networks`) when given and no ActNorm of
        it waits for its data-dependent initialisation (which needs the raw convolution outputs),
        else layer by layer."""
        first, _, hidden, _, dropout, _ = self
        if net is None or first.actnorm._init_pending or hidden.actnorm._init_pending:
            return super().forward(x)
        w1, b1, w2, b2, w3, b3 = net
        h = F.relu(conv2d_same(x, w1, b1), inplace=True)
        h = dropout(F.relu(conv2d_same(h, w2, b2), inplace=True))
        return conv2d_same(h, w3, b3)
