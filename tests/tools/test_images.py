import numpy as np
import pytest
import torch

from torchglow.tools.images import bin_centres, data_max_level, display_max_level, display_uint8, grid_array, save_grid, to_display
from torchglow.preprocess import preprocess, to_uint8

from tool_checks import digits_like, open_png


def test_bin_centres_by_hand():
    # n_bits=5: bins of 8 values; the centre of bin b is (b + 0.5) / 32 - 0.5
    x = torch.tensor([0, 7, 8, 128, 255], dtype=torch.uint8).reshape(1, 1, 1, 5)
    expected = torch.tensor([0.5, 0.5, 1.5, 16.5, 31.5]) / 32 - 0.5
    assert torch.equal(bin_centres(x, 5).flatten(), expected)
    assert torch.equal(bin_centres(x, 8).flatten(), (x.flatten().float() + 0.5) / 256 - 0.5)
    # the centre is half a bin from both edges: to_uint8 gives the n_bits image back
    assert torch.equal(to_uint8(bin_centres(x, 5), 5).flatten(), torch.tensor([0, 0, 8, 128, 248], dtype=torch.uint8))


def test_display_stretches_bins_to_full_range():
    x = torch.tensor([0, 8, 64, 128], dtype=torch.uint8).reshape(1, 1, 2, 2)
    assert data_max_level(x, 5) == 16
    out = display_uint8(x, 5, max_level=16)
    assert out.dtype == torch.uint8
    assert out.flatten().tolist() == [0, 16, 128, 255]  # round(level * 255 / 16)
    # default: the top bin 31 (stored 248) -> 255
    top = torch.tensor([[[[248, 0]]]], dtype=torch.uint8)
    assert display_uint8(top, 5).flatten().tolist() == [255, 0]
    # bins above max_level clamp
    assert display_uint8(top, 5, max_level=16).flatten().tolist() == [255, 0]


def test_display_max_level_of_a_data_set():
    class InMemory:
        images = torch.tensor([0, 40, 96], dtype=torch.uint8).reshape(3, 1, 1, 1)

    assert display_max_level(InMemory(), 5) == 12  # 96 >> 3
    assert display_max_level(object(), 5) == 31  # files, not read


def test_display_is_identity_for_8_bits():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(display_uint8(x, 8), x)


def test_to_display_quantises_like_to_uint8():
    x = torch.rand(3, 1, 4, 4) - 0.5
    assert torch.equal(to_display(x, 5, 16), display_uint8(to_uint8(x, 5), 5, 16))
    # a bin centre of level 16 displays as white when 16 is the top level
    centre = preprocess(torch.full((1, 1, 1, 1), 128, dtype=torch.uint8), 5) + 0.5 / 32
    assert to_display(centre, 5, 16).item() == 255


def test_grey_grid_is_upscaled_and_saved_as_grey(tmp_path):
    x = digits_like(10)
    path = save_grid(x, tmp_path / "sub" / "g.png", nrow=4)
    img = open_png(path)
    assert img.mode == "L"
    # 8 px -> x4 = 32 px, 2 px padding; 10 images in rows of 4 -> 3 rows
    assert img.size == (2 + 4 * 34, 2 + 3 * 34)
    arr = np.asarray(img)
    # nearest upscaling: the first image's first pixel fills a 4x4 block
    assert (arr[2:6, 2:6] == x[0, 0, 0, 0].item()).all()
    assert (arr[2:34, 2:34] == x[0, 0].numpy().repeat(4, 0).repeat(4, 1)).all()


def test_rgb_grid_rows_of_different_length(tmp_path):
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8)]
    img = open_png(save_grid(rows, tmp_path / "c.png"))
    assert img.mode == "RGB"
    assert img.size == (2 + 5 * 34, 2 + 2 * 34)  # 32 px images are not upscaled
    arr = grid_array(rows, scale=2)
    assert arr.shape == (2 + 2 * 66, 2 + 5 * 66, 3)


def test_row_labels_add_a_margin_and_output_is_deterministic(tmp_path):
    x = digits_like(8)
    plain = open_png(save_grid(x, tmp_path / "a.png", nrow=4))
    p1 = save_grid(x, tmp_path / "b.png", nrow=4, row_labels=["T=0", "T=1.0"])
    p2 = save_grid(x, tmp_path / "c.png", nrow=4, row_labels=["T=0", "T=1.0"])
    labelled = open_png(p1)
    assert labelled.height == plain.height and labelled.width > plain.width
    assert p1.read_bytes() == p2.read_bytes()
    with pytest.raises(ValueError, match="row labels"):
        save_grid(x, tmp_path / "d.png", nrow=4, row_labels=["only one"])


def test_grid_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError):
        save_grid(torch.zeros(2, 1, 8, 8), tmp_path / "f.png")
    with pytest.raises(ValueError):
        save_grid(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), tmp_path / "f.png")
