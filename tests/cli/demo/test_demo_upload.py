"""``torchglow demo``'s uploads (``cli/demo/upload.py``): an uploaded file decoded like an image
folder's, mapped to the data's range, and the files it refuses."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from torchglow.cli.demo import upload

from demo_checks import header_only_png, png_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_read_upload_converts_like_an_image_folder(tmp_path):
    from torchglow.data import load_dataset

    img = Image.new("RGB", (48, 32), (0, 0, 0))  # landscape: the centred 32x32 square is kept
    img.paste((255, 255, 255), (8, 0, 40, 32))  # that square is white, the 8-px side bands black
    img.save(tmp_path / "wide.png")
    x = upload.read_upload(png_bytes(img), (1, 8, 8))
    assert x.dtype == torch.uint8 and x.shape == (1, 8, 8)
    assert (x[:, :, 1:7] >= 250).all()  # (the Lanczos kernel reaches past the square's edge)
    folder = load_dataset(f"folder:{tmp_path}", "train", image_size=8, channels=1)
    assert torch.equal(x, folder[0][0])
    rgb = upload.read_upload(png_bytes(Image.new("L", (5, 5), 100)), (3, 4, 4))
    assert rgb.shape == (3, 4, 4) and (rgb == 100).all()


def test_to_data_range_maps_white_to_the_data_top_bin():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 1, 1, 3)
    assert upload.to_data_range(x, 5, 16).flatten().tolist() == [0, 8 * 8, 16 * 8]  # bins 0, 8, 16 of 32
    assert upload.to_data_range(x, 5, 16, invert=True).flatten().tolist() == [16 * 8, 8 * 8, 0]
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(upload.to_data_range(every, 8, 255), every)


@pytest.mark.parametrize("data, needle", [
    (b"", "empty (0 bytes)"),
    (b"just some text, not an image", "not an image"),
    (header_only_png(20_000, 20_000), "more pixels than the limit of 50,000,000"),
    (header_only_png(10_000, 6_000), "10000 x 6000 = 60,000,000 pixels"),
], ids=["empty", "text", "20000x20000", "60MP"])
def test_read_upload_refuses_bad_files(data, needle):
    with pytest.raises(upload.UploadError, match=re.escape(needle)):
        upload.read_upload(data, (1, 8, 8))


def test_read_upload_refuses_truncated_and_oversized_files():
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    with pytest.raises(upload.UploadError, match="truncated or corrupt"):
        upload.read_upload(data[: len(data) // 2], (1, 8, 8))
    with pytest.raises(upload.UploadError, match="the limit is 1 KiB"):
        upload.read_upload(data, (1, 8, 8), max_bytes=1000)
