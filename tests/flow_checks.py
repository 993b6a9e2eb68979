"""Shared checks for invertible layers: exact inverse, and log-det against a brute-force Jacobian."""

import torch
from torch import nn


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
