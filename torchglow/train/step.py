"""The training step: one function from a uint8 batch to updated weights, with no host sync.

:class:`TrainStep` is called once per optimiser step by the trainer and by ``torchglow bench``:

1. dequantisation noise (and augmentation) drawn on the device from a counter-based hash of
   ``(seed, step, element)`` -- no generator, no RNG state: a resumed run, a run on N processes
   and a compiled run all see the noise of an uninterrupted eager run;
2. ``x = preprocess(x_uint8) + u / n_bins``; forward; the objective (:func:`objective`);
3. gradients (``torch.autograd.grad``), averaged across processes under torch.distributed;
4. the global gradient norm, clipping, and the finiteness of loss and gradients (a device bool);
5. the Adamax (or Adam) update, decoupled weight decay and the EMA, *masked*: a non-finite step
   multiplies every change by zero, so weights, moments and EMA stay bit-identical, and counts
   itself in a device counter. fp16 adds a dynamic loss scale, updated on the device.

Everything a step produces stays on the device (counters, the running bits/dim sum, the last
gradient norm, which steps were skipped); the trainer reads it every ``log_every`` steps
(:meth:`TrainStep.read_counters`). Without host syncs or Python branches on data the step can be
compiled whole (``torch.compile(step, fullgraph=True)``) and replayed as a CUDA graph; see
:func:`compile_step`.
"""

from __future__ import annotations

import math
import sys
import weakref
from typing import Any

import torch

from .. import preprocess as pp
from ..config import ConfigError, GlowConfig, TrainConfig
from .. import graphs
from ..graphs import GraphedCall
from ..model import FlowOutput, Glow
from ..noise import AUGMENT, NOISE, counter_uniform, dequantization_noise, rows_of

# fp16 loss scale: torch.amp.GradScaler's defaults
SCALE_INIT, SCALE_GROWTH_INTERVAL = 2.0**16, 2000


# --------------------------------------------------------------------------- augmentation
def shift_and_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, mirrored: torch.Tensor | None) -> torch.Tensor:
    """Translate each image (B, C, H, W) by its integer offsets ``(dy, dx)`` (shapes (B,)) with the
    edge pixels repeated (official: Keras' ``fill_mode="nearest"``), and mirror left-right those
    with ``mirrored``; two gathers with per-image index maps, no loop over the images."""
    _, _, height, width = x.shape
    rows = (torch.arange(height, device=x.device) + dy[:, None]).clamp(0, height - 1)  # (B, H) source rows
    cols = (torch.arange(width, device=x.device) + dx[:, None]).clamp(0, width - 1)  # (B, W) source columns
    if mirrored is not None:
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    x = x.gather(2, rows[:, None, :, None].expand_as(x))
    return x.gather(3, cols[:, None, None, :].expand_as(x))


