"""Shared checks for invertible layers: exact inverse, and log-det against a brute-force Jacobian."""

import torch
import torch.nn.functional as F
from torch import nn

from torchglow.layers import InvConv1x1


@torch.no_grad()
def perturb(module: nn.Module, scale: float = 0.1) -> None:
    """Move every parameter away from its (often identity) initialisation and mark ActNorms as
    initialised, so that invertibility and log-det tests are not trivially about the identity."""
    for p in module.parameters():
        p.add_(scale * torch.randn_like(p))
    for name, b in module.named_buffers():
        if name.endswith("initialized"):
            b.fill_(True)


@torch.no_grad()
def assert_invertible(layer: nn.Module, x: torch.Tensor, rtol: float) -> None:
    y, logdet = layer(x)
    assert logdet.shape == (x.shape[0],)
    assert not torch.allclose(y, x), "the layer is the identity: perturb it first"
    x_rec = layer.inverse(y)
    err = (x_rec - x).abs().max() / x.abs().max()
    assert err < rtol, f"relative reconstruction error {err:.3g} >= {rtol}"


def jacobian_logabsdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at each sample of x (float64), from the full autograd Jacobian."""
    out = []
    for xi in x:
        j = torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0)).reshape(-1), xi)
        out.append(torch.linalg.slogdet(j.reshape(xi.numel(), xi.numel()))[1])
    return torch.stack(out)


def assert_logdet_matches_jacobian(layer: nn.Module, x: torch.Tensor, atol: float = 1e-8) -> None:
    _, logdet = layer(x)
    expected = jacobian_logabsdet(lambda v: layer(v)[0], x)
    torch.testing.assert_close(logdet.detach(), expected, atol=atol, rtol=1e-9)


def invconv_matrix(conv: InvConv1x1) -> torch.Tensor:
    """W of a 1x1 convolution from its parameters: ``P·(L + I)·(U + diag(sign·exp(log_s)))`` with LU."""
    if not conv.lu:
        return conv.weight
    lower = torch.tril(conv.lower, -1) + torch.eye(len(conv.log_s), dtype=conv.lower.dtype)
    upper = torch.triu(conv.upper, 1) + torch.diag(conv.sign_s * torch.exp(conv.log_s))
    return conv.perm @ lower @ upper


def reference_conv(x, weight):
    """Official "SAME" convolution: with the edge padding (zeros plus a channel of ones on the
    border, concatenated last) when ``weight`` has one input channel more than ``x``."""
    pad = weight.shape[-1] // 2
    if weight.shape[1] == x.shape[1]:
        return F.conv2d(x, weight, padding=pad)
    border = F.pad(torch.zeros_like(x[:, :1]), (pad,) * 4, value=1.0)
    return F.conv2d(torch.cat([F.pad(x, (pad,) * 4), border], 1), weight)


def reference_network(coupling, x_a):
    """A coupling network (without dropout) layer after layer: convolution, ActNorm ``(h + b)·exp(3·logs)``,
    ReLU, twice, then the zero convolution ``(conv(h) + b)·exp(3·logs)``."""
    first, _, hidden, _, _, last = coupling.nn
    h = x_a
    for layer in (first, hidden):
        h = torch.relu((reference_conv(h, layer.conv.weight) + layer.actnorm.bias) * torch.exp(3 * layer.actnorm.logs))
    return (reference_conv(h, last.conv.weight) + last.conv.bias[:, None, None]) * torch.exp(3 * last.logs)


def reference_coupling(coupling, x, inverse=False):
    """A coupling (forward ``(y, logdet)`` or inverse) from the formulas, its network by :func:`reference_network`."""
    x_a, x_b = x[:, : coupling.n_a], x[:, coupling.n_a :]
    h = reference_network(coupling, x_a)
    if not coupling.affine:
        return torch.cat([x_a, x_b - h if inverse else x_b + h], 1), x.new_zeros(x.shape[0])
    shift, scale = h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2)
    y_b = x_b / scale - shift if inverse else (x_b + shift) * scale
    return torch.cat([x_a, y_b], 1), torch.log(scale).sum(dim=(1, 2, 3))


def unfolded_step(step, x):
    """A flow step's forward from the formulas, layer after layer: ActNorm, permutation, coupling
    (its network too, :func:`reference_coupling`)."""
    s = torch.exp(3 * step.actnorm.logs)
    h = (x + step.actnorm.bias) * s
    if isinstance(step.permute, InvConv1x1):
        w = invconv_matrix(step.permute)
        h, ld_w = torch.einsum("oc,bchw->bohw", w, h), torch.linalg.slogdet(w.double())[1].to(x.dtype)
    else:
        h, ld_w = h[:, step.permute.perm], 0.0
    y, ld_coupling = reference_coupling(step.coupling, h)
    return y, ld_coupling + x.shape[2] * x.shape[3] * (torch.log(s).sum() + ld_w)


def unfolded_step_inverse(step, y):
    """Inverse of :func:`unfolded_step`, layer after layer."""
    h, _ = reference_coupling(step.coupling, y, inverse=True)
    if isinstance(step.permute, InvConv1x1):
        h = torch.einsum("oc,bchw->bohw", torch.linalg.inv(invconv_matrix(step.permute)), h)
    else:
        h = h[:, step.permute.inv_perm]
    return h * torch.exp(-3 * step.actnorm.logs) - step.actnorm.bias
