"""Latent tools: reconstruction, interpolation and manipulation. Exactness is checked on the
images the tools draw (decoded from their PNG grids), not only on the flags they report."""

import copy
import json

import numpy as np
import pytest
import torch

from torchglow.preprocess import preprocess, to_uint8
from torchglow.tools import latent
from torchglow.tools.directions import attribute_directions
from torchglow.tools.images import bin_centres, data_max_level, display_uint8

from conftest import amplifying_model
from tool_checks import digits_like, grid_shape, open_png


pytestmark = pytest.mark.usefixtures("one_thread")


def png_cells(path, cols, h=8, scale=4, pad=2) -> torch.Tensor:
    """The grey h x h images of a PNG grid of ``cols`` columns (upscaled ``scale`` times, ``pad`` px
    apart) as uint8 (rows, cols, h, h). The grid is right-aligned: row labels on its left are skipped."""
    arr = np.asarray(open_png(path))
    cell = h * scale + pad
    left = arr.shape[1] - cols * cell
    return torch.stack([torch.stack([torch.from_numpy(arr[top : top + h * scale : scale,
                                                          left + c * cell : left + c * cell + h * scale : scale].copy())
                                     for c in range(cols)])
                        for top in range(pad, arr.shape[0] - pad, cell)])


def shown(x, max_level=None) -> torch.Tensor:
    """(N, h, w): grey uint8 images ``x`` as the tools draw them (:func:`display_uint8`, bin
    ``max_level`` as white, by default the images' own top bin)."""
    return display_uint8(x, 5, data_max_level(x, 5) if max_level is None else max_level)[:, 0]


# ------------------------------------------------------------------ reconstruction
def test_reconstruct_is_exact(model, tmp_path):
    x = digits_like(12, seed=2)
    summary = latent.reconstruct(model, x, tmp_path, nrow=6, batch_size=5)
    assert summary["max_abs_error"] < 1e-4
    assert summary["uint8_exact"] and summary["mismatched_pixels"] == 0
    assert json.loads((tmp_path / "reconstruction.json").read_text()) == summary
    cells = png_cells(tmp_path / "reconstruction.png", cols=6)
    assert cells.shape[:2] == (4, 6)  # 2 chunks of 6 x (original, reconstruction)
    assert torch.equal(cells[0::2].reshape(12, 8, 8), shown(x))
    assert torch.equal(cells[1::2].reshape(12, 8, 8), shown(x))


def test_reconstruct_full_range_8bit_images(model, tmp_path):
    # low bits below n_bits are not representable: the comparison is with the n_bits image
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (6, 1, 8, 8), generator=g, dtype=torch.uint8)
    summary = latent.reconstruct(model, x, tmp_path)
    assert summary["uint8_exact"]
    reduced = to_uint8(preprocess(x, 5), 5)
    assert not torch.equal(reduced, x)
    cells = png_cells(tmp_path / "reconstruction.png", cols=6)
    assert torch.equal(cells[0], shown(reduced)) and torch.equal(cells[1], shown(reduced))
    # the model was initialised on 0..128 images: brighter inputs are far out of its range and
    # the float32 inverse is less accurate there, but still well inside the bin (half width 1/64)
    assert summary["max_abs_error"] < 0.25 / 32
    summary64 = latent.reconstruct(copy.deepcopy(model).double(), x, tmp_path / "f64")
    assert summary64["dtype"] == "float64" and summary64["max_abs_error"] < 1e-10


def test_reconstruct_round_trip_matches_to_uint8(model):
    x = digits_like(4, seed=4)
    xc = bin_centres(x, 5)
    with torch.no_grad():
        rec = model.decode(model.encode(xc)[0])
    assert torch.equal(to_uint8(rec, 5), x)


