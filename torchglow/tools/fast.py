"""Fast inference: sampling and evaluation replayed as CUDA graphs.

A decode or forward of the cifar10 preset is a few thousand small kernels; launched one by one
from Python, the host's launches bound it, not the GPU. Here each is captured once per batch shape
as a CUDA graph (:class:`torchglow.graphs.GraphedCall`; capture costs one call, not a compile of
the whole model) and replayed with one launch. The 1x1 convolutions' inverse weights are computed
outside the graph: the decode's graph reads the flow steps' cached inverses, which
:meth:`torchglow.Glow.refresh_inverses` brings up to date (in place, the same storage) before every
replay, so a graph stays right when the weights change (training, ``load_state_dict``).

Off CUDA there is no graph to replay: the same functions then run the eager kernels.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import graphs
from ..graphs import GraphedCall
from ..model import FlowOutput, Glow


class _Graphed(GraphedCall):
    """A no-grad call of ``model`` replayed as a CUDA graph on CUDA; the result is cloned (a replay
    overwrites the graph's output). ``inverses``: the call decodes, so the flow steps' cached 1x1
    inverses are refreshed before each replay (the forward reads none)."""

    def __init__(self, model: Glow, fn: Callable, what: str, inverses: bool = False):
        super().__init__(torch.no_grad()(fn), capture=model.device.type == "cuda")
        self.model, self.what, self.inverses = model, what, inverses

    def __call__(self, *args):
        if self.inverses:
            self.model.refresh_inverses()
        out = super().__call__(*args)
        return out.clone() if isinstance(out, torch.Tensor) else type(out)(*(
            None if t is None else t.clone() for t in out))


def fast_decode(model: Glow) -> Callable[..., torch.Tensor]:
    """``model.decode`` replayed as a CUDA graph per latent shapes and flags on CUDA (the eager decode
    elsewhere): ``decode(latents, y=None, standardized=False)``, the same results."""
    graphed = _Graphed(model, lambda z, y, standardized: model.decode(z, y, standardized=standardized),
                       "the decode", inverses=True)

    def decode(latents: list[torch.Tensor], y: torch.Tensor | None = None, standardized: bool = False) -> torch.Tensor:
        return graphed(list(latents), y, bool(standardized))

    decode.graphed = graphed
    return decode


def fast_sampler(model: Glow, batch: int) -> Callable[..., torch.Tensor]:
    """``model.sample`` through :func:`fast_decode`, for a fixed ``batch``:
    ``sample(n=batch, temperature=1.0, y=None, generator=None)``, the same arguments and results
    (ε drawn outside the graph, so a seeded generator gives the eager sampler's samples)."""
    device, dtype = model.device, model.dtype
    decode = fast_decode(model)

    @torch.no_grad()
    def sample(n: int = batch, temperature: float = 1.0, y: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        if n != batch:
            raise ValueError(f"this sampler replays batches of {batch}, got {n}")
        eps = [torch.randn((n, *s), generator=generator, device=device, dtype=dtype) * temperature
               for s in model.latent_shapes]
        return decode(eps, y, standardized=True)

    sample.graphed = decode.graphed
    return sample


def fast_forward(model: Glow, compile: bool = False) -> Callable[..., FlowOutput]:
    """``model``'s forward for evaluation, ``forward(x, y=None) -> FlowOutput`` without gradients:
    a CUDA graph per batch shape on CUDA. ``compile``: each flow step compiled too (once per level
    shape, seconds rather than the minutes of a whole-model compile), in place as
    :meth:`torch.nn.Module.compile` does, so the model keeps its compiled steps afterwards."""
    if compile:
        for step in model.flow_steps():
            step.compile(backend=graphs.COMPILE_BACKEND, dynamic=False)
    graphed = _Graphed(model, lambda x, y: model(x, y), "the forward")

    def forward(x: torch.Tensor, y: torch.Tensor | None = None) -> FlowOutput:
        return graphed(x, y)

    forward.graphed = graphed
    return forward
