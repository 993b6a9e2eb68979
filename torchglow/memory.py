"""Memory-saving backward passes for a level of flow steps (``Glow.set_memory``).

Three modes, chosen per model with :meth:`torchglow.Glow.set_memory`:

``"none"``
    Standard autograd: every step keeps its activations for the backward pass. Fastest; the
    activation memory grows linearly with the number of steps K.

``"checkpoint"``
    Per-step gradient checkpointing (``torch.utils.checkpoint``, non-reentrant): only the input of
    each flow step is kept, and the step's forward is run again during backward. Memory is one
    tensor per step plus one step's activations; the cost is one extra forward per step. Gradients
    are those of standard backprop up to floating-point reassociation (bit-identical on CPU).

``"invertible"``
    Invertible backward, as in reversible networks (RevNet, Gomez et al. 2017; i-RevNet; MemCNN):
    the K steps of a level run as one :class:`torch.autograd.Function` whose forward keeps only the
    level's *output*. Backward walks the steps in reverse, reconstructs each step's input from its
    output with ``step.inverse`` and re-runs the step with grad enabled to get the input and
    parameter gradients. Activation memory does not grow with K (one tensor per level plus one
    step's activations during backward); the cost is one inverse and one extra forward per step.

Caveats of ``"invertible"``:

* The inputs used for the gradients are *reconstructions*: their error accumulates over the K
  steps of a level (each inverse adds float rounding, amplified by the steps' conditioning), so
  gradients differ slightly from standard backprop. In float64 the difference is ~1e-12 relative;
  in float32 it is around 1e-5..1e-4 relative (norm of the difference over the norm of the
  gradient) on trained-like models, larger on ill-conditioned ones. ``benchmarks`` / the tests
  measure it (``tests/test_memory.py``).
* ActNorm's data-dependent initialisation mutates parameters during the forward, so it must not
  run inside the Function (the reconstruction would use the new values): whenever grad mode is off
  (``Glow.initialize`` runs under ``torch.no_grad``, as does evaluation) or any ActNorm of the
  level is pending initialisation, the level runs the plain path. The same holds for
  ``"checkpoint"``.
* The flow steps must be deterministic (so no coupling dropout: :func:`check_memory_mode` refuses
  it), and their parameters must not be changed in place between forward and backward (autograd's
  version check cannot see through the Function, which saves no parameter tensors).
* Double backward (gradients of gradients) is not supported.
* Coupling networks under ``coupling.autocast_dtype`` recompute in the same precision (the module
  sets its own autocast); an outer ``torch.autocast`` region active during the forward is
  re-entered for the recomputation, as ``torch.utils.checkpoint`` does.
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import MEMORY_MODES, ConfigError
from .actnorm import ActNorm
from .fold import fold_inverses, fold_networks, fold_steps


def check_memory_mode(mode: str, dropout: float = 0.0) -> str:
    """Return ``mode`` if it is one of :data:`MEMORY_MODES` and works with the coupling ``dropout``,
    else raise ValueError (ConfigError for the dropout conflict)."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {mode!r}")
    if mode == "invertible" and dropout > 0:
        # the backward re-runs each coupling network, which would draw another dropout mask
        raise ConfigError("memory='invertible' cannot be used with dropout > 0: use memory='checkpoint'")
    return mode


# ActNorms of each level (ModuleList of FlowSteps), found once: checking their Python flags is then
# a few attribute reads per forward. Keyed weakly by the level; the step ids guard against a level
# whose steps were replaced after the first call.
_ACTNORMS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], list[ActNorm]]]" = weakref.WeakKeyDictionary()


def _level_actnorms(steps: nn.ModuleList) -> list[ActNorm]:
    key = tuple(id(s) for s in steps)
    cached = _ACTNORMS.get(steps)
    if cached is None or cached[0] != key:
        cached = (key, [m for m in steps.modules() if isinstance(m, ActNorm)])
        _ACTNORMS[steps] = cached
    return cached[1]


def init_pending(steps: nn.ModuleList) -> bool:
    """True if an ActNorm of ``steps`` will initialise itself on its next forward (a Python flag
    set by :func:`torchglow.actnorm.initializing`; reading it never syncs a device)."""
    return any(m._init_pending for m in _level_actnorms(steps))


