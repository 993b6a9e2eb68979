"""The Glow model: multi-scale flow, learned priors, likelihood, sampling, save/load.

Layout (official ``model.py``): the input is squeezed; each of the L levels runs K flow steps;
between levels the channels are split, the second half ``z2`` is modelled by a Gaussian whose mean
and log-std come from a zero-initialised conv on the kept half (and leaves the flow), and the kept
half is squeezed again. The top latent has a standard or learned Gaussian prior, shifted by a
zero-initialised embedding of the class label when the model is class-conditional.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub import ModelHubMixin
from torch import nn

from . import hub, memory
from . import preprocess as pp
from .config import GlowConfig, preset
from .devices import random_tensor
from .health import check_samples
from .actnorm import ActNorm, initializing, logdet_dtype
from .fold import fold_networks, inverse_weights, refresh_stale_inverses
from .layers import FlowStep, squeeze2d, unsqueeze2d
from .networks import LinearZeros, ZeroConv2d

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(x; mean, exp(logs)²) summed over (C, H, W), in float32 (float64 for
    float64 inputs)."""
    dtype = logdet_dtype(x)
    x, mean, logs = x.to(dtype), mean.to(dtype), logs.to(dtype)
    return (-0.5 * (LOG_2PI + 2.0 * logs + (x - mean) ** 2 * torch.exp(-2.0 * logs))).sum(dim=(1, 2, 3))


class FlowOutput(NamedTuple):
    log_prob: torch.Tensor  # (B,) log-density of the continuous input, nats: log_pz + logdet
    logdet: torch.Tensor  # (B,) sum of the flow's log-determinants
    log_pz: torch.Tensor  # (B,) sum of the priors' log-densities over all latents
    y_logits: torch.Tensor | None  # (B, num_classes) classifier logits, class-conditional models only


