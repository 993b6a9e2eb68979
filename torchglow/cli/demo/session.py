"""What the demo page shows, computed without a browser: a :class:`DemoSession` over a trained
model and the functions it uses. :mod:`.server` (Starlette + uvicorn) is a thin web layer over the
session, ``static/`` the one page (plain HTML/CSS/JS, nothing from a network), :mod:`.upload` turns
an uploaded file into the model's input.

Shown images go through :func:`torchglow.tools.images.to_display` (bin ``max_level`` -> 255) and
:func:`torchglow.tools.images.grid_array` (nearest-neighbour upscaling), as PNG data URLs.

Latents are the standardised ``ε`` of every level (:func:`torchglow.tools.latent.encode_eps`), as the
official demo: an edit is ``ε + Σ α_i · d_i`` over the attribute directions ``d_i``
(:func:`torchglow.tools.directions.attribute_directions`), a mix is the slerp of each level's ``ε``.
"""

from __future__ import annotations

import base64
import io
import math
import secrets
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ... import preprocess as pp
from ...model import Glow
from ...tools.fast import fast_decode
from ...tools.images import data_max_level, display_uint8, grid_array, to_display
from ...tools.latent import decode_eps, encode_eps, slerp
from ...tools.ood import complexity_scores, scores_bpd
from ...tools.sampling import temperature_rows
from .upload import MAX_PIXELS, MAX_UPLOAD_BYTES, read_upload, to_data_range

MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
MAX_ALPHA = 2.0  # the page's sliders span [-1, 1], as the official demo's
HISTOGRAM_BINS = 30
GALLERY_SIZE = 16
SAMPLES_PER_ROW = 6