def test_reconstruct_class_conditional(cond_model, tmp_path):
    x = digits_like(6, seed=5)
    summary = latent.reconstruct(cond_model, x, tmp_path, y=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert summary["uint8_exact"] and summary["max_abs_error"] < 1e-4
    cells = png_cells(tmp_path / "reconstruction.png", cols=6)
    assert torch.equal(cells[0], shown(x)) and torch.equal(cells[1], shown(x))
    with pytest.raises(ValueError, match="pass y"):
        latent.reconstruct(cond_model, x, tmp_path)


# ------------------------------------------------------------------ interpolation
def test_slerp_and_lerp_basics():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    mid = latent.slerp(a, b, 0.5)
    torch.testing.assert_close(mid, torch.tensor([[2**-0.5, 2**-0.5]]))
    for t in (0.1, 0.3, 0.9):
        torch.testing.assert_close(latent.slerp(a, b, t).norm(), torch.tensor(1.0))  # stays on the sphere
    assert torch.equal(latent.slerp(a, b, 0.0), a) and torch.equal(latent.slerp(a, b, 1.0), b)
    # parallel rows fall back to linear interpolation
    torch.testing.assert_close(latent.slerp(a, 3 * a, 0.5), 2 * a)
    torch.testing.assert_close(latent.lerp(a, b, 0.25), torch.tensor([[0.75, 0.25]]))


def test_interpolate_endpoints_are_the_images(model, tmp_path):
    xa, xb = digits_like(3, seed=6), digits_like(3, seed=7)
    summary = latent.interpolate(model, xa, xb, tmp_path, steps=5)
    assert summary["methods"] == ["linear", "slerp"]
    for m in ("linear", "slerp"):
        res = summary["per_method"][m]
        assert res["endpoint_max_abs_error"] < 1e-4 and res["endpoints_uint8_exact"]
        assert grid_shape(open_png(tmp_path / f"interpolation_{m}.png")) == (3, 5)
        cells = png_cells(tmp_path / f"interpolation_{m}.png", cols=5)
        level = max(data_max_level(xa, 5), data_max_level(xb, 5))
        assert torch.equal(cells[:, 0], shown(xa, level)) and torch.equal(cells[:, -1], shown(xb, level))
    assert json.loads((tmp_path / "interpolation.json").read_text()) == summary
    # the decoded ends equal the originals, and the two methods differ in between
    eps_a = latent.encode_eps(model, xa)
    eps_b = latent.encode_eps(model, xb)
    ends = latent.decode_eps(model, eps_a)
    assert torch.equal(to_uint8(ends, 5), xa)
    lin = latent.decode_eps(model, [latent.lerp(a, b, 0.5) for a, b in zip(eps_a, eps_b)])
    sph = latent.decode_eps(model, [latent.slerp(a, b, 0.5) for a, b in zip(eps_a, eps_b)])
    assert not torch.allclose(lin, sph)


def test_interpolate_single_method_and_conditional(cond_model, tmp_path):
    xa, xb = digits_like(2, seed=8), digits_like(2, seed=9)
    summary = latent.interpolate(cond_model, xa, xb, tmp_path, steps=3, method="slerp", y=torch.tensor([1, 2]))
    assert summary["methods"] == ["slerp"]
    assert summary["per_method"]["slerp"]["endpoints_uint8_exact"]
    cells = png_cells(tmp_path / "interpolation_slerp.png", cols=3)
    level = max(data_max_level(xa, 5), data_max_level(xb, 5))
    assert cells.shape[:2] == (2, 3)
    assert torch.equal(cells[:, 0], shown(xa, level)) and torch.equal(cells[:, -1], shown(xb, level))
    with pytest.raises(ValueError, match="unknown interpolation"):
        latent.interpolate(cond_model, xa, xb, tmp_path, method="cubic", y=torch.tensor([1, 2]))


# ------------------------------------------------------------------ manipulation


def test_manipulate_alpha_zero_is_the_original(model, tmp_path):
    x = digits_like(3, seed=13)
    labels = torch.arange(30) % 3 == 0
    dirs = attribute_directions(model, digits_like(30, seed=14), labels, names=["zero mod 3"])
    summary = latent.manipulate(model, x, dirs["zero mod 3"], tmp_path, name="zero mod 3")
    assert summary["alpha0_uint8_exact"] and summary["alpha0_max_abs_error"] < 1e-4
    assert summary["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    png = tmp_path / "manipulate_zero_mod_3.png"
    assert summary["files"] == [str(png)]
    assert grid_shape(open_png(png)) == (3, 5)
    assert torch.equal(png_cells(png, cols=5)[:, 2], shown(x))  # the column of alpha = 0
    assert json.loads((tmp_path / "manipulate_zero_mod_3.json").read_text()) == summary


def test_manipulate_moves_along_the_direction(model, tmp_path):
    x = digits_like(2, seed=15)
    big = [torch.full(s, 3.0) for s in model.latent_shapes]
    latent.manipulate(model, x, big, tmp_path, alphas=(0.0, 1.0))
    eps = latent.encode_eps(model, x)
    edited = latent.decode_eps(model, [e + d for e, d in zip(eps, big)])
    assert not torch.equal(to_uint8(edited, 5), x)
    with pytest.raises(ValueError, match="levels"):
        latent.manipulate(model, x, big[:1], tmp_path)


def test_manipulate_class_conditional(cond_model, tmp_path):
    x = digits_like(3, seed=16)
    y = torch.tensor([0, 1, 2])
    dirs = attribute_directions(cond_model, digits_like(12, seed=17), torch.arange(12) < 6,
                                names=["first half"], y=torch.arange(12) % 3)
    summary = latent.manipulate(cond_model, x, dirs["first half"], tmp_path, y=y, name="half")
    assert summary["alpha0_uint8_exact"]
    assert torch.equal(png_cells(tmp_path / "manipulate_half.png", cols=5)[:, 2], shown(x))


def test_interpolate_and_manipulate_count_broken_frames(tmp_path, monkeypatch):
    """Frames that are non-finite or mostly clipped are counted in the JSON and warned about (as
    sample does): an amplifying model overflows along a long direction; a decode scaled up 1000x
    clips every frame of an interpolation."""
    from tool_checks import make_model

    from torchglow.health import NumericalHealthWarning

    model = amplifying_model()
    x = (torch.arange(2 * 16).reshape(2, 1, 4, 4) * 4).to(torch.uint8)
    direction = [torch.full(s, 50.0) for s in model.latent_shapes]
    with pytest.warns(NumericalHealthWarning, match="manipulate far: 2 of 4 frames are non-finite"):
        summary = latent.manipulate(model, x, direction, tmp_path, alphas=(0.0, 1.0), name="far")
    assert (summary["frames"], summary["nonfinite_frames"], summary["clipped_frames"]) == (4, 2, 0)
    with pytest.warns(NumericalHealthWarning, match="decoded latents: 2 of 2 frames are non-finite"):
        latent.decode_eps(model, [e + 50.0 for e in latent.encode_eps(model, x)])  # the demo's edit and mix

    model = make_model()
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda *args, **kwargs: 1000 * decode(*args, **kwargs))
    with pytest.warns(NumericalHealthWarning, match=r"interpolation \(linear\): 10 of 10 frames are mostly clipped"):
        summary = latent.interpolate(model, digits_like(2, seed=1), digits_like(2, seed=2), tmp_path, steps=5,
                                     method="linear")
    counts = summary["per_method"]["linear"]
    assert (counts["frames"], counts["nonfinite_frames"], counts["clipped_frames"]) == (10, 0, 10)


def test_manipulate_all_encodes_once(model, tmp_path, monkeypatch):
    x = digits_like(2, seed=18)
    dirs = {"up": [torch.full(s, 0.5) for s in model.latent_shapes], "down": [torch.full(s, -0.5) for s in model.latent_shapes]}
    summary = latent.manipulate_all(model, x, dirs, tmp_path, alphas=(0.0, 1.0), info={"from": "test"})
    assert list(summary["attributes"]) == ["up", "down"] and summary["from"] == "test"
    assert summary["files"] == [str(tmp_path / "manipulate_up.png"), str(tmp_path / "manipulate_down.png")]
    assert json.loads((tmp_path / "manipulate.json").read_text()) == summary
    calls = []
    encode = latent.encode_eps
    monkeypatch.setattr(latent, "encode_eps", lambda *a, **k: calls.append(1) or encode(*a, **k))
    again = latent.manipulate_all(model, x, dirs, tmp_path / "again", alphas=(0.0, 1.0))["attributes"]
    assert [{k: v for k, v in s.items() if k != "files"} for s in again.values()] == \
        [{k: v for k, v in s.items() if k != "files"} for s in summary["attributes"].values()]
    assert len(calls) == 1  # one encode for both directions