def _sum_logdets(logdets: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(logdets).sum(0)  # two ops whatever K, not K additions


def forward_plain(steps, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard autograd: ``z`` through every step, log-dets summed, shape (B,). The ActNorms and
    1x1 convolutions of all steps are folded at once (:func:`torchglow.fold.fold_steps`), and so
    are the scales of their coupling networks (:func:`torchglow.fold.fold_networks`)."""
    logdets = []
    for step, folded, net in zip(steps, fold_steps(steps, z), fold_networks(steps)):
        z, ld = step(z, folded, net)
        logdets.append(ld)
    return z, _sum_logdets(logdets)


def forward_checkpointed(steps, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each step under non-reentrant gradient checkpointing: only its input (and its share of the
    level's folded weights) is saved."""
    logdets = []
    for step, folded, net in zip(steps, fold_steps(steps, z), fold_networks(steps)):
        z, ld = checkpoint(step, z, folded, net, use_reentrant=False)
        logdets.append(ld)
    return z, _sum_logdets(logdets)


# After the backward of a level, its reconstructed input is compared with a sample of the true one
# (one device sync per level and backward); set False to skip the check.
CHECK_RECONSTRUCTION = True
FINGERPRINT_SIZE = 4096


class ReconstructionWarning(RuntimeWarning):
    """The invertible backward reconstructed a level's input with a large error: the flow is not
    numerically invertible at these inputs, and its gradients are inaccurate."""


def _check_reconstruction(x_rec: torch.Tensor, fingerprint: torch.Tensor, stride: int) -> None:
    """Warn when the reconstructed level input is off by more than sqrt(eps) relative (or is not
    finite). Non-finite reconstructions give non-finite gradients, which training loops that skip
    non-finite steps handle; a large finite error would otherwise go unnoticed."""
    sample = x_rec.reshape(-1)[::stride].to(fingerprint.dtype)
    scale = fingerprint.abs().max()
    err = torch.where(torch.isfinite(sample).all(), (sample - fingerprint).abs().max(), torch.inf)
    err, scale = (float(v) for v in torch.stack([err, scale]).tolist())
    if not math.isfinite(scale):
        return  # the forward itself was not finite: nothing to compare with
    rel = err / max(scale, torch.finfo(fingerprint.dtype).tiny)
    if rel > torch.finfo(fingerprint.dtype).eps ** 0.5:
        warnings.warn(
            f"memory='invertible': a level's input was reconstructed with relative error {rel:.3g} "
            f"(the flow is not numerically invertible here), so the gradients are inaccurate; "
            f"memory='checkpoint' gives exact gradients", ReconstructionWarning, stacklevel=2)


class _InvertibleSteps(torch.autograd.Function):
    """``(y, logdet) = steps(x)`` keeping only ``y``; backward reconstructs inputs by inversion.

    ``forward(ctx, x, steps, counts, *params)``: ``params`` are the parameters of all steps in
    order, ``counts[k]`` how many belong to step k. They are inputs of the Function so that autograd
    (and DDP's gradient hooks, and any optimiser) see their gradients, which backward returns.
    """

    @staticmethod
    def forward(ctx, x, steps, counts, *params):
        with torch.no_grad():
            y, logdet = forward_plain(steps, x)
        ctx.steps = steps
        ctx.counts = counts
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type),
                        torch.get_autocast_dtype(device_type))
        # A strided sample of at most FINGERPRINT_SIZE input values (a copy, so x can be freed)
        # to measure the reconstruction error in backward; constant size, like y.
        flat = x.detach().reshape(-1)
        ctx.stride = max(1, -(-flat.numel() // FINGERPRINT_SIZE))
        ctx.save_for_backward(y, flat[:: ctx.stride].clone())
        return y, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_logdet):
        y, fingerprint = ctx.saved_tensors
        steps, counts = ctx.steps, ctx.counts
        needs = ctx.needs_input_grad  # (x, steps, counts, *params)
        n_params = len(needs) - 3
        param_grads: list[torch.Tensor | None] = [None] * n_params
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        # Parameters are ordered step by step: the last step's are at the end.
        end = n_params
        y = y.detach()
        grad_y = grad_y.contiguous()
        with torch.no_grad():
            # the level's inverse weights afresh, not the steps' caches: their Python staleness
            # check would be frozen into a captured CUDA graph of the training step
            inverses = fold_inverses(steps)
            nets = fold_networks(steps)
        for k in range(len(steps) - 1, -1, -1):
            step, start = steps[k], end - counts[k]
            step_params = [p for p in step.parameters()]
            wanted = [i for i in range(start, end) if needs[3 + i]]
            need_x = k > 0 or needs[0]
            with torch.autocast(device_type, enabled=autocast_enabled, dtype=autocast_dtype):
                with torch.no_grad():
                    x = step.inverse(y, inverses[k], nets[k])
                x = x.detach().requires_grad_(need_x)
                with torch.enable_grad():
                    y_re, ld = step(x)
            inputs = ([x] if need_x else []) + [step_params[i - start] for i in wanted]
            if inputs:
                grads = torch.autograd.grad((y_re, ld), inputs, (grad_y, grad_logdet), allow_unused=True)
            else:
                grads = ()
            if need_x:
                grad_y = grads[0]
                if grad_y is None:  # cannot happen for an invertible step; be safe
                    grad_y = torch.zeros_like(x)
                grads = grads[1:]
            for i, g in zip(wanted, grads):
                param_grads[i] = g
            y = x.detach()
            end = start
            del y_re, ld, x
        if CHECK_RECONSTRUCTION:
            _check_reconstruction(y, fingerprint, ctx.stride)
        grad_x = grad_y if needs[0] else None
        return (grad_x, None, None, *param_grads)


def forward_invertible(steps, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All steps of a level as one :class:`_InvertibleSteps` (memory independent of K)."""
    params: list[torch.Tensor] = []
    counts: list[int] = []
    for step in steps:
        ps = list(step.parameters())
        params.extend(ps)
        counts.append(len(ps))
    return _InvertibleSteps.apply(z, steps, counts, *params)


def forward_steps(steps, z: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One level's flow steps forward in memory ``mode`` (validated by :meth:`Glow.set_memory`):
    ``(z, logdet (B,))``.

    The memory-saving modes fall back to the plain path when grad mode is off (nothing is saved
    anyway), when a level has no steps, or while an ActNorm of the level is pending its
    data-dependent initialisation (which must run exactly once, in a plain forward).
    """
    if mode == "none":  # first: no Python state read, so a compiled forward has nothing to guard
        return forward_plain(steps, z)
    check_memory_mode(mode)  # a memory_mode set around set_memory
    if not torch.is_grad_enabled() or len(steps) == 0 or init_pending(steps):
        return forward_plain(steps, z)
    return _SAVING_FORWARDS[mode](steps, z)


_SAVING_FORWARDS = {"checkpoint": forward_checkpointed, "invertible": forward_invertible}
