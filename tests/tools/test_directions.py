"""Manipulation directions: the official demo's formula, labels of either sign, the directions file."""

import pytest
import torch

from torchglow.data import labels as label_sources
from torchglow.tools import directions, latent

from tool_checks import digits_like


pytestmark = pytest.mark.usefixtures("one_thread")


def test_attribute_directions_match_the_official_formula(model):
    x = digits_like(40, seed=10)
    classes = torch.arange(40) % 10
    labels, names = label_sources.binary_labels_from_classes(classes, 3)
    assert names == ["class_3"] and labels.shape == (40, 1) and labels.sum() == 4
    two = torch.cat([labels, (classes < 5)[:, None]], 1)
    dirs = directions.attribute_directions(model, x, two, names=["three", "small"], batch_size=7)
    assert list(dirs) == ["three", "small"]
    eps = latent.encode_eps(model, x)
    for a, name in enumerate(["three", "small"]):
        pos = two[:, a]
        assert len(dirs[name]) == len(model.latent_shapes)
        for lvl, e in enumerate(eps):
            expected = 1.6 * (e[pos].double().mean(0) - e[~pos].double().mean(0))
            assert dirs[name][lvl].shape == e.shape[1:]
            torch.testing.assert_close(dirs[name][lvl], expected.float(), atol=1e-5, rtol=1e-5)


def test_attribute_directions_accept_signed_labels_and_reject_one_sided(model):
    x = digits_like(10, seed=11)
    signed = torch.tensor([1, -1] * 5)
    d1 = directions.attribute_directions(model, x, signed, names=["a"])
    d2 = directions.attribute_directions(model, x, signed > 0, names=["a"])
    for u, v in zip(d1["a"], d2["a"]):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="with and without"):
        directions.attribute_directions(model, x, torch.ones(10, dtype=torch.bool))


def test_directions_save_load_round_trip(model, tmp_path):
    x = digits_like(20, seed=12)
    labels = torch.stack([torch.arange(20) % 2 == 0, torch.arange(20) < 5], 1)
    dirs = directions.attribute_directions(model, x, labels, names=["Smiling", "Eyeglasses"])
    path = directions.save_directions(dirs, tmp_path / "d" / "directions.safetensors", metadata={"scale": 1.6})
    loaded = directions.load_directions(path)
    assert list(loaded) == ["Smiling", "Eyeglasses"]
    for name in dirs:
        for u, v in zip(dirs[name], loaded[name]):
            assert torch.equal(u, v)


def test_load_directions_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        directions.load_directions(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read directions file"):
        directions.load_directions(tmp_path / "junk.safetensors")
