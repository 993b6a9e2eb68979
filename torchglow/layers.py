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

A :class:`FlowStep` runs its ActNorm and 1x1 convolution as one folded 1x1 convolution with a bias
(:func:`fold_steps`, batched over the K steps of a level), in float64 on CUDA so that TF32 never
touches the invertible part; the parameters are those of the separate layers. The scales of the
coupling networks' convolutions are likewise folded into their weights for the K steps of a level
at once (:func:`fold_networks`).
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


def linear_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of the 1x1 convolutions' weights and arithmetic: float64 on CUDA, where cuDNN and
    cuBLAS would otherwise run float32 in TF32 (a 10-bit mantissa, compounded over the K steps of
    a level) whatever the caller set, else the parameters' own dtype (float32 on the CPU is exact)."""
    return torch.float64 if t.device.type == "cuda" else t.dtype


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight·x + bias`` at every pixel (``weight`` (C_out, C_in, 1, 1), ``bias`` (C_out,)), in
    ``weight``'s dtype and outside any autocast region (a bf16 1x1 convolution is not invertible to
    float precision); the result in ``x``'s dtype. The weight comes shaped for the convolution: a
    reshape inside a compiled flow step, of a weight with dynamic sizes, trips inductor."""
    with torch.autocast(x.device.type, enabled=False):
        y = F.conv2d(x.to(weight.dtype), weight, bias)
    return y.to(x.dtype)


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution ``y = W x`` over channels, log-det ``H·W·log|det W|``.

    ``W`` starts as a random rotation (Q of the QR of a Gaussian). With ``lu=True`` it is
    parametrised as ``W = P·(L + I)·(U + diag(sign·exp(log_s)))`` with fixed P and sign, and the
    log-det is ``H·W·Σ log_s``; the inverse then comes from triangular solves with the factors.
    Without LU the log-det is computed in float64 as in the official code. :meth:`matrices` and
    :meth:`inverse_matrices` compute ``W`` and ``W⁻¹`` of several layers (the K steps of a level)
    as one batched product; in a :class:`FlowStep` they are folded with the ActNorm before them.
    """

    def __init__(self, num_channels: int, lu: bool = True):
        super().__init__()
        self.lu = lu
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

    @staticmethod
    def _stack(convs, name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.stack([getattr(c, name) for c in convs]).to(dtype)

    @staticmethod
    def _lu_factors(convs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``L + I`` and ``U + diag(sign·exp(log_s))`` of each layer, (K, C, C)."""
        first, stack = convs[0], InvConv1x1._stack
        mask, eye = first.lower_mask.to(dtype), first.eye.to(dtype)
        lower = torch.addcmul(eye, stack(convs, "lower", dtype), mask)
        # the diagonal as eye·(sign·exp(log_s)) broadcast over rows: one op, no diag_embed
        diag = stack(convs, "sign_s", dtype) * torch.exp(stack(convs, "log_s", dtype))
        upper = torch.addcmul(stack(convs, "upper", dtype) * mask.T, eye, diag[:, None, :])
        return lower, upper

    @staticmethod
    def matrices(convs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``W`` (K, C, C) of each layer in ``convs`` (all alike) and ``log|det W|`` (K,), in ``dtype``."""
        if not convs[0].lu:
            w = InvConv1x1._stack(convs, "weight", dtype)
            return w, torch.linalg.slogdet(w.double())[1].to(dtype)
        lower, upper = InvConv1x1._lu_factors(convs, dtype)
        perm = InvConv1x1._stack(convs, "perm", dtype)
        return perm @ lower @ upper, InvConv1x1._stack(convs, "log_s", dtype).sum(-1)

    @staticmethod
    def inverse_matrices(convs) -> torch.Tensor:
        """``W⁻¹`` (K, C, C) of each layer, in float64 so that it is accurate to float32 rounding:
        ``U⁻¹·L⁻¹·Pᵀ`` by triangular solves with LU, else a float64 inverse."""
        if not convs[0].lu:
            # inv_ex: no host sync to check for singular matrices (a flow's W is invertible)
            return torch.linalg.inv_ex(InvConv1x1._stack(convs, "weight", torch.float64))[0]
        lower, upper = InvConv1x1._lu_factors(convs, torch.float64)
        eye = convs[0].eye.double()
        l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        u_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return u_inv @ l_inv @ InvConv1x1._stack(convs, "perm", torch.float64).mT

    @property
    def _anchor(self) -> torch.Tensor:
        """A parameter: the device and dtype of the layer."""
        return self.log_s if self.lu else self.weight

    def weight_matrix(self) -> torch.Tensor:
        return self.matrices([self], self._anchor.dtype)[0][0]

    def logabsdet(self) -> torch.Tensor:
        return self.matrices([self], self._anchor.dtype)[1][0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            w, logabsdet = self.matrices([self], linear_dtype(self._anchor))
        logdet = (x.shape[2] * x.shape[3]) * logabsdet[0].to(logdet_dtype(x))
        return conv1x1(x, w[0, :, :, None, None]), logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inv = self.inverse_matrices([self])[0, :, :, None, None]
        return conv1x1(y, w_inv.to(linear_dtype(self._anchor)))


class Permute(nn.Module):
    """Fixed channel permutation (``"reverse"`` or a seeded random ``"shuffle"``); log-det 0.

    As a matrix (:meth:`matrices`) it is ``W = I[perm]``, so that a :class:`FlowStep` folds it with
    its ActNorm into one 1x1 convolution as it does an :class:`InvConv1x1`."""

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

    @staticmethod
    def matrices(perms, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``W = I[perm]`` (K, C, C) (row i picks channel perm[i]) and its log|det| 0 (K,)."""
        index = torch.stack([p.perm for p in perms])
        # rows of the identity picked by index (one_hot would check the indices on the host)
        w = torch.eye(index.shape[1], dtype=dtype, device=index.device)[index]
        return w, w.new_zeros(len(perms))

    @staticmethod
    def inverse_matrices(perms) -> torch.Tensor:
        return Permute.matrices(perms, torch.float64)[0].mT  # a permutation's inverse is its transpose

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
        """From ``net`` (its scaled weights from :func:`fold_networks`) when given and no ActNorm of
        it waits for its data-dependent initialisation (which needs the raw convolution outputs),
        else layer by layer."""
        first, _, hidden, _, dropout, _ = self
        if net is None or first.actnorm._init_pending or hidden.actnorm._init_pending:
            return super().forward(x)
        w1, b1, w2, b2, w3, b3 = net
        h = F.relu(conv2d_same(x, w1, b1), inplace=True)
        h = dropout(F.relu(conv2d_same(h, w2, b2), inplace=True))
        return conv2d_same(h, w3, b3)


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
        self.nn = CouplingNetwork(
            ConvActNorm(self.n_a, hidden_channels, 3, edge=edge),
            nn.ReLU(inplace=True),
            ConvActNorm(hidden_channels, hidden_channels, 1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            ZeroConv2d(hidden_channels, 2 * n_b if affine else n_b, edge=edge),
        )
        self.autocast_dtype: torch.dtype | None = None

    def _net(self, x_a: torch.Tensor, net: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        if x_a.device.type == "cpu" and x_a.dtype in _CHANNELS_LAST_DTYPES:
            # oneDNN's CPU convolutions are much faster on channels-last (NHWC) activations; the
            # network's output keeps that layout, which the elementwise coupling ops accept as is.
            x_a = x_a.contiguous(memory_format=torch.channels_last)
        # the coupling arithmetic runs in the input's precision even under an outer autocast (where
        # exp(-log s) rounded to bf16 would not undo exp(log s))
        if self.autocast_dtype is None:
            with full_precision_convolutions(x_a):
                return self.nn(x_a, net).to(x_a.dtype)
        with torch.autocast(x_a.device.type, dtype=self.autocast_dtype):
            return self.nn(x_a, net).to(x_a.dtype)

    def _shift_scale(self, x_a: torch.Tensor, net: tuple[torch.Tensor, ...] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        # shift = h[:, 0::2], scale = sigmoid(h[:, 1::2] + 2), from views whose backward is one stack
        shift, logits = self._net(x_a, net).unflatten(1, (-1, 2)).unbind(2)
        return shift, torch.sigmoid(logits + 2.0)

    def forward(self, x: torch.Tensor, net: tuple[torch.Tensor, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``net``: the network's scaled weights from :func:`fold_networks`; computed here otherwise."""
        x_a, x_b = x.split([self.n_a, x.shape[1] - self.n_a], 1)  # views; backward is one cat
        if not self.affine:
            y_b = x_b + self._net(x_a, net)
            return torch.cat([x_a, y_b], 1), x.new_zeros(x.shape[0], dtype=logdet_dtype(x))
        shift, scale = self._shift_scale(x_a, net)
        # the log-det as the official code takes it, the log of the scale: elementwise ops that
        # read the strided half of h as it is (the CPU's logsigmoid would copy it first)
        y_b = (x_b + shift) * scale
        return torch.cat([x_a, y_b], 1), torch.log(scale).sum(dim=(1, 2, 3), dtype=logdet_dtype(x))

    def inverse(self, y: torch.Tensor, net: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        y_a, y_b = y.split([self.n_a, y.shape[1] - self.n_a], 1)
        if not self.affine:
            return torch.cat([y_a, y_b - self._net(y_a, net)], 1)
        shift, scale = self._shift_scale(y_a, net)
        return torch.cat([y_a, y_b / scale - shift], 1)


def tensor_version(t: torch.Tensor) -> tuple[int, int]:
    """What changes when ``t``'s values change in place: its version counter (optimiser steps,
    ``load_state_dict``) and, for a parameter made a slice of one flat vector
    (:func:`torchglow.step.flatten_parameters`, which records the vector in ``_flat_base``), that
    vector's counter: ``p.data = view`` gives ``p`` a counter of its own, which updates of the
    whole vector do not bump."""
    base = getattr(t, "_flat_base", None)
    flat = base() if base is not None else None
    return t._version, -1 if flat is None else flat._version


class FlowStep(nn.Module):
    """One step of flow: ActNorm -> permutation (1x1 conv, shuffle or reverse) -> coupling.

    ActNorm then the permutation ``W`` is one affine map per pixel, run as ONE 1x1 convolution with
    a bias: forward ``W·diag(s)·x + W·diag(s)·b`` (``s = exp(logs)``, ``b`` the ActNorm bias), log-det
    ``H·W·(Σ logs + log|det W|)``; inverse ``diag(1/s)·W⁻¹·y - b``. Only while the ActNorm waits for
    its data-dependent initialisation (which needs its raw input) do the two run one after the
    other. The parameters are those of the separate layers (:func:`fold_steps` folds them).

    The inverse's weights are cached in the non-persistent buffers ``inverse_weight`` and
    ``inverse_bias`` (see :meth:`refresh_inverse`) and used whenever no gradient is needed.
    """

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
        self.register_buffer("inverse_weight", None, persistent=False)
        self.register_buffer("inverse_bias", None, persistent=False)
        self._inverse_key: tuple | None = None

    def forward(self, x: torch.Tensor, folded: tuple[torch.Tensor, ...] | None = None,
                net: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``folded``: this step's ``(weight, bias, logdet)`` from :func:`fold_steps` and ``net`` its
        coupling network's scaled weights from :func:`fold_networks`, when the level folded all its
        steps at once; computed here otherwise."""
        if self.actnorm._init_pending:
            x, logdet = self.actnorm(x)
            x, ld = self.permute(x)
            y, ld_coupling = self.coupling(x)
            return y, logdet + ld + ld_coupling
        weight, bias, logdet = fold_steps([self], x)[0] if folded is None else folded
        y, ld_coupling = self.coupling(conv1x1(x, weight, bias), fold_networks([self])[0] if net is None else net)
        return y, ld_coupling + logdet

    def inverse(self, y: torch.Tensor, folded: tuple[torch.Tensor, torch.Tensor] | None = None,
                net: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``folded``: this step's ``(weight, bias)`` from :func:`inverse_weights` and ``net`` as in
        :meth:`forward`; else found here."""
        weight, bias = inverse_weights([self])[0] if folded is None else folded
        return conv1x1(self.coupling.inverse(y, fold_networks([self])[0] if net is None else net), weight, bias)

    def refresh_inverse(self) -> None:
        """(Re)compute the cached inverse weights ``diag(1/s)·W⁻¹`` and bias ``-b`` from the current
        parameters, in place: after the first call the buffers keep their storage (while device and
        dtype do), so a captured CUDA graph that reads them stays valid when they are refreshed
        outside it after the weights change. :meth:`inverse` refreshes stale caches by itself."""
        refresh_inverses([self])

    def _fold_key(self) -> tuple:
        tensors = (*self.actnorm.parameters(), *self.permute.parameters(), *self.permute.buffers())
        return tuple((*tensor_version(t), t.data_ptr(), t.device, t.dtype) for t in tensors)

    def _store_inverse(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        current = self.inverse_weight
        layout = (weight.shape, weight.dtype, weight.device)
        if current is None or (current.shape, current.dtype, current.device) != layout:
            self.inverse_weight, self.inverse_bias = weight.clone(), bias.clone()
        else:
            self.inverse_weight.copy_(weight)
            self.inverse_bias.copy_(bias)
        self._inverse_key = self._fold_key()


def _stacked(modules, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The (1, C, 1, 1) ActNorm tensors ``name`` of ``modules`` as (K, C) in ``dtype``."""
    return torch.stack([getattr(m, name) for m in modules]).to(dtype).flatten(1)


def fold_steps(steps, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each step's ActNorm and permutation folded into one 1x1 convolution, for the K steps of a
    level (all alike) as batched products: ``(weight (C, C, 1, 1), bias (C,), logdet)`` per step with
    ``weight = W·diag(s)``, ``bias = W·diag(s)·b`` and the per-sample log-det ``H·W·(Σ logs +
    log|det W|)`` of input ``x`` (B, C, H, W), in :func:`linear_dtype` (log-det: :func:`logdet_dtype`)."""
    anchor = steps[0].actnorm.logs
    dtype = linear_dtype(anchor)
    actnorms = [s.actnorm for s in steps]
    with torch.autocast(anchor.device.type, enabled=False):
        logs = _stacked(actnorms, "logs", dtype) * LOGSCALE_FACTOR  # (K, C)
        w, logabsdet = type(steps[0].permute).matrices([s.permute for s in steps], dtype)  # (K, C, C), (K,)
        w = w * torch.exp(logs)[:, None, :]  # scales the columns: W·diag(s)
        bias = (w @ _stacked(actnorms, "bias", dtype)[:, :, None])[:, :, 0]  # (K, C)
        logdet = ((logs.sum(-1) + logabsdet) * (x.shape[2] * x.shape[3])).to(logdet_dtype(x))
    return list(zip(w[..., None, None].unbind(0), bias.unbind(0), logdet.unbind(0)))


def _scaled_convs(convs, logs: list[torch.Tensor], biases: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight·s, bias·s)`` with ``s = exp(3·logs)`` per output channel for K convolutions at once:
    ``(K, out, in, k, k)`` and ``(K, out)``, elementwise the products each layer computes alone."""
    scale = torch.exp(torch.stack(logs) * LOGSCALE_FACTOR).reshape(len(convs), -1)  # (K, out)
    weight = torch.stack([c.weight for c in convs]) * scale[:, :, None, None, None]
    return weight, torch.stack(biases).reshape(len(convs), -1) * scale


def fold_networks(steps) -> list[tuple[torch.Tensor, ...]]:
    """The scaled weights ``(w1, b1, w2, b2, w3, b3)`` of each step's coupling network, for the K
    steps of a level at once: the two :class:`ConvActNorm` layers as ``conv(x, W·s) + b·s`` with their
    ActNorm's ``s = exp(3·logs)`` and bias ``b``, the :class:`ZeroConv2d` as ``conv(x, W·s) + b·s``
    with its own ``s`` and bias, in the parameters' dtype (elementwise the same products as
    :meth:`ConvActNorm.forward` and :meth:`ZeroConv2d.forward`, a few batched operations per level
    instead of a dozen per step). :meth:`Coupling.forward` uses them while no ActNorm of the network
    waits for its initialisation."""
    nets = [s.coupling.nn for s in steps]
    with torch.autocast(steps[0].actnorm.logs.device.type, enabled=False):
        folded = []
        for i in (0, 2):  # the ConvActNorm layers
            layers = [n[i] for n in nets]
            folded += _scaled_convs([m.conv for m in layers], [m.actnorm.logs for m in layers],
                                    [m.actnorm.bias for m in layers])
        last = [n[-1] for n in nets]
        folded += _scaled_convs([m.conv for m in last], [m.logs for m in last], [m.conv.bias for m in last])
    return list(zip(*(t.unbind(0) for t in folded)))


def fold_inverses(steps) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's inverse, ``x = diag(1/s)·W⁻¹·y - b``, as ``(weight (C, C, 1, 1), bias (C,))`` of one 1x1
    convolution, computed afresh for the K steps of a level at once (W⁻¹ in float64, the results
    in :func:`linear_dtype`)."""
    anchor = steps[0].actnorm.logs
    actnorms = [s.actnorm for s in steps]
    with torch.autocast(anchor.device.type, enabled=False):
        w_inv = type(steps[0].permute).inverse_matrices([s.permute for s in steps])  # (K, C, C)
        # scales the rows: diag(1/s)·W⁻¹
        w_inv = w_inv * torch.exp(_stacked(actnorms, "logs", torch.float64) * -LOGSCALE_FACTOR)[:, :, None]
        dtype = linear_dtype(anchor)
        w_inv = w_inv.to(dtype)[..., None, None]
        return list(zip(w_inv.unbind(0), (-_stacked(actnorms, "bias", dtype)).unbind(0)))


@torch.no_grad()
def refresh_inverses(steps) -> None:
    """:meth:`FlowStep.refresh_inverse` for the K steps of a level, as one batched computation."""
    for step, (w, b) in zip(steps, fold_inverses(steps)):
        step._store_inverse(w, b)


def inverse_weights(steps) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(weight, bias)`` of each step's folded inverse 1x1 convolution: :func:`fold_inverses` when
    a gradient is needed, else the cached buffers, refreshed first where the parameters changed
    since (so decoding with fixed weights computes no inverse at all)."""
    if torch.is_grad_enabled() and any(p.requires_grad for s in steps
                                       for p in (*s.actnorm.parameters(), *s.permute.parameters())):
        return fold_inverses(steps)
    refresh_stale_inverses(steps)
    return [(s.inverse_weight, s.inverse_bias) for s in steps]


def refresh_stale_inverses(steps) -> None:
    """:func:`refresh_inverses` if the parameters of any of ``steps`` changed since their caches were
    computed (a few attribute reads per step when none did)."""
    if any(s._inverse_key != s._fold_key() for s in steps):
        refresh_inverses(steps)