# ---------------------------------------------------------------------------- images out
def png_data_url(images: torch.Tensor, nrow: int = 8) -> str:
    """uint8 display images (N, C, H, W) -> a ``data:image/png`` URL of their grid
    (:func:`torchglow.tools.images.grid_array`: nearest-neighbour upscaled to at least 32 px; 1 px white
    padding between images, none around a single image)."""
    from PIL import Image

    arr = grid_array(images, nrow=nrow, padding=1 if images.shape[0] > 1 else 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # tiny images: speed over bytes
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------- typicality readout
@dataclass(frozen=True)
class Reference:
    """The run's test images as the yardstick for one image's scores.

    ``bpd``: their bits/dim (seeded dequantisation, :func:`torchglow.tools.ood.scores_bpd`);
    ``complexity``: their input-complexity scores ``S = bpd − L`` (Serrà et al. 2020,
    :func:`torchglow.tools.ood.complexity_scores`). ``h_hat``, the mean bits/dim, is Nalisnick et al.'s
    (2019) estimate of the entropy, the centre of the typical set.
    """

    bpd: torch.Tensor
    complexity: torch.Tensor

    @property
    def h_hat(self) -> float:
        return float(self.bpd.mean())

    def histogram(self, bins: int = HISTOGRAM_BINS) -> dict[str, list[float]]:
        """Counts of the test bits/dim in ``bins`` equal bins between their min and max."""
        lo, hi = float(self.bpd.min()), float(self.bpd.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(self.bpd.numpy(), bins=bins, range=(lo, hi))
        return {"edges": edges.tolist(), "counts": counts.tolist()}

    def readout(self, bpd: float, complexity: float) -> dict[str, Any]:
        """Where an image's scores fall among the test images'.

        * ``percentile``: % of test images with lower or equal bits/dim.
        * ``typicality``: ``|bpd − Ĥ|``, the typicality test statistic for a batch of one image, and
          ``typicality_tail``: the fraction of test images at least as far from Ĥ (too likely is as
          atypical as too unlikely: an all-black image scores a low bits/dim).
        * ``complexity_tail``: the fraction of test images with a complexity score at least as high.
        * ``verdict`` from the smaller tail p: "typical" (p ≥ 5%), "unusual" (1% ≤ p < 5%), else
          "atypical" (likely out of distribution for this model).
        """
        typ = abs(bpd - self.h_hat)
        typ_tail = float(((self.bpd - self.h_hat).abs() >= typ).double().mean())
        comp_tail = float((self.complexity >= complexity).double().mean())
        p = min(typ_tail, comp_tail)
        verdict = "typical" if p >= 0.05 else ("unusual" if p >= 0.01 else "atypical")
        return {"bpd": bpd, "percentile": 100.0 * float((self.bpd <= bpd).double().mean()),
                "h_hat": self.h_hat, "typicality": typ, "typicality_tail": typ_tail,
                "complexity": complexity, "complexity_tail": comp_tail, "verdict": verdict}


def score_images(model: Glow, x_uint8: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits/dim, complexity score) of uint8 images, float64 (N,) each: the scores of
    :mod:`torchglow.tools.ood` (the marginal likelihood for a class-conditional model)."""
    bpd = scores_bpd(model, x_uint8, seed=seed)
    return bpd, complexity_scores(bpd, x_uint8, model.config.n_bits)


# ---------------------------------------------------------------------------- attribute directions
def class_attributes(labels: torch.Tensor, class_names: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """One binary attribute per class that is present and absent among ``labels``: "class c" against
    all other images. Returns (bool (N, A), names ``"class <name>"``)."""
    labels = torch.as_tensor(labels).reshape(-1)
    kept = [c for c in range(len(class_names)) if 0 < int((labels == c).sum()) < labels.numel()]
    cols = torch.stack([labels == c for c in kept], 1) if kept else torch.zeros(labels.numel(), 0, dtype=torch.bool)
    return cols, [f"class {class_names[c]}" for c in kept]


def check_directions(model: Glow, directions: dict[str, Sequence[torch.Tensor]]) -> None:
    """ValueError unless every direction has one tensor per level of ``model.latent_shapes``' sizes."""
    for name, levels in directions.items():
        sizes = [d.numel() for d in levels]
        want = [math.prod(s) for s in model.latent_shapes]
        if sizes != want:
            raise ValueError(f"direction {name!r} has levels of {sizes} values; this model's latents have {want}")


def edited(eps: Sequence[torch.Tensor], directions: dict[str, Sequence[torch.Tensor]],
           alphas: dict[str, float]) -> list[torch.Tensor]:
    """``ε + Σ α_name · direction_name`` at every level (each direction reshaped to the level)."""
    out = [e.clone() for e in eps]
    for name, a in alphas.items():
        if a:
            for i, d in enumerate(directions[name]):
                out[i] += a * d.reshape(out[i].shape[1:]).to(out[i])
    return out


# ---------------------------------------------------------------------------- the session
@dataclass
class Encoded:
    """An image the page works on: its label (class-conditional models) and standardised latents."""

    y: torch.Tensor | None
    eps: list[torch.Tensor]


class DemoSession:
    """A model loaded once, in eval mode, with what the page needs from it.

    Every method that runs the model holds ``lock`` (requests arrive on several threads; one model
    call at a time keeps torch's threads for that call) and runs under ``torch.no_grad()``.
    Encoded images are kept by a random token, so a slider update only decodes: at most
    ``per_client`` images per ``client`` (the server passes the client's address; beyond, that
    client's least recently used image goes) and ``cache_size`` in all (beyond, the least recently
    used image of the client that holds the most goes). So another client never pushes out an
    image of a client that holds at most ``cache_size / number of clients`` images.

    ``test_images`` (uint8 (N, C, H, W)) and ``test_labels`` are the run's test images: the
    histogram and readout (``reference``) and the gallery; ``max_level`` the display and upload top
    bin (default: the test images' own, else ``2**n_bits - 1``).
    """

    def __init__(self, model: Glow, *, name: str = "model", test_images: torch.Tensor | None = None,
                 test_labels: torch.Tensor | None = None, class_names: Sequence[str] | None = None,
                 directions: dict[str, Sequence[torch.Tensor]] | None = None, direction_source: str = "",
                 max_level: int | None = None, n_samples: int = 24, cache_size: int = 64, per_client: int = 16,
                 seed: int = 0):
        self.model = model.eval()
        # a slider update is one small decode: on a GPU replayed as a CUDA graph per batch shape
        self._decode = fast_decode(model) if model.device.type == "cuda" else model.decode
        cfg = model.config
        self.name = name
        self.n_bits = cfg.n_bits
        self.num_classes = cfg.num_classes
        self.class_names = list(class_names) if class_names else [str(c) for c in range(cfg.num_classes or 0)]
        self.directions = {k: [d.float().cpu() for d in v] for k, v in (directions or {}).items()}
        check_directions(model, self.directions)
        self.direction_source = direction_source
        self.n_samples = n_samples
        self.seed = seed
        self.lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[str, Encoded]] = OrderedDict()  # token -> (client, latents), LRU first
        self._cache_size = cache_size
        self._per_client = per_client
        self.test_images = test_images if test_images is not None and len(test_images) else None
        self.test_labels = test_labels
        if max_level is None:
            max_level = 2**cfg.n_bits - 1 if self.test_images is None else data_max_level(self.test_images, cfg.n_bits)
        self.max_level = max(1, int(max_level))
        self.reference = None
        if self.test_images is not None and len(self.test_images) >= 2:
            self.reference = Reference(*score_images(model, self.test_images, seed))
        self._gallery = [] if self.test_images is None else [self._url(self.test_images[i : i + 1])
                                                              for i in range(min(GALLERY_SIZE, len(self.test_images)))]

    # ------------------------------------------------------------ helpers
    def _url(self, x_uint8: torch.Tensor) -> str:
        return png_data_url(display_uint8(x_uint8, self.n_bits, self.max_level))

    def _decoded_url(self, eps: Sequence[torch.Tensor], y: torch.Tensor | None, nrow: int = 8) -> str:
        x = decode_eps(self.model, eps, y, decode=self._decode).float().cpu()
        return png_data_url(to_display(x, self.n_bits, self.max_level), nrow)

    def _encoded(self, token: str) -> Encoded:
        if not isinstance(token, str) or token not in self._cache:
            raise KeyError("this image is no longer held by the server (it keeps the latest ones): choose it again")
        self._cache.move_to_end(token)
        return self._cache[token][1]

    def _keep(self, client: str, encoded: Encoded) -> str:
        """Cache ``encoded`` under a new token; evict as the class docstring says."""
        token = secrets.token_urlsafe(12)
        self._cache[token] = (client, encoded)
        held = Counter(c for c, _ in self._cache.values())
        while held[client] > self._per_client:
            self._evict(lambda c: c == client, held)
        while len(self._cache) > self._cache_size:
            most = max(held.values())
            self._evict(lambda c: held[c] == most, held)
        return token

    def _evict(self, whose: Callable[[str], bool], held: Counter) -> None:
        """Drop the least recently used image of a client for which ``whose`` is true."""
        token, (client, _) = next((t, v) for t, v in self._cache.items() if whose(v[0]))
        del self._cache[token]
        held[client] -= 1

    def _best_class(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """The class with the highest likelihood ``p(x | y)`` (one dequantisation draw, seeded)."""
        bpd = [scores_bpd(self.model, x_uint8, seed=self.seed, labels=torch.full((len(x_uint8),), c))
               for c in range(self.num_classes)]
        return torch.stack(bpd).argmin(0)  # lowest bits/dim = highest likelihood

    # ------------------------------------------------------------ what the page asks
    def info(self) -> dict[str, Any]:
        """The page's static facts: model, classes, directions, test histogram and gallery."""
        cfg = self.model.config
        ref = self.reference
        return {
            "name": self.name, "image_shape": list(cfg.image_shape), "n_bits": cfg.n_bits,
            "levels": cfg.n_levels, "steps": cfg.n_steps, "hidden_channels": cfg.hidden_channels,
            "num_classes": cfg.num_classes, "class_names": self.class_names,
            "directions": list(self.directions), "direction_source": self.direction_source,
            "n_test": 0 if ref is None else int(ref.bpd.numel()),
            "histogram": None if ref is None else ref.histogram(),
            "h_hat": None if ref is None else ref.h_hat,
            "gallery": self._gallery, "n_samples": self.n_samples,
        }

    @torch.no_grad()
    def samples(self, temperature: float, seed: int, label: int | None = None) -> str:
        """A grid of ``n_samples`` samples at ``temperature`` (one seeded ε draw per ``seed``, so a
        temperature change with the same seed rescales the same latents), class ``label`` for a
        class-conditional model (default: column j is class j mod num_classes)."""
        if not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}")
        if not 0 <= seed <= MAX_SEED:  # (no value in the message: a huge int has no str())
            raise ValueError("seed must be in [0, 2**63 - 1]")
        if label is not None and not (self.num_classes and 0 <= label < self.num_classes):
            raise ValueError("label must be one of the model's classes" if self.num_classes
                             else "this model is not class-conditional: no label")
        with self.lock:
            (x,) = temperature_rows(self.model, [temperature], n_per_row=self.n_samples, seed=seed, y=label)
            return png_data_url(to_display(x, self.n_bits, self.max_level), nrow=SAMPLES_PER_ROW)

    @torch.no_grad()
    def encode(self, x_uint8: torch.Tensor, y: int | None = None, client: str = "") -> dict[str, Any]:
        """Encode one image (uint8 (1, C, H, W), in the data's range) and keep it under a new token
        (counted against ``client``'s share of the cache).

        Returns the token, the model input and its reconstruction as data URLs, the class used
        (class-conditional: ``y``, else the most likely one) and the typicality readout."""
        with self.lock:
            x = pp.to_uint8(pp.preprocess(x_uint8, self.n_bits), self.n_bits)  # what the model sees
            yy = None
            if self.num_classes:
                yy = torch.tensor([y]) if y is not None else self._best_class(x)
            eps = [e.cpu() for e in encode_eps(self.model, x, yy)]
            bpd, comp = score_images(self.model, x, self.seed)
            token = self._keep(client, Encoded(yy, eps))
            return {
                "token": token, "input": self._url(x), "reconstruction": self._decoded_url(eps, yy),
                "label": None if yy is None else int(yy), "bpd": float(bpd),
                "readout": None if self.reference is None else self.reference.readout(float(bpd), float(comp)),
            }

    def encode_upload(self, data: bytes, invert: bool = False, max_bytes: int = MAX_UPLOAD_BYTES,
                      max_pixels: int = MAX_PIXELS, client: str = "") -> dict[str, Any]:
        """:meth:`encode` of an uploaded file (:func:`read_upload`, outside the model's lock, then
        :func:`to_data_range`)."""
        x = read_upload(data, self.model.config.image_shape, max_bytes=max_bytes, max_pixels=max_pixels)
        return self.encode(to_data_range(x[None], self.n_bits, self.max_level, invert), client=client)

    def encode_test(self, index: int, client: str = "") -> dict[str, Any]:
        """:meth:`encode` of the gallery's test image ``index``, with its own label."""
        if not 0 <= index < len(self._gallery):
            raise ValueError(f"there is no test image {index} (the gallery has {len(self._gallery)})")
        y = int(self.test_labels[index]) if self.num_classes and self.test_labels is not None else None
        return self.encode(self.test_images[index : index + 1], y if y is not None and y >= 0 else None, client)

    @torch.no_grad()
    def edit(self, token: str, alphas: dict[str, float]) -> str:
        """The image ``token`` decoded at ``ε + Σ α · direction`` (α in [-2, 2] per direction name)."""
        for name, a in alphas.items():
            if name not in self.directions:
                raise ValueError(f"unknown direction {name!r}")
            if not (math.isfinite(a) and abs(a) <= MAX_ALPHA):
                raise ValueError(f"{name}: alpha must be in [-{MAX_ALPHA:g}, {MAX_ALPHA:g}], got {a}")
        with self.lock:
            enc = self._encoded(token)
            return self._decoded_url(edited(enc.eps, self.directions, alphas), enc.y)

    @torch.no_grad()
    def mix(self, token_a: str, token_b: str, t: float | None = None, steps: int = 8) -> str:
        """The slerp of two images' latents (every level's ε): at ``t`` in [0, 1], or the strip of
        ``steps`` images from t=0 to t=1 when ``t`` is None. A class-conditional model decodes with
        A's label below t=0.5 and B's from there, so both ends are exact reconstructions."""
        if t is not None and not (math.isfinite(t) and 0 <= t <= 1):
            raise ValueError(f"t must be in [0, 1], got {t}")
        if not 2 <= steps <= 16:
            raise ValueError(f"steps must be in 2..16, got {steps}")
        with self.lock:
            a, b = self._encoded(token_a), self._encoded(token_b)
            ts = [t] if t is not None else [i / (steps - 1) for i in range(steps)]
            eps = [torch.cat([slerp(ea, eb, s) for s in ts]) for ea, eb in zip(a.eps, b.eps)]
            y = None if a.y is None else torch.cat([a.y if s < 0.5 else b.y for s in ts])
            return self._decoded_url(eps, y, nrow=len(ts))

