"""The interactive page of the official Glow demo (openai/glow demo/) for any trained run: samples
at a temperature, an uploaded image's model input, reconstruction, bits/dim and typicality, a
slider per attribute direction, and a walk between two images (``torchglow demo``).

Everything the page shows is computed here, by functions and a :class:`DemoSession` that are tested
without a browser; :mod:`torchglow.demo_server` (Starlette + uvicorn) is a thin web layer over the
session, and ``torchglow/demo_static/`` the one page (plain HTML/CSS/JS, nothing from a network).

Images in and out:

* An upload (PNG, JPEG, GIF, WebP or BMP: :func:`read_upload` says how hostile files are kept out)
  is decoded as :mod:`torchglow.data` decodes an image folder (grey or RGB, centred square crop,
  Lanczos resize to the model's size), then its intensities are mapped onto the bins the run's
  data use: ``bin = round(v / 255 · max_level)``, stored as ``bin · 2**(8 - n_bits)``. For 8-bit data
  (``max_level`` 255) this is the identity; the digits use bins 0..16 of 32 (``level · 8``), so an
  upload's white becomes the digits' white rather than twice as bright as anything the model saw.
* Shown images go through :func:`torchglow.images.to_display` (bin ``max_level`` -> 255) and
  :func:`torchglow.images.grid_array` (nearest-neighbour upscaling), as PNG data URLs.

Latents are the standardised ``ε`` of every level (:func:`torchglow.latent.encode_eps`), as the
official demo: an edit is ``ε + Σ α_i · d_i`` over the attribute directions ``d_i``
(:func:`torchglow.latent.attribute_directions`), a mix is the slerp of each level's ``ε``.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import functools
import io
import math
import secrets
import sys
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ... import preprocess as pp
from ...tools.images import data_max_level, display_uint8, grid_array, to_display
from ...tools.fast import fast_decode
from ...tools.latent import decode_eps, encode_eps, slerp
from ...model import Glow
from ...tools.ood import complexity_scores, scores_bpd
from ...train.runs import Run, open_run
from ...tools.sampling import temperature_rows

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 50_000_000  # a phone photo is 12-50 MP; decoding is refused above this (decompression bombs)
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")  # Pillow's names; an image folder's (data.IMAGE_EXTENSIONS)
FORMAT_NAMES = "PNG, JPEG, GIF, WebP or BMP"
DECODE_SLOTS = 2  # uploads decoded at once
_decoding = threading.BoundedSemaphore(DECODE_SLOTS)
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
MAX_ALPHA = 2.0  # the page's sliders span [-1, 1], as the official demo's
HISTOGRAM_BINS = 30
GALLERY_SIZE = 16
MAX_CLASS_DIRECTIONS = 100  # one slider per class up to this many classes (not ImageNet's 1000)
SAMPLES_PER_ROW = 6


def human_size(n_bytes: float) -> str:
    """``"10.0 MiB"``, or ``"977 KiB"`` below a MiB."""
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.0f} KiB"


class UploadError(ValueError):
    """An upload that is not a usable image; the message says why, in words for the page."""


# ---------------------------------------------------------------------------- images in and out
def read_upload(data: bytes, image_shape: Sequence[int], *, name: str = "the upload",
                max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Bytes of an image file -> uint8 (C, H, W) at the model's shape, decoded as an image folder's
    files are (:func:`torchglow.data.read_image`: a GIF's first frame, grey or RGB, centred square
    crop, Lanczos resize).

    Hostile files are refused before they cost memory: only :data:`UPLOAD_FORMATS` are tried (no
    EPS, whose plugin runs Ghostscript, no ICO, whose plugin decodes an embedded PNG while opening),
    the pixel count of the header of the format actually opened is checked against ``max_pixels``
    before anything is decoded, and at most :data:`DECODE_SLOTS` files are decoded at once (each
    needs about 8 bytes a pixel: Pillow's 4-byte RGB(A) image, then its conversion), their memory
    handed back to the system afterwards. Raises :class:`UploadError` for an empty, oversized,
    foreign, truncated or corrupt file."""
    c, h, w = image_shape
    if h != w:
        raise UploadError(f"uploads need a square model input, this model takes {h} x {w}")
    if not data:
        raise UploadError(f"{name} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise UploadError(f"{name} is {human_size(len(data))}; the limit is {human_size(max_bytes)}")
    try:
        with _decoding:
            return _decode(data, h, c, name, max_pixels)
    finally:
        _return_freed_memory()


def _decode(data: bytes, size: int, channels: int, name: str, max_pixels: int) -> torch.Tensor:
    """:func:`read_upload`'s decoding, under its semaphore."""
    from PIL import Image

    too_big = f"{name} has more pixels than the limit of {max_pixels:,}; make it smaller first"
    try:
        file = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own limit (serve sets it)
        raise UploadError(too_big) from None
    except Exception:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError... for other files
        raise UploadError(f"{name} is not an image of a kind the demo reads ({FORMAT_NAMES})") from None
    with file:
        width, height = file.size
        if width * height > max_pixels:
            raise UploadError(f"{name} is {width} x {height} = {width * height:,} pixels; "
                              f"the limit is {max_pixels:,}: make it smaller first")
        mode = "L" if channels == 1 else "RGB"
        try:  # convert() of an image already in `mode` would only copy it: twice the memory
            image = file.convert(mode) if file.mode != mode else file
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # a GIF frame past the header
            raise UploadError(too_big) from None
        except Exception as e:
            raise UploadError(f"{name} cannot be decoded, it is truncated or corrupt ({e})") from None
        # the centred square crop and Lanczos resize of torchglow.data.read_image, on the opened file
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
    pixels = torch.from_numpy(np.array(image)).reshape(size, size, channels)  # (H, W, C)
    return pixels.permute(2, 0, 1).contiguous()


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc; TypeError: Windows has no CDLL(None)
        return None


def _return_freed_memory() -> None:
    """Hand the memory of a decoded image back to the system now. glibc keeps freed blocks in the
    arena of the thread that freed them, one arena per thread of the server's pool, so a burst of
    large uploads decoded on different threads kept gigabytes for minutes; ``malloc_trim(0)``
    releases the free pages of every arena."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def to_data_range(x_uint8: torch.Tensor, n_bits: int, max_level: int, invert: bool = False) -> torch.Tensor:
    """Full-range uint8 images -> the bins ``0..max_level`` the run's data use: ``bin = round(v / 255 ·
    max_level)`` (of ``255 - v`` with ``invert``, for dark ink on light paper), stored as
    ``bin · 2**(8 - n_bits)`` as :func:`torchglow.preprocess.to_uint8` stores bins."""
    v = x_uint8.to(torch.float32)
    if invert:
        v = 255.0 - v
    bins = torch.round(v * (max_level / 255.0)).clamp_(0, 2**n_bits - 1)
    return (bins.to(torch.int32) << (8 - n_bits)).to(torch.uint8)


def png_data_url(images: torch.Tensor, nrow: int = 8) -> str:
    """uint8 display images (N, C, H, W) -> a ``data:image/png`` URL of their grid
    (:func:`torchglow.images.grid_array`: nearest-neighbour upscaled to at least 32 px; 1 px white
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

    ``bpd``: their bits/dim (seeded dequantisation, :func:`torchglow.ood.scores_bpd`);
    ``complexity``: their input-complexity scores ``S = bpd − L`` (Serrà et al. 2020,
    :func:`torchglow.ood.complexity_scores`). ``h_hat``, the mean bits/dim, is Nalisnick et al.'s
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
    :mod:`torchglow.ood` (the marginal likelihood for a class-conditional model)."""
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


def latest_run(root: str | Path = "runs") -> Path:
    """The most recently modified folder under ``root`` that holds a checkpoint or a pretrained model."""
    from ...model import CONFIG_NAME, WEIGHTS_NAME

    def holds_model(p: Path) -> bool:
        return (any((p / name).is_file() for name in ("best.pt", "last.pt"))
                or ((p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()))

    root = Path(root)
    found = [p for p in root.iterdir() if p.is_dir() and holds_model(p)] if root.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no run folder with a checkpoint under {root}/: pass RUN (a run folder, "
                                f"checkpoint or pretrained folder)")
    return max(found, key=lambda p: p.stat().st_mtime)


# ---------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", metavar="RUN",
                   help="run folder, .pt checkpoint or pretrained folder (default: the newest run under runs/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other address, such as "
                        "0.0.0.0 or a LAN address, serves the page and its API to the network, without authentication)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests that name NAME as their Host (repeatable; '*.example.org' for its "
                        "subdomains): the names other machines use for a --host that is not loopback. Requests "
                        "naming any other host are refused (DNS rebinding)")
    p.add_argument("--port", type=int, default=8000, help="port (0: pick a free one); the URL is printed")
    p.add_argument("--dataset", help="data set of the test images and directions (default: the run's)")
    p.add_argument("--data-dir", help="where the data set's files are (default: the run's)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--directions", metavar="FILE", help="attribute directions saved by torchglow manipulate "
                     "--save-directions (default: from the data set's attributes or classes)")
    src.add_argument("--labels-csv", metavar="FILE",
                     help="CSV of binary attributes of the training images (header 'id,NAME,...'), as for "
                          "torchglow manipulate")
    p.add_argument("--max-images", type=int, default=2000,
                   help="at most this many (seeded) images for the directions and for the test histogram")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20, help="upload size limit")
    p.add_argument("--samples", type=int, default=24, help=f"samples in the grid ({SAMPLES_PER_ROW} a row)")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of images and the bits/dim dequantisation noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _directions(args: argparse.Namespace, run: Run) -> tuple[dict[str, list[torch.Tensor]], str]:
    """Attribute directions: a saved file, or computed from the training split's labels (a CSV, the
    data set's per-image attributes, or its classes); none when the run's data are not at hand."""
    from ..errors import CLIError
    from ...data import DatasetError
    from ...data.labels import attribute_labels, image_ids, labels_from_csv
    from ...tools.directions import attribute_directions, load_directions

    model = run.model
    if args.directions:
        if not Path(args.directions).is_file():
            raise CLIError(f"directions file {args.directions} does not exist")
        try:
            directions = load_directions(args.directions)
            check_directions(model, directions)
        except ValueError as e:
            raise CLIError(f"cannot use directions file {args.directions}: {e}") from None
        return directions, f"file {args.directions}"
    try:
        src = run.pick("train", args.max_images, args.seed, args.dataset, args.data_dir)
    except (ValueError, DatasetError) as e:
        print(f"torchglow demo: no attribute sliders: no training images ({e})", file=sys.stderr)
        return {}, ""
    data, index = src.data, src.index
    classes = torch.as_tensor(data.labels)[index]
    if args.labels_csv:
        try:
            labels, names = labels_from_csv(args.labels_csv, image_ids(data))
        except ValueError as e:
            raise CLIError(str(e)) from None
        labels, source = labels[index], f"{args.labels_csv} on {data.name}"
    elif getattr(data, "attributes", None) is not None:
        labels, names = attribute_labels(data)
        labels, source = labels[index], f"attributes of {data.name}"
    elif data.num_classes and data.num_classes > MAX_CLASS_DIRECTIONS:
        print(f"torchglow demo: no attribute sliders: {data.name} has {data.num_classes} classes, more than "
              f"{MAX_CLASS_DIRECTIONS} sliders (pass --labels-csv or --directions)", file=sys.stderr)
        return {}, ""
    elif data.num_classes and (classes >= 0).all():
        labels, names = class_attributes(classes, data.class_names or [str(c) for c in range(data.num_classes)])
        source = f"classes of {data.name}"
    else:
        print(f"torchglow demo: no attribute sliders: {data.name} has no labels (pass --labels-csv or --directions)",
              file=sys.stderr)
        return {}, ""
    n_pos = labels.sum(0).tolist()
    keep = [i for i, k in enumerate(n_pos) if 0 < k < len(index)]  # a direction needs images with and without
    if len(keep) < len(names):
        print(f"torchglow demo: no slider for {', '.join(names[i] for i in range(len(names)) if i not in keep)}: "
              f"all or none of the {len(index)} images have it", file=sys.stderr)
    if not keep:
        return {}, ""
    directions = attribute_directions(model, src.images, labels[:, keep], [names[i] for i in keep], y=src.y)
    return directions, f"{source} ({len(index)} images)"


def cmd_demo(args: argparse.Namespace) -> int:
    """``torchglow demo``; Ctrl+C, while the model loads or the page is served, stops it with one
    line and exit status 130 (128 + SIGINT, as ``torchglow train``)."""
    try:
        return _demo(args)
    except KeyboardInterrupt:
        print("torchglow demo: stopped (Ctrl+C)", file=sys.stderr)
        return 130


def _demo(args: argparse.Namespace) -> int:
    from ..errors import CLIError
    from ...data import DatasetError
    from ...devices import resolve_device

    try:
        from . import server as demo_server
    except ImportError as e:
        raise CLIError(f"the demo needs the web extra ({e}): pip install 'torchglow[demo]'") from None
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    if args.max_images < 1 or args.samples < 1 or args.max_upload_mb <= 0:
        raise CLIError("--max-images, --samples and --max-upload-mb must be positive")
    try:
        demo_server.check_host_names(args.allow_host)
    except ValueError as e:
        raise CLIError(f"--allow-host: {e}") from None
    try:
        run = str(args.run or latest_run())
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    opened = open_run(run, resolve_device(args.device))
    directions, source = _directions(args, opened)
    test_x = test_y = class_names = None
    try:
        test = opened.pick("test", args.max_images, args.seed, args.dataset, args.data_dir, labels=False)
        test_x, test_y, class_names = test.images, torch.as_tensor(test.data.labels)[test.index], test.data.class_names
    except (ValueError, DatasetError) as e:
        print(f"torchglow demo: no histogram or gallery: no test images ({e})", file=sys.stderr)
    session = DemoSession(opened.model, name=run, test_images=test_x, test_labels=test_y, class_names=class_names,
                          directions=directions, direction_source=source, max_level=opened.display_max_level(),
                          n_samples=args.samples, seed=args.seed)
    try:
        demo_server.serve(session, args.host, args.port, max_upload_bytes=int(args.max_upload_mb * 2**20),
                          allow_hosts=args.allow_host)
    except OSError as e:  # the address is taken or not this machine's
        raise CLIError(str(e)) from None
    return 0