class SplitPrior(nn.Module):
    """Conditional prior of the split-off half: ``[mean | logs]`` interleaved from a zero conv on
    the kept half (official ``split2d_prior``; with ``padding="edge"`` the conv sees the official
    edge channel). Not a flow layer: its term is a prior, not a log-det."""

    def __init__(self, num_channels: int, padding: str = "zero"):
        super().__init__()
        self.n_keep = num_channels // 2
        self.conv = ZeroConv2d(self.n_keep, 2 * (num_channels - self.n_keep), edge=padding == "edge")

    def prior(self, z_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(z_keep).to(logdet_dtype(z_keep))
        return h[:, 0::2], h[:, 1::2]


def class_layer(in_features: int, out_features: int, kind: str) -> nn.Linear:
    """The class embedding or classifier: official ``linear_zeros`` (:class:`LinearZeros`), or a
    zero-initialised ``Linear`` (``kind="linear"``, the configs saved before ``class_layers``)."""
    if kind == "linear_zeros":
        return LinearZeros(in_features, out_features)
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TopPrior(nn.Module):
    """Prior of the top latent: N(0, I), or with ``learn_top`` a learned mean and log-std (official:
    a zero conv applied to zeros; with zero padding a per-channel bias scaled by ``exp(3·logs)``,
    with ``padding="edge"`` also a function of the edge channel, so the border positions get their
    own mean and log-std), shifted by a zero-initialised linear embedding of the one-hot class when
    ``num_classes`` is set (:func:`class_layer`)."""

    def __init__(self, shape: tuple[int, int, int], learn_top: bool, num_classes: int | None,
                 padding: str = "zero", class_layers: str = "linear"):
        super().__init__()
        self.shape = shape
        c = shape[0]
        self.learned = ZeroConv2d(2 * c, 2 * c, edge=padding == "edge") if learn_top else None
        self.y_emb = class_layer(num_classes, 2 * c, class_layers) if num_classes else None

    def forward(self, batch: int, y: torch.Tensor | None, device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = self.shape
        p = torch.zeros(1, 2 * c, h, w, device=device, dtype=dtype)
        if self.learned is not None:
            p = self.learned(p)
        p = p.expand(batch, -1, -1, -1)
        if self.y_emb is not None:
            if y is None:
                raise ValueError("this model is class-conditional: pass the labels y")
            onehot = F.one_hot(y, self.y_emb.in_features).to(dtype)
            p = p + self.y_emb(onehot)[:, :, None, None]
        return p[:, :c], p[:, c:]


class Glow(nn.Module, ModelHubMixin):
    """Glow (Kingma & Dhariwal 2018) with the numerics of the official code.

    Inputs live in *model space*: images scaled to [-0.5, 0.5) and dequantised
    (:mod:`torchglow.preprocess`); :meth:`bits_per_dim` takes uint8 images and does that itself.
    ``save_pretrained``/``from_pretrained``/``push_to_hub`` come from huggingface_hub's
    ``ModelHubMixin``, with torchglow's folder format and model card (:mod:`torchglow.hub`).
    """

    def __init__(self, config: GlowConfig):
        super().__init__()
        self.config = config
        c, h, w = config.image_shape
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        for i in range(config.n_levels):
            c, h, w = c * 4, h // 2, w // 2
            steps = nn.ModuleList(
                FlowStep(c, config.hidden_channels, config.coupling, config.permutation, config.lu, config.dropout,
                         config.padding)
                for _ in range(config.n_steps)
            )
            self.levels.append(steps)
            if i < config.n_levels - 1:
                self.splits.append(SplitPrior(c, config.padding))
                self.latent_shapes.append((c - c // 2, h, w))
                c = c // 2
        self.latent_shapes.append((c, h, w))
        self.top = TopPrior((c, h, w), config.learn_top, config.num_classes, config.padding, config.class_layers)
        self.classifier = class_layer(c, config.num_classes, config.class_layers) if config.num_classes else None
        self.memory_mode = "none"  # backward memory mode, see set_memory / torchglow.memory

    # ---------------------------------------------------------------- construction and state
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Glow":
        return cls(preset(name, **overrides))

    @property
    def device(self) -> torch.device:
        """The device of the parameters (one device for the whole model): where inputs must live."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters (``model.double()`` makes it float64): the dtype of samples and
        of the model-space inputs that :meth:`bits_per_dim` builds."""
        return next(self.parameters()).dtype

    @property
    def initialized(self) -> bool:
        """True once the data-dependent ActNorm initialisation has run (or was loaded)."""
        return all(bool(m.initialized) for m in self.modules() if isinstance(m, ActNorm))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Data-dependent initialisation of every ActNorm from a batch in model space (the
        official code uses 256 dequantised training images). Under torch.distributed, call it
        on every rank with its share of the batch: the statistics are averaged across ranks.
        Layers that are already initialised (e.g. loaded from a checkpoint) are left alone."""
        with initializing(self):
            self.encode(x, y)

    def set_autocast(self, dtype: torch.dtype | None) -> None:
        """Run the coupling networks under autocast ``dtype`` (bf16/fp16); None for full precision."""
        for step in self.flow_steps():
            step.coupling.autocast_dtype = dtype

    def set_memory(self, mode: str) -> None:
        """How the flow steps keep activations for backward (:mod:`torchglow.memory`): ``"none"``
        (standard autograd), ``"checkpoint"`` (per-step gradient checkpointing) or ``"invertible"``
        (inputs reconstructed by inversion; activation memory independent of K)."""
        self.memory_mode = memory.check_memory_mode(mode, self.config.dropout)

    def refresh_inverses(self) -> None:
        """Recompute the cached inverse weights of every flow step whose parameters changed since,
        in place (one batched computation per level; :meth:`torchglow.layers.FlowStep.refresh_inverse`).
        Decoding does it by itself; a decode captured as a CUDA graph cannot, so call it before each
        replay (:mod:`torchglow.tools.fast` does), outside the graph."""
        for steps in self.levels:
            refresh_stale_inverses(steps)

    def flow_steps(self):
        for steps in self.levels:
            yield from steps

    # ---------------------------------------------------------------- the flow
    def _forward_steps(self, steps: nn.ModuleList, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return memory.forward_steps(steps, z, self.memory_mode)

    def _encode(self, x: torch.Tensor, y: torch.Tensor | None, standardized: bool):
        if x.dim() != 4 or tuple(x.shape[1:]) != self.config.image_shape:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, self.config.image_shape))}) "
                             f"(config.image_shape), got {tuple(x.shape)}")
        z = x
        latents: list[torch.Tensor] = []
        logdet = x.new_zeros(x.shape[0], dtype=logdet_dtype(x))
        log_pz = torch.zeros_like(logdet)
        for i, steps in enumerate(self.levels):
            z, ld = self._forward_steps(steps, squeeze2d(z))
            logdet = logdet + ld
            if i < len(self.splits):
                split = self.splits[i]
                z, z_out = z[:, : split.n_keep], z[:, split.n_keep :]
                mean, logs = split.prior(z)
                log_pz = log_pz + gaussian_log_prob(z_out, mean, logs)
                latents.append((z_out - mean) * torch.exp(-logs) if standardized else z_out)
        mean, logs = self.top(x.shape[0], y, x.device, logdet_dtype(x))
        log_pz = log_pz + gaussian_log_prob(z, mean, logs)
        latents.append((z - mean) * torch.exp(-logs) if standardized else z)
        return latents, logdet, log_pz, z

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None, standardized: bool = False):
        """Map inputs to latents: ``(latents, logdet)`` with one latent per split and the top one
        last (shapes :attr:`latent_shapes`). ``standardized=True`` returns ``ε = (z - mean) / std``
        under each level's prior instead of ``z``. :meth:`decode` inverts either exactly.

        ``encode``, :meth:`decode` and :meth:`sample` are the flow's bijection and run without the
        coupling dropout even in training mode (a dropped mask would make the inverse inexact and a
        sample random twice over); only :meth:`forward` (the training objective) applies it."""
        with self._without_dropout():
            latents, logdet, _, _ = self._encode(x, y, standardized)
        return latents, logdet

    @contextlib.contextmanager
    def _without_dropout(self):
        """Coupling dropout off within the context, training mode kept for everything else."""
        active = [m for m in self.modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0]
        for m in active:
            m.train(False)
        try:
            yield
        finally:
            for m in active:
                m.train(True)

    def decode(self, latents: list[torch.Tensor], y: torch.Tensor | None = None,
               standardized: bool = False) -> torch.Tensor:
        """Inverse of :meth:`encode`: every given latent is used as is, none is resampled."""
        shapes = [tuple(z.shape[1:]) for z in latents]
        if shapes != self.latent_shapes:
            raise ValueError(f"expected latents of shapes {self.latent_shapes} (model.latent_shapes), got {shapes}")
        with self._without_dropout():
            return self._decode(latents, y, standardized)

    def _decode(self, latents: list[torch.Tensor], y: torch.Tensor | None, standardized: bool) -> torch.Tensor:
        z = latents[-1]
        if standardized:
            mean, logs = self.top(z.shape[0], y, z.device, logdet_dtype(z))
            z = mean.to(z.dtype) + torch.exp(logs).to(z.dtype) * z
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                z_out = latents[i]
                if standardized:
                    mean, logs = self.splits[i].prior(z)
                    z_out = mean.to(z.dtype) + torch.exp(logs).to(z.dtype) * z_out
                z = torch.cat([z, z_out], 1)
            steps = self.levels[i]
            for step, folded, net in zip(reversed(steps), reversed(inverse_weights(steps)),
                                         reversed(fold_networks(steps))):
                z = step.inverse(z, folded, net)
            z = unsqueeze2d(z)
        return z

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> FlowOutput:
        latents, logdet, log_pz, z_top = self._encode(x, y, standardized=False)
        y_logits = self.classifier(z_top.to(self.classifier.weight.dtype).mean(dim=(2, 3))) if self.classifier is not None else None
        return FlowOutput(log_pz + logdet, logdet, log_pz, y_logits)

    # ---------------------------------------------------------------- as a distribution
    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample log-density (nats) of continuous model-space inputs ``x``."""
        return self(x, y).log_prob

    def bits_per_dim(self, x_uint8: torch.Tensor, y: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample bits/dim of uint8 images (B, C, H, W): reduced to ``n_bits``, dequantised with
        uniform noise and scored with the discretisation term, as the official objective. The
        images (and labels) may be on any device; they are scored on the model's device in its
        dtype, the noise drawn from ``generator`` (on any device, see :meth:`sample`)."""
        n_bits = self.config.n_bits
        x = pp.preprocess(x_uint8.to(self.device), n_bits, self.dtype)
        x = pp.dequantize(x, n_bits, generator)
        y = None if y is None else y.to(self.device)
        return pp.bits_per_dim_from_log_prob(self.log_prob(x, y), self.config.n_dims, n_bits)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples in model space, on the model's device and in its dtype: at every level
        ``z = mean + exp(logs)·ε·T``. :func:`torchglow.preprocess.to_uint8` turns them into images.

        ``generator`` (optional) is a ``torch.Generator`` on any device: ε is drawn on the
        generator's device and moved to the model's, so a seeded CPU generator gives the same ε
        whether the model is on the CPU or a GPU. Samples with inf/NaN (a high temperature, or
        collapsed coupling scales) are returned as they are, with a
        :class:`~torchglow.health.NumericalHealthWarning` that counts them."""
        device, dtype = self.device, self.dtype
        eps = [random_tensor(torch.randn, (n, *s), generator, device, dtype) * temperature
               for s in self.latent_shapes]
        x = self.decode(eps, None if y is None else y.to(device), standardized=True)
        check_samples(x, context=f"Glow.sample at T={float(temperature):g}")
        return x

    # ---------------------------------------------------------------- save / load (Hugging Face Hub)
    def _save_pretrained(self, save_directory: Path) -> None:
        """Write ``config.json`` and ``model.safetensors``; the mixin's ``save_pretrained`` calls it,
        then adds ``README.md`` (see :meth:`generate_model_card`)."""
        from safetensors.torch import save_file

        self.config.save(save_directory / CONFIG_NAME)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / WEIGHTS_NAME), metadata={"format": "torchglow"})

    def generate_model_card(self, dataset: str | None = None, test_bpd: float | None = None,
                            command: str | None = None):
        """The ``README.md`` of a saved folder: ``save_pretrained(d, model_card_kwargs=dict(dataset=...,
        test_bpd=..., command=...))``; an existing card is kept (rewrite it with
        :func:`torchglow.hub.write_model_card`)."""
        return hub.model_card(self.config, dataset, test_bpd, command)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, map_location: str | torch.device = "cpu",
                        **hub_kwargs) -> "Glow":
        """A model in eval mode (as Hugging Face's) from a pretrained folder (read locally, never the
        network) or a Hub repository ``"user/name"``; ``hub_kwargs`` (revision, token, cache_dir, local_files_only,
        force_download) go to the download."""
        return super().from_pretrained(name_or_path, map_location=map_location, **hub_kwargs).eval()

    @classmethod
    def _from_pretrained(cls, *, model_id: str, config: dict | GlowConfig | None = None,
                         map_location: str | torch.device = "cpu", **hub_kwargs) -> "Glow":
        """Called by the mixin's ``from_pretrained`` with the parsed ``config.json`` (None when it
        found none: reading it again then raises the error that names the file)."""
        from safetensors.torch import load_file

        if config is None:
            config = GlowConfig.load(hub.resolve_file(model_id, CONFIG_NAME, **hub_kwargs))
        elif not isinstance(config, GlowConfig):
            config = GlowConfig.from_dict(config)
        model = cls(config)
        weights = hub.resolve_file(model_id, WEIGHTS_NAME, **hub_kwargs)
        model.load_state_dict(load_file(str(weights), device=str(map_location)))
        return model.to(map_location)
