"""Uploads of ``torchglow demo``: an image file in, the model's input out.

An upload (PNG, JPEG, GIF, WebP or BMP: :func:`read_upload` says how hostile files are kept out) is
decoded as :mod:`torchglow.data` decodes an image folder (grey or RGB, centred square crop, Lanczos
resize to the model's size), then its intensities are mapped onto the bins the run's data use
(:func:`to_data_range`): ``bin = round(v / 255 · max_level)``, stored as ``bin · 2**(8 - n_bits)``.
For 8-bit data (``max_level`` 255) this is the identity; the digits use bins 0..16 of 32
(``level · 8``), so an upload's white becomes the digits' white rather than twice as bright as
anything the model saw.
"""

from __future__ import annotations

import ctypes
import functools
import io
import threading
from typing import Sequence

import torch

from ...data.base import centre_square, image_tensor

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 50_000_000  # a phone photo is 12-50 MP; decoding is refused above this (decompression bombs)
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")  # Pillow's names; an image folder's (data.IMAGE_EXTENSIONS)
FORMAT_NAMES = "PNG, JPEG, GIF, WebP or BMP"
DECODE_SLOTS = 2  # uploads decoded at once
_decoding = threading.BoundedSemaphore(DECODE_SLOTS)


def human_size(n_bytes: float) -> str:
    """``"10.0 MiB"``, or ``"977 KiB"`` below a MiB."""
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.0f} KiB"


class UploadError(ValueError):
    """An upload that is not a usable image; the message says why, in words for the page."""


# ---------------------------------------------------------------------------- decoding
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
        image = image.resize((size, size), Image.Resampling.LANCZOS, box=centre_square(width, height))
    return image_tensor(image, size, channels)


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

