"""Folding: the flow's linear maps run as few, batched 1x1 convolutions, and the cached inverses.

A :class:`~torchglow.layers.FlowStep`'s ActNorm and permutation are one affine map per pixel,
folded into one 1x1 convolution with a bias (:func:`fold_steps`, batched over the K steps of a
level), in float64 on CUDA (:func:`linear_dtype`) so that TF32 never touches the invertible part;
the parameters stay those of the separate layers. The scales of the coupling networks'
convolutions are likewise folded into their weights for the K steps of a level at once
(:func:`fold_networks`). The folded inverses (:func:`fold_inverses`) are cached in each step's
``inverse_weight`` and ``inverse_bias`` buffers and recomputed only when the parameters changed
(:func:`inverse_weights`, :func:`refresh_inverses`, keyed by :func:`tensor_version`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .actnorm import LOGSCALE_FACTOR, logdet_dtype

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


def tensor_version(t: torch.Tensor) -> tuple[int, int]:
    """What changes when ``t``'s values change in place: its version counter (optimiser steps,
    ``load_state_dict``) and, for a parameter made a slice of one flat vector
    (:func:`torchglow.train.step.flatten_parameters`, which records the vector in ``_flat_base``), that
    vector's counter: ``p.data = view`` gives ``p`` a counter of its own, which updates of the
    whole vector do not bump."""
    base = getattr(t, "_flat_base", None)
    flat = base() if base is not None else None
    return t._version, -1 if flat is None else flat._version


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
    steps of a level at once: the two :class:`~torchglow.networks.ConvActNorm` layers as
    ``conv(x, W·s) + b·s`` with their ActNorm's ``s = exp(3·logs)`` and bias ``b``, the
    :class:`~torchglow.networks.ZeroConv2d` as ``conv(x, W·s) + b·s`` with its own ``s`` and bias, in
    the parameters' dtype (elementwise the same products as their ``forward``, a few batched
    operations per level instead of a dozen per step). :meth:`torchglow.layers.Coupling.forward`
    uses them while no ActNorm of the network waits for its initialisation."""
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


def parameter_key(step) -> tuple:
    """What the cached inverse of ``step`` depends on: the version, storage, device and dtype of its
    ActNorm's and permutation's tensors."""
    tensors = (*step.actnorm.parameters(), *step.permute.parameters(), *step.permute.buffers())
    return tuple((*tensor_version(t), t.data_ptr(), t.device, t.dtype) for t in tensors)


def _store_inverse(step, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Into ``step``'s buffers in place while their layout holds (a captured CUDA graph reads them)."""
    current = step.inverse_weight
    layout = (weight.shape, weight.dtype, weight.device)
    if current is None or (current.shape, current.dtype, current.device) != layout:
        step.inverse_weight, step.inverse_bias = weight.clone(), bias.clone()
    else:
        step.inverse_weight.copy_(weight)
        step.inverse_bias.copy_(bias)
    step.inverse_key = parameter_key(step)


@torch.no_grad()
def refresh_inverses(steps) -> None:
    """:meth:`~torchglow.layers.FlowStep.refresh_inverse` for the K steps of a level, as one batched
    computation."""
    for step, (w, b) in zip(steps, fold_inverses(steps)):
        _store_inverse(step, w, b)


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
    if any(s.inverse_key != parameter_key(s) for s in steps):
        refresh_inverses(steps)
