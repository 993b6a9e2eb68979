"""Sample grids: the temperature sweep shared by the trainer and ``torchglow sample``."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from torchglow.tools import sampling
from torchglow.health import NumericalHealthWarning

from conftest import amplifying_model, cli
from tool_checks import open_png


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sample_grid_files_and_shape(model, tmp_path):
    temps = (0.0, 0.7, 1.0)
    summary = sampling.sample_grid(model, tmp_path, temperatures=temps, n_per_row=5, seed=3)
    stem = "samples_T0-0.7-1_n5_seed3"
    assert json.loads((tmp_path / f"{stem}.json").read_text()) == summary
    assert summary["files"] == [str(tmp_path / f"{stem}.png")]
    img = open_png(tmp_path / f"{stem}.png")
    assert img.mode == "L"
    # rows labelled on the left: count rows from the height only (8 px x4 + 2 px padding)
    assert (img.height - 2) // 34 == len(temps)
    assert set(summary["per_temperature"]) == {"0", "0.7", "1"}
    assert all(v["nonfinite"] == 0 for v in summary["per_temperature"].values())


def test_other_options_write_other_files(model, tmp_path):
    """A second call with other temperatures, n or seed leaves the first grid alone."""
    first = sampling.sample_grid(model, tmp_path, temperatures=(0.5,), n_per_row=2, seed=0)
    before = Path(first["files"][0]).read_bytes()
    for kw in (dict(temperatures=(1.0,), n_per_row=2, seed=0), dict(temperatures=(0.5,), n_per_row=3, seed=0),
               dict(temperatures=(0.5,), n_per_row=2, seed=1)):
        other = sampling.sample_grid(model, tmp_path, **kw)
        assert other["files"] != first["files"]
    assert Path(first["files"][0]).read_bytes() == before
    named = sampling.sample_grid(model, tmp_path, temperatures=(0.5,), n_per_row=2, name="mine")
    assert named["files"] == [str(tmp_path / "mine.png")] and (tmp_path / "mine.json").is_file()


def test_sample_grid_is_deterministic(model, tmp_path):
    a = sampling.sample_grid(model, tmp_path / "a", temperatures=(0.5, 1.0), n_per_row=4, seed=7)
    b = sampling.sample_grid(model, tmp_path / "b", temperatures=(0.5, 1.0), n_per_row=4, seed=7)
    c = sampling.sample_grid(model, tmp_path / "c", temperatures=(0.5, 1.0), n_per_row=4, seed=8)
    png = lambda s: Path(s["files"][0]).read_bytes()  # noqa: E731
    assert png(a) == png(b)
    assert png(a) != png(c)


def test_sample_grid_temperature_zero_is_the_prior_mean(model, tmp_path):
    # T=0: every column decodes the prior means, so all samples in the row are one image
    summary = sampling.sample_grid(model, tmp_path, temperatures=(0.0,), n_per_row=3, seed=0)
    arr = torch.from_numpy(np.array(open_png(summary["files"][0])))
    w = arr.shape[1]
    cells = [arr[2:34, w - (3 - j) * 34 : w - (3 - j) * 34 + 32] for j in range(3)]
    assert torch.equal(cells[0], cells[1]) and torch.equal(cells[1], cells[2])


def test_sample_grid_max_level_is_white(model, tmp_path):
    """The displayed value of bin b is round(b * 255 / max_level): with max_level 1 every bin >= 1
    is white, so the images (right of the row label) hold only black and white."""
    summary = sampling.sample_grid(model, tmp_path, temperatures=(1.0,), n_per_row=4, max_level=1)
    assert summary["max_level"] == 1
    images = np.array(open_png(summary["files"][0]))[:, -4 * 34:]
    assert set(np.unique(images)) == {0, 255}


def test_sample_grid_class_conditional(cond_model, tmp_path):
    summary = sampling.sample_grid(cond_model, tmp_path, temperatures=(0.5, 1.0), n_per_row=4, seed=0, name="c")
    assert summary["classes"] == [0, 1, 2]
    assert summary["files"] == [str(tmp_path / "c_T0.5.png"), str(tmp_path / "c_T1.png")]
    for f in summary["files"]:
        assert (open_png(f).height - 2) // 34 == 3  # one row per class
    sub = sampling.sample_grid(cond_model, tmp_path / "sub", temperatures=(1.0,), n_per_row=2, classes=[2])
    assert (open_png(sub["files"][0]).height - 2) // 34 == 1


def test_temperature_rows_match_model_sample(model, cond_model):
    rows = sampling.temperature_rows(model, (0.0, 0.7), n_per_row=4, seed=3)
    assert [tuple(r.shape) for r in rows] == [(4, 1, 8, 8)] * 2
    with torch.no_grad():
        expected = model.sample(4, 0.7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(rows[1], expected)
    assert all(torch.equal(rows[0][0], r) for r in rows[0])  # T=0: the prior mean in every column
    again = sampling.temperature_rows(model, (0.0, 0.7), n_per_row=4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(rows, again))
    # class-conditional: column j is class j % num_classes unless y is given
    crows = sampling.temperature_rows(cond_model, (1.0,), n_per_row=4, seed=0)
    with torch.no_grad():
        expected = cond_model.sample(4, 1.0, y=torch.tensor([0, 1, 2, 0]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(crows[0], expected)


def test_non_finite_samples_are_counted_and_warned(model, tmp_path):
    with pytest.warns(NumericalHealthWarning, match="inf/NaN"):
        summary = sampling.sample_grid(model, tmp_path, temperatures=(1e38,), n_per_row=2, name="hot")
    assert summary["per_temperature"]["1e+38"]["nonfinite"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cool = sampling.sample_grid(model, tmp_path, temperatures=(1.0,), n_per_row=2, name="cool")
    assert cool["per_temperature"]["1"]["nonfinite"] == 0


def test_bad_options(model, cond_model, tmp_path):
    with pytest.raises(ValueError, match="class-conditional"):
        sampling.sample_grid(model, tmp_path, classes=[0])
    with pytest.raises(ValueError, match="temperatures"):
        sampling.sample_grid(model, tmp_path, temperatures=(-1.0,))
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        sampling.sample_grid(cond_model, tmp_path, classes=[3])


# ---------------------------------------------------------------- the fast path
def test_fast_temperature_rows_equal_eager(model, cond_model):
    """The fast decode (static buffers; a CUDA graph on CUDA) gives the eager decode's rows (atol
    1e-5 in model space, where pixels span [-0.5, 0.5)), the conditional model's labels included."""
    for m in (model, cond_model):
        eager = sampling.temperature_rows(m, (0.0, 0.7, 1.0), n_per_row=4, seed=3)
        fast = sampling.temperature_rows(m, (0.0, 0.7, 1.0), n_per_row=4, seed=3, fast=True)
        for a, b in zip(eager, fast):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_sample_fast_command_draws_the_eager_grid(model, cond_model, tmp_path, capsys):
    """``torchglow sample --fast`` writes the grids of the eager command, pixel for pixel to one
    display level (a value on a bin edge may round either way): one grid, or one per temperature."""
    for m in (model, cond_model):
        pre = tmp_path / f"classes{m.config.num_classes}"
        m.save_pretrained(pre)
        summaries = []
        for flags in ((), ("--fast",)):
            code, out, err = cli(capsys, "sample", pre, "--device", "cpu", "--n", 3, "--temperatures", 0, 0.8,
                                 "--name", "fast" if flags else "eager", *flags)
            assert code == 0, err
            summaries.append(json.loads(out))
        assert [s["fast"] for s in summaries] == [False, True]
        assert len(summaries[1]["files"]) == (2 if m.config.num_classes else 1)
        for a, b in zip(*(s["files"] for s in summaries)):
            diff = np.asarray(open_png(a), dtype=int) - np.asarray(open_png(b), dtype=int)
            assert np.abs(diff).max() <= 9  # one of the 32 bins shown: 255 / 31 ≈ 8.2 grey levels


def test_cli_sample_warns_about_non_finite_pixels(capsys, tmp_path, monkeypatch):
    """`sample --temperatures 5 50`: a NumericalHealthWarning counting the inf/NaN values of the
    row that overflowed (the same count as samples.json); the finite row, mostly clipped, one
    saying so."""
    from torchglow import health

    monkeypatch.setattr(health, "_warned", set())
    amplifying_model().save_pretrained(tmp_path / "model")
    with pytest.warns(health.NumericalHealthWarning) as record:
        rc, _, _ = cli(capsys, "sample", tmp_path / "model", "--temperatures", "5", "50", "--out", tmp_path / "s",
                        "--name", "grid")
    assert rc == 0
    per_t = json.loads((tmp_path / "s" / "grid.json").read_text())["per_temperature"]
    assert per_t["5"]["nonfinite"] == 0 and per_t["50"]["nonfinite"] > 0
    assert per_t["5"]["clipped_fraction"] > 0.5
    assert [str(w.message).split(":")[0] for w in record] == ["samples at T=5", "samples at T=50"]
    assert "of the values lie outside the image range and are clipped" in str(record[0].message)
    assert f"{per_t['50']['nonfinite']} of 128 values are inf/NaN" in str(record[1].message)