# --------------------------------------------------------------------------- objective
def objective(out: FlowOutput, y: torch.Tensor | None, config: GlowConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The official training objective: ``(loss, per-sample bits/dim)``, the loss being the mean
    bits/dim plus ``weight_y`` times the classifier's bits of y, ``CE(logits, y) / ln 2``, for
    class-conditional models."""
    bpd = pp.bits_per_dim_from_log_prob(out.log_prob, config.n_dims, config.n_bits)
    loss = bpd.mean()
    if config.num_classes is not None and config.weight_y > 0:
        loss = loss + config.weight_y * torch.nn.functional.cross_entropy(out.y_logits, y) / math.log(2)
    return loss, bpd


def warmup_lr(lr: float, warmup_images: int, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Linear warm-up: ``lr · min(1, (images + batch) / warmup_images)`` (``lr`` without warm-up)."""
    if not warmup_images:
        return torch.full((), lr, device=images.device)
    return lr * ((images + batch_size).to(torch.float32) / warmup_images).clamp(max=1.0)


# --------------------------------------------------------------------------- the step
def flatten_parameters(params: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous vector holding ``params`` in order; each parameter becomes a view of its slice
    (``p.data``), so in-place changes of the vector are changes of the parameters and back.
    (Moving the module to another device or dtype afterwards breaks the link.) Each parameter
    keeps a weak reference to the vector (``_flat_base``): updates of the vector bump the vector's
    version counter, not the parameter's, and caches of values computed from the parameters (the
    1x1 inverses, :func:`torchglow.fold.tensor_version`) must see them."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view(p.shape)
        p._flat_base = weakref.ref(flat)
        offset += p.numel()
    return flat


class TrainStep:
    """The whole training step of ``model`` and its state on the model's device.

    Optimiser: Adamax ``m ← β1·m + (1-β1)·g``, ``u ← max(β2·u, |g| + ε)``,
    ``p ← p·(1 - lr·wd) - lr/(1-β1ᵗ)·m/u``; or Adam ``v ← β2·v + (1-β2)·g²``,
    ``p ← p·(1 - lr·wd) - lr/(1-β1ᵗ)·m/(√(v/(1-β2ᵗ)) + ε)`` (torch.optim's formulas, ε = 1e-8).
    EMA with TensorFlow's warm-up (``ExponentialMovingAverage`` with ``num_updates``):
    ``e ← e + (1-d_t)·(p - e)``, ``d_t = min(decay, (1 + t) / (10 + t))``, ``t`` the optimiser steps
    applied before this one (a device counter, saved with the state: a resumed run continues the
    same sequence). ``d_0 = 0.1`` (the first update keeps 10% of the initialisation), ``d_20 ≈ 0.7``,
    and from ``t = (10·decay - 1) / (1 - decay)`` on (t = 8,990 for 0.999) ``d_t = decay``: a run
    of a few hundred steps is scored on what it learned, not on its initialisation.
    Each change is scaled by the step's finiteness (0 or 1): a skipped step changes nothing.

    Calling it with a uint8 batch (this process's rows of the global batch) and labels returns the
    step's metrics as device tensors (``loss``, ``bpd`` (B,), ``grad_norm``, ``lr``, ``finite``).
    """

    def __init__(self, model: Glow, train_config: TrainConfig, beta2: float, ema: Glow | None = None,
                 ema_decay: float = 0.0, rank: int = 0, world: int = 1):
        self.model, self.train_config, self.model_config = model, train_config, model.config
        self.ema, self.ema_decay = ema, ema_decay
        self.rank, self.world = rank, world
        self.beta1, self.beta2, self.eps = 0.9, beta2, 1e-8
        self.params = list(model.parameters())
        # parameters, EMA and moments as flat vectors (the parameters become views of theirs): the
        # update is a few elementwise operations on whole vectors, cheap eager and quick to compile
        self.flat = flatten_parameters(self.params)
        self.ema_flat = flatten_parameters(list(ema.parameters())) if ema is not None else None
        device = self.flat.device
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg2 = torch.zeros_like(self.flat)  # Adamax: u (infinity norm); Adam: v
        zero = torch.zeros((), dtype=torch.int64, device=device)
        # device state: the optimiser's step t, the steps called (the noise counter), images of
        # applied steps, skipped steps, the current run of non-finite steps, the bits/dim window
        self.counters = {name: zero.clone() for name in ("opt_steps", "steps", "images", "skipped", "bad_run",
                                                         "bpd_count", "growth", "worst_run")}
        self.counters["bpd_sum"] = torch.zeros((), dtype=torch.float64, device=device)
        self.counters["grad_norm"] = torch.zeros((), device=device)
        self.counters["lr"] = torch.zeros((), device=device)
        self.counters["loss_scale"] = torch.full((), SCALE_INIT if train_config.precision == "fp16" else 1.0, device=device)
        self.skipped_flags = torch.zeros(train_config.log_every, dtype=torch.bool, device=device)
        self.rows = rows_of(train_config.batch_size, rank, world, device)
        self.channels_last = False  # set by compile_step on CUDA

    # ---- the parts of a step
    def _inputs(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Augmented, preprocessed and dequantised model inputs of this step."""
        cfg, step, rows = self.train_config, self.counters["steps"], self.rows
        if len(x_uint8) != len(rows):  # a partial last batch: its global rows (the shape is static)
            rows = rows_of(len(x_uint8) * self.world, self.rank, self.world, rows.device)
        if cfg.augment_shift or cfg.augment_flip:
            # three draws per image (its global row): vertical shift, horizontal shift, flip
            u = counter_uniform(cfg.seed, AUGMENT, step, torch.stack([rows + k * cfg.batch_size for k in range(3)]))
            span = 2 * cfg.augment_shift + 1
            dy, dx = ((u[:2] * span).long() - cfg.augment_shift).unbind(0)
            x_uint8 = shift_and_flip(x_uint8, dy, dx, u[2] < 0.5 if cfg.augment_flip else None)
        noise = dequantization_noise(cfg.seed, NOISE, step, rows, self.model_config.image_shape)
        x = pp.preprocess(x_uint8, self.model_config.n_bits) + noise / pp.n_bins(self.model_config.n_bits)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _gradients(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, per-sample bpd, flat gradient)``: the gradients of all parameters in one vector,
        averaged over the processes (one all-reduce of the gradients and the loss) and still
        multiplied by the fp16 loss scale."""
        out = self.model(x, y if self.model_config.num_classes is not None else None)
        loss, bpd = objective(out, y, self.model_config)
        grads = torch.autograd.grad(loss * self.counters["loss_scale"], self.params)
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
        if self.world > 1:
            torch.distributed.all_reduce(flat)
            flat = flat / self.world
        return flat[-1], bpd.detach(), flat[:-1]

    @torch.no_grad()
    def _apply(self, loss: torch.Tensor, bpd: torch.Tensor, flat_grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unscale and clip the gradient, then the masked optimiser, weight-decay and EMA updates,
        and the step's counters; returns the step's metrics."""
        cfg, c = self.train_config, self.counters
        # unscaling and clipping folded into one scalar: a single pass over the gradient vector
        grad_norm = torch.linalg.vector_norm(flat_grad) / c["loss_scale"]
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        ok = finite.to(torch.float32)
        coef = (cfg.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0) if cfg.grad_clip else 1.0
        # zeroed, not multiplied by 0, when skipped: a non-finite gradient times 0 is NaN
        g = torch.where(finite, flat_grad * (coef / c["loss_scale"]), 0.0)
        lr = warmup_lr(cfg.lr, cfg.warmup_images, c["images"], cfg.batch_size)
        t = (c["opt_steps"] + 1).to(torch.float32)
        b1, b2 = self.beta1, self.beta2
        m, v = self.exp_avg, self.exp_avg2
        m.add_((g - m) * ((1 - b1) * ok))
        step_size = torch.where(finite, lr / (1 - b1**t), 0.0)
        if cfg.optimizer == "adamax":
            # u ← max(β2·u, |g| + ε) when applied; unchanged (β2 → 1, |g| + ε → 0) when skipped
            v.copy_(torch.maximum(v * torch.where(finite, b2, 1.0), (g.abs() + self.eps) * ok))
            denom = v.clamp_min(self.eps)  # u ≥ ε once updated; 0 before the first step
        else:
            v.add_((g * g - v) * ((1 - b2) * ok))
            denom = (v / (1 - b2**t)).sqrt() + self.eps
        if cfg.weight_decay:
            self.flat.mul_(1.0 - lr * cfg.weight_decay * ok)
        self.flat.sub_(m / denom * step_size)
        if self.ema_flat is not None:
            self.ema_flat.add_((self.flat - self.ema_flat) * ((1.0 - self.ema_decay_now(t - 1)) * ok))
        c["opt_steps"] += finite.long()
        self._count(finite, loss, bpd, grad_norm, lr)
        return {"loss": loss, "bpd": bpd, "grad_norm": grad_norm, "lr": lr, "finite": finite}

    def ema_decay_now(self, t: torch.Tensor) -> torch.Tensor:
        """The EMA decay after ``t`` applied optimiser steps (a float32 device scalar):
        ``min(decay, (1 + t) / (10 + t))``, computed on the device (no host sync)."""
        return ((1.0 + t) / (10.0 + t)).clamp(max=self.ema_decay)

    def _count(self, finite: torch.Tensor, loss: torch.Tensor, bpd: torch.Tensor, grad_norm: torch.Tensor,
               lr: torch.Tensor) -> None:
        """The step's counters: a non-finite loss (or, fp32/bf16, gradient) is a bad step; an fp16
        gradient overflow only halves the loss scale (doubled after 2000 finite steps), as
        torch.amp.GradScaler does."""
        c = self.counters
        bad = ~torch.isfinite(loss) if self.train_config.precision == "fp16" else ~finite
        if self.train_config.precision == "fp16":
            grow = finite & (c["growth"] + 1 >= SCALE_GROWTH_INTERVAL)
            c["loss_scale"].copy_(torch.where(finite, torch.where(grow, 2.0, 1.0), 0.5) * c["loss_scale"])
            c["growth"].copy_(torch.where(finite & ~grow, c["growth"] + 1, 0))
        self.skipped_flags[(c["steps"] % self.train_config.log_every).view(1)] = bad  # a tensor index: no .item()
        c["skipped"] += bad.long()
        c["bad_run"].copy_(torch.where(bad, c["bad_run"] + 1, 0))
        c["worst_run"].copy_(torch.maximum(c["worst_run"], c["bad_run"]))
        c["images"] += finite.long() * (len(bpd) * self.world)  # the global batch (smaller when partial)
        c["bpd_sum"] += torch.where(finite, bpd.mean().double(), 0.0)
        c["bpd_count"] += finite.long()
        c["grad_norm"].copy_(grad_norm)
        c["lr"].copy_(lr)
        c["steps"] += 1

    def __call__(self, x_uint8: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One training step on this process's rows ``x_uint8`` (B/world, C, H, W) and labels ``y``."""
        return self._apply(*self._gradients(self._inputs(x_uint8), y))

    # ---- reading and saving the state
    def read_counters(self) -> dict[str, Any]:
        """The counters as Python numbers (one device sync), the skipped steps since the last read
        (as offsets ``step % log_every``); then a new window (bits/dim sum and count, the longest
        run of non-finite steps ``worst_run``). Call at least every ``log_every`` steps."""
        c = self.counters
        names = ("steps", "images", "skipped", "bad_run", "worst_run", "bpd_sum", "bpd_count", "grad_norm", "lr",
                 "loss_scale")
        values = torch.cat([torch.stack([c[k].double() for k in names]), self.skipped_flags.double()]).tolist()
        out = {k: int(v) if c[k].dtype == torch.int64 else v for k, v in zip(names, values)}
        out["skipped_offsets"] = [i for i, flag in enumerate(values[len(names):]) if flag]
        self.skipped_flags.zero_()
        for k in ("bpd_sum", "bpd_count", "worst_run"):
            c[k].zero_()
        return out

    def totals(self) -> dict[str, int]:
        """``steps`` taken (skipped ones included), ``images`` of applied steps and ``skipped`` steps,
        as Python numbers (one device sync). These device counters are the only record of them."""
        names = ("steps", "images", "skipped")
        return dict(zip(names, torch.stack([self.counters[k] for k in names]).tolist()))

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step changes in place: weights, EMA, moments, counters, skipped flags (a
        CUDA graph of the step writes to their addresses)."""
        return [self.flat, self.exp_avg, self.exp_avg2, self.skipped_flags, *self.counters.values(),
                *([self.ema_flat] if self.ema_flat is not None else [])]

    def clear_bad_run(self) -> None:
        self.counters["bad_run"].zero_()

    def state_dict(self) -> dict[str, Any]:
        """Optimiser moments (flat, in parameter order) and device counters (the model and EMA
        weights are saved apart)."""
        return {"optimizer": self.train_config.optimizer, "exp_avg": self.exp_avg, "exp_avg2": self.exp_avg2,
                "counters": dict(self.counters)}

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Restore :meth:`state_dict`; also a ``torch.optim`` Adamax/Adam state of an earlier version
        (its step count; the noise counter and images then come from ``legacy_counters``)."""
        if "state" in state and "param_groups" in state:  # torch.optim.Adamax/Adam.state_dict()
            per_param = [state["state"].get(i, {}) for i in range(len(self.params))]
            key = "exp_inf" if self.train_config.optimizer == "adamax" else "exp_avg_sq"
            if not all("exp_avg" in s and key in s for s in per_param):
                raise ConfigError(f"{source}: the optimiser state does not match `optimizer` {self.train_config.optimizer}")
            state = {"optimizer": self.train_config.optimizer,
                     "exp_avg": torch.cat([s["exp_avg"].reshape(-1) for s in per_param]),
                     "exp_avg2": torch.cat([s[key].reshape(-1) for s in per_param]),
                     "counters": {"opt_steps": torch.as_tensor(per_param[0]["step"]).long()}}
        if state["optimizer"] != self.train_config.optimizer:
            raise ConfigError(f"{source} was trained with `optimizer` {state['optimizer']}, "
                              f"not {self.train_config.optimizer}")
        with torch.no_grad():
            self.exp_avg.copy_(state["exp_avg"])
            self.exp_avg2.copy_(state["exp_avg2"])
            for k, v in state["counters"].items():
                self.counters[k].copy_(v)


def graph_blocker(step: TrainStep) -> str | None:
    """Why ``step`` cannot be captured as a CUDA graph, or None when it can. A graph replays
    kernels only: nothing in the step may read a device value on the host or decide on host state
    that changes between calls."""
    if step.train_config.memory == "invertible":
        return ("memory 'invertible' checks each reconstruction on the host in its backward (a device sync, "
                "which a CUDA graph cannot hold)")
    if step.train_config.memory == "checkpoint":
        return "memory 'checkpoint' saves and restores the RNG state on the host in its backward"
    if step.model_config.dropout:
        return "dropout draws from the global RNG, which the trainer reseeds on the host every step"
    if step.world > 1 and torch.distributed.get_backend() != "nccl":
        return f"the all-reduce of backend {torch.distributed.get_backend()!r} cannot be captured (NCCL can)"
    return None


class GraphedStep(GraphedCall):
    """``fn`` (``step`` or its regionally compiled form) replayed as one CUDA graph per batch shape
    (:class:`torchglow.graphs.GraphedCall`).

    A call copies the batch (and labels) into the static buffers of its shape and replays that
    shape's graph; the trainer's last partial batch would get a graph of its own (the trainer drops
    it: ``steps_per_epoch = N // batch_size``). Before a capture, everything the step changes
    (weights, EMA, moments, counters) is snapshotted, ``warmup`` steps run, and the snapshot is
    copied back in place. The state keeps its addresses throughout: the trainer's
    ``read_counters``, ``load_state_dict`` and ``Module.load_state_dict`` all write in place
    (``copy_``), never rebind, so a resumed or restored run replays the same graph on the loaded
    state. Returns the step's outputs as static tensors, overwritten by the next call of the same
    shape. ``capture=False`` (the default off CUDA) is bit-identical to the plain step.
    """

    what = "the training step"

    def __init__(self, step: TrainStep, fn=None, capture: bool | None = None, warmup: int = 3):
        super().__init__(fn or step, step.flat.device.type == "cuda" if capture is None else capture, warmup)
        self.step = step

    def _state(self) -> list[torch.Tensor]:
        return self.step.state_tensors()


def compile_step(step: TrainStep, mode: str = "regional", backend: str | None = None):
    """The fast path of ``step``: a callable with the same arguments and results.

    ``"regional"``: each flow step is compiled (forward and backward) once per level shape and its
    code reused by the K steps of the level; the input preparation and the update (optimiser,
    weight decay, EMA, counters) are one compiled graph each; the rest of the forward (squeezes,
    splits, priors) and the autograd glue run eagerly. Works with every memory mode.

    ``"graph"``: no compilation, the eager step's kernels.

    On CUDA both are then captured as one CUDA graph (:class:`GraphedStep`: one launch per step)
    unless :func:`graph_blocker` names a reason, which is printed (one line) and the step runs
    uncaptured (``"regional"``: its input and update graphs then as inductor's CUDA graphs). On the
    CPU there is nothing to capture: ``"graph"`` is the eager step itself.

    ``"whole"``: ``torch.compile(step, fullgraph=True)`` -- forward, backward, optimiser and EMA in
    one graph (``torch._dynamo.config.trace_autograd_ops`` lets dynamo trace ``autograd.grad``;
    torch >= 2.11); on CUDA ``mode="reduce-overhead"`` replays it as one CUDA graph. Compile time
    grows with the number of flow steps (minutes for the cifar10 preset). Memory mode "none" only:
    the invertible backward is a custom autograd Function with its own Python backward, and
    checkpointing re-runs Python.
    """
    backend = backend or graphs.COMPILE_BACKEND
    cuda = step.params[0].device.type == "cuda"
    if mode not in ("regional", "whole", "graph"):
        raise ValueError(f"compile mode must be 'regional', 'whole' or 'graph', got {mode!r}")
    blocker = graph_blocker(step) if cuda and mode != "whole" else None
    if blocker:
        print(f"torchglow: the training step runs without a CUDA graph: {blocker}", file=sys.stderr, flush=True)
    graphed = cuda and mode != "whole" and blocker is None
    if cuda:
        step.channels_last = True  # cuDNN's fast layout for the activations; the weights stay flat views
    if cuda and not graphed:
        # the state the step updates in place keeps its address, so inductor's CUDA graphs can replay it
        for t in step.state_tensors():
            torch._dynamo.mark_static_address(t)
    # inside our own graph, inductor must not capture graphs of its own
    options = dict(backend=backend,
                   mode="reduce-overhead" if cuda and backend == "inductor" and not graphed else None)
    if mode == "whole":
        return _compile_whole(step, options)
    fn = step
    if mode == "regional":
        # no CUDA graphs per region (the eager glue between regions would re-enter them)
        for flow_step in step.model.flow_steps():
            flow_step.compile(backend=backend)
        inputs = torch.compile(step._inputs, fullgraph=True, **options)
        apply = torch.compile(step._apply, fullgraph=True, **options)

        def regional_step(x_uint8: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            return apply(*step._gradients(inputs(x_uint8), y))

        fn = regional_step
    return GraphedStep(step, fn, capture=True) if graphed else fn


def _compile_whole(step: TrainStep, options: dict[str, Any]):
    """``torch.compile(step, fullgraph=True)`` with dynamo tracing ``autograd.grad``."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        raise ConfigError(f"compile_mode 'whole' needs torch >= 2.11 (this is {torch.__version__}): "
                          f"use compile_mode 'regional'")
    compiled = torch.compile(step.__call__, fullgraph=True, **options)

    def whole(x_uint8: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(x_uint8, y)

    return whole
