"""Replaying a function as a CUDA graph: one launch for all of its kernels.

:class:`GraphedCall` wraps any function of tensors (nested in lists, tuples or dicts, beside plain
values such as flags) whose kernels depend on the shapes of its inputs only, not on their values:
the training step (:class:`torchglow.train.step.GraphedStep`), the decode of a sampler and the forward of
an evaluation (:mod:`torchglow.tools.fast`). The first call of a signature (the shapes, strides and
dtypes of the tensors, and the other values) follows PyTorch's whole-network capture recipe:
static input buffers, warm-up calls on a side stream (cuBLAS/cuDNN handles, compiled code), then
the capture of one call; later calls copy their tensors into the buffers and replay.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

# torch.compile backend of the fast paths (the training step's and the forward's compiled flow
# steps); "aot_eager" (no code generation) runs the same graphs with eager kernels, e.g. to check a
# fast path cheaply on a CPU
COMPILE_BACKEND = "inductor"


def _signature(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device)
    return ("value", leaf)


class GraphedCall:
    """``fn(*args)`` replayed as one CUDA graph per signature of ``args``.

    The result is made of static tensors that the next call of the same signature overwrites (copy
    what must outlive it). ``warmup`` calls precede each capture; :meth:`_state` names tensors that
    ``fn`` changes in place, restored after the warm-up so that it leaves no trace. Should a capture
    fail, one line says why and that signature runs uncaptured (:attr:`captured` is then False).

    ``capture=False`` (the default off CUDA) runs the same logic -- static buffers, warm-up and
    restore, results copied into static tensors -- with ``fn`` called on the buffers instead of a
    replay, which is how the CPU tests check it.
    """

    what = "the call"  # named in the line that reports a failed capture

    def __init__(self, fn: Callable[..., Any], capture: bool, warmup: int = 2):
        self.fn, self.capture, self.warmup = fn, capture, warmup
        self.entries: dict[tuple, dict[str, Any]] = {}
        self.capture_seconds = 0.0  # warm-up and capture of every signature so far
        self.failure: str | None = None  # why a capture failed

    def _state(self) -> list[torch.Tensor]:
        """Tensors that ``fn`` updates in place, restored after the warm-up calls."""
        return []

    def _call(self, entry: dict[str, Any]) -> Any:
        return self.fn(*pytree.tree_unflatten(entry["leaves"], entry["spec"]))

    def _prepare(self, leaves: list[Any], spec: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        entry = {"spec": spec,
                 "leaves": [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]}
        saved = [t.clone() for t in self._state()]
        # autocast's cache of cast weights would outlive the capture it was filled in (PyTorch's
        # advice for graphs under autocast); it only saves casts, the values are the same
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            if self.capture:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        self._call(entry)
                torch.cuda.current_stream().wait_stream(side)
            else:
                for _ in range(self.warmup):
                    self._call(entry)
            with torch.no_grad():
                for t, v in zip(self._state(), saved):
                    t.copy_(v)
            del saved
            if self.capture:
                entry["graph"] = self._capture(entry)
        finally:
            torch.set_autocast_cache_enabled(cache)
        self.capture_seconds += time.perf_counter() - t0
        return entry

    def _capture(self, entry: dict[str, Any]) -> torch.cuda.CUDAGraph | None:
        """The graph of one call on the entry's buffers; None (one line says why) when the capture
        fails: a capture records kernels without running them, so nothing has changed."""
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a data loader's pinning thread may call CUDA during the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                entry["out"] = self._call(entry)
        except RuntimeError as e:
            self.failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"torchglow: capturing {self.what} failed ({self.failure}); it runs uncaptured",
                  file=sys.stderr, flush=True)
            entry.pop("out", None)
            return None
        return graph

    @property
    def captured(self) -> bool:
        """Whether every signature so far replays a CUDA graph."""
        return bool(self.entries) and all(e.get("graph") is not None for e in self.entries.values())

    def __call__(self, *args: Any) -> Any:
        leaves, spec = pytree.tree_flatten(args)
        key = (spec, tuple(_signature(leaf) for leaf in leaves))
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = self._prepare(leaves, spec)
        else:
            for static, leaf in zip(entry["leaves"], leaves):
                if isinstance(leaf, torch.Tensor):
                    static.copy_(leaf)
        if entry.get("graph") is not None:
            entry["graph"].replay()
            return entry["out"]
        out = self._call(entry)
        if "out" not in entry:
            entry["out"] = pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, out)
        else:
            for static, t in zip(pytree.tree_leaves(entry["out"]), pytree.tree_leaves(out)):
                if isinstance(t, torch.Tensor):
                    static.copy_(t)
        return entry["out"]
