"""Shared checks for invertible layers: exact inverse, and log-det against a brute-force Jacobian."""

import torch
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


def unfolded_step(step, x):
    """A flow step's forward from the formulas, layer after layer: ActNorm, permutation, coupling."""
    s = torch.exp(3 * step.actnorm.logs)
    h = (x + step.actnorm.bias) * s
    if isinstance(step.permute, InvConv1x1):
        w = invconv_matrix(step.permute)
        h, ld_w = torch.einsum("oc,bchw->bohw", w, h), torch.linalg.slogdet(w.double())[1].to(x.dtype)
    else:
        h, ld_w = h[:, step.permute.perm], 0.0
    y, ld_coupling = step.coupling(h)
    return y, ld_coupling + x.shape[2] * x.shape[3] * (torch.log(s).sum() + ld_w)


def unfolded_step_inverse(step, y):
    """Inverse of :func:`unfolded_step`, layer after layer."""
    h = step.coupling.inverse(y)
    if isinstance(step.permute, InvConv1x1):
        h = torch.einsum("oc,bchw->bohw", torch.linalg.inv(invconv_matrix(step.permute)), h)
    else:
        h = h[:, step.permute.inv_perm]
    return h * torch.exp(-3 * step.actnorm.logs) - step.actnorm.bias
