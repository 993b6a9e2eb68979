"""What the tests of ``torchglow demo`` share: the session they drive, PNG bytes of an image, a
decompression bomb's header, and the skip (or, in CI, failure) when an optional package is missing."""

import io
import os
import struct
import zlib

import pytest
import torch
from PIL import Image

from torchglow.cli.demo import session as demo

from tool_checks import digits_like, make_model


def require(module: str):
    """Import ``module``; skip without it (the test, or at module level the module), except in CI,
    where it must fail instead."""
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed: CI installs it with the dev extra (pip install -e '.[dev]')")
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')", allow_module_level=True)


def make_session() -> demo.DemoSession:
    """A tiny model's session: 40 test images in 4 classes, one direction per class, 8 samples."""
    model = make_model()
    x = digits_like(40, seed=2)
    labels = torch.arange(40) % 4
    attrs, names = demo.class_attributes(labels, ["a", "b", "c", "d"])
    from torchglow.tools.directions import attribute_directions

    directions = attribute_directions(model, x, attrs, names)
    return demo.DemoSession(model, name="tiny", test_images=x, test_labels=labels, directions=directions,
                            direction_source="test", n_samples=8)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One chunk of a PNG file: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` whose pixel data stop after one row: what a
    decompression bomb looks like to a reader of headers."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    row = zlib.compress(bytes(width + 1))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", row) + png_chunk(b"IEND", b"")
