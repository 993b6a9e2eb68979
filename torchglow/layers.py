"""Invertible layers of Glow: :class:`ActNorm`, :class:`InvConv1x1`, :class:`Permute`,
:class:`Coupling`, :class:`FlowStep`, and the squeeze between levels (:func:`squeeze2d`).

Every flow layer maps ``forward(x) -> (y, logdet)`` and ``inverse(y) -> x`` on (B, C, H, W)
tensors; ``logdet`` is ``log|det dy/dx|`` per sample, shape (B,), in float32. All state lives in
parameters and buffers, so ``load_state_dict`` restores a layer completely.

Numerics follow the official openai/glow code (``model.py``/``tfops.py``): data-dependent ActNorm
with a ``logscale_factor`` of 3 (:mod:`torchglow.actnorm`), the zero-initialised last convolutions
of the coupling networks (:mod:`torchglow.networks`), the sigmoid(h + 2) affine scale and float64
log-determinants of the plain 1x1 convolution. A :class:`FlowStep` runs its ActNorm and
permutation as one folded 1x1 convolution and caches its inverse (:mod:`torchglow.fold`).
"""

from __future__ import annotations

import torch
from torch import nn

from .actnorm import ActNorm, initializing, logdet_dtype
from .fold import conv1x1, fold_networks, fold_steps, inverse_weights, linear_dtype, refresh_inverses
from .networks import ConvActNorm, CouplingNetwork, ZeroConv2d, full_precision_convolutions

__all__ = ["ActNorm", "Coupling", "FlowStep", "InvConv1x1", "Permute", "initializing", "squeeze2d", "unsqueeze2d"]

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
    def _lu_factors(convs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``L + I`` and ``U + diag(sign·exp(log_s))`` of each layer, (K, C, C), and ``log_s`` (K, C)."""
        first, stack = convs[0], InvConv1x1._stack
        mask, eye = first.lower_mask.to(dtype), first.eye.to(dtype)
        lower = torch.addcmul(eye, stack(convs, "lower", dtype), mask)
        # the diagonal as eye·(sign·exp(log_s)) broadcast over rows: one op, no diag_embed
        log_s = stack(convs, "log_s", dtype)
        diag = stack(convs, "sign_s", dtype) * torch.exp(log_s)
        upper = torch.addcmul(stack(convs, "upper", dtype) * mask.T, eye, diag[:, None, :])
        return lower, upper, log_s

    @staticmethod
    def matrices(convs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``W`` (K, C, C) of each layer in ``convs`` (all alike) and ``log|det W|`` (K,), in ``dtype``."""
        if not convs[0].lu:
            w = InvConv1x1._stack(convs, "weight", dtype)
            return w, torch.linalg.slogdet(w.double())[1].to(dtype)
        lower, upper, log_s = InvConv1x1._lu_factors(convs, dtype)
        perm = InvConv1x1._stack(convs, "perm", dtype)
        return perm @ lower @ upper, log_s.sum(-1)

    @staticmethod
    def inverse_matrices(convs) -> torch.Tensor:
        """``W⁻¹`` (K, C, C) of each layer, in float64 so that it is accurate to float32 rounding:
        ``U⁻¹·L⁻¹·Pᵀ`` by triangular solves with LU, else a float64 inverse."""
        if not convs[0].lu:
            # inv_ex: no host sync to check for singular matrices (a flow's W is invertible)
            return torch.linalg.inv_ex(InvConv1x1._stack(convs, "weight", torch.float64))[0]
        lower, upper, _ = InvConv1x1._lu_factors(convs, torch.float64)
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
        self.inverse_key: tuple | None = None  # the parameters' versions the cached inverse was computed from

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
