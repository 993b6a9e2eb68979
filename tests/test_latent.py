import copy
import json

import pytest
import torch

from torchglow.data import labels as label_sources
from torchglow.tools import latent
from torchglow.tools.images import bin_centres
from torchglow.preprocess import to_uint8

from conftest import amplifying_model, cli
from tool_checks import digits_like, grid_shape, open_png


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ reconstruction
def test_reconstruct_is_exact(model, tmp_path):
    x = digits_like(12, seed=2)
    summary = latent.reconstruct(model, x, tmp_path, nrow=6, batch_size=5)
    assert summary["max_abs_error"] < 1e-4
    assert summary["uint8_exact"] and summary["mismatched_pixels"] == 0
    assert json.loads((tmp_path / "reconstruction.json").read_text()) == summary
    img = open_png(tmp_path / "reconstruction.png")
    assert (img.height - 2) // 34 == 4  # 2 chunks of 6 x (original, reconstruction)


def test_reconstruct_full_range_8bit_images(model, tmp_path):
    # low bits below n_bits are not representable: the comparison is with the n_bits image
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (6, 1, 8, 8), generator=g, dtype=torch.uint8)
    summary = latent.reconstruct(model, x, tmp_path)
    assert summary["uint8_exact"]
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
        img = open_png(tmp_path / f"interpolation_{m}.png")
        assert grid_shape(img) == (3, 5)
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
    with pytest.raises(ValueError, match="unknown interpolation"):
        latent.interpolate(cond_model, xa, xb, tmp_path, method="cubic", y=torch.tensor([1, 2]))


# ------------------------------------------------------------------ attributes and manipulation
def test_attribute_directions_match_the_official_formula(model):
    x = digits_like(40, seed=10)
    classes = torch.arange(40) % 10
    labels, names = label_sources.binary_labels_from_classes(classes, 3)
    assert names == ["class_3"] and labels.shape == (40, 1) and labels.sum() == 4
    two = torch.cat([labels, (classes < 5)[:, None]], 1)
    dirs = latent.attribute_directions(model, x, two, names=["three", "small"], batch_size=7)
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
    d1 = latent.attribute_directions(model, x, signed, names=["a"])
    d2 = latent.attribute_directions(model, x, signed > 0, names=["a"])
    for u, v in zip(d1["a"], d2["a"]):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="with and without"):
        latent.attribute_directions(model, x, torch.ones(10, dtype=torch.bool))


def test_directions_save_load_round_trip(model, tmp_path):
    x = digits_like(20, seed=12)
    labels = torch.stack([torch.arange(20) % 2 == 0, torch.arange(20) < 5], 1)
    dirs = latent.attribute_directions(model, x, labels, names=["Smiling", "Eyeglasses"])
    path = latent.save_directions(dirs, tmp_path / "d" / "directions.safetensors", metadata={"scale": 1.6})
    loaded = latent.load_directions(path)
    assert list(loaded) == ["Smiling", "Eyeglasses"]
    for name in dirs:
        for u, v in zip(dirs[name], loaded[name]):
            assert torch.equal(u, v)


def test_manipulate_alpha_zero_is_the_original(model, tmp_path):
    x = digits_like(3, seed=13)
    labels = torch.arange(30) % 3 == 0
    dirs = latent.attribute_directions(model, digits_like(30, seed=14), labels, names=["zero mod 3"])
    summary = latent.manipulate(model, x, dirs["zero mod 3"], tmp_path, name="zero mod 3")
    assert summary["alpha0_uint8_exact"] and summary["alpha0_max_abs_error"] < 1e-4
    assert summary["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    png = tmp_path / "manipulate_zero_mod_3.png"
    assert summary["files"] == [str(png)]
    assert grid_shape(open_png(png)) == (3, 5)
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
    dirs = latent.attribute_directions(cond_model, digits_like(12, seed=17), torch.arange(12) < 6,
                                       names=["first half"], y=torch.arange(12) % 3)
    summary = latent.manipulate(cond_model, x, dirs["first half"], tmp_path, y=y, name="half")
    assert summary["alpha0_uint8_exact"]


# ------------------------------------------------------------------ attribute sources
def test_labels_from_csv(tmp_path):
    path = tmp_path / "attrs.csv"
    path.write_text("image_id,Smiling,Eyeglasses,Young\n"
                    "a.png,1,-1,1\n"
                    "b.png,-1,1,0\n"
                    "c.png,1,1,true\n")
    labels, names = label_sources.labels_from_csv(path)
    assert names == ["Smiling", "Eyeglasses", "Young"]
    assert labels.dtype == torch.bool
    assert labels.tolist() == [[True, False, True], [False, True, False], [True, True, True]]
    reordered, _ = label_sources.labels_from_csv(path, ids=["c.png", "a.png"])
    assert reordered.tolist() == [[True, True, True], [True, False, True]]
    with pytest.raises(ValueError, match="not in the file"):
        label_sources.labels_from_csv(path, ids=["zzz.png"])
    bad = tmp_path / "bad.csv"
    bad.write_text("id,Smiling\nx.png,2\n")
    with pytest.raises(ValueError, match="Smiling"):
        label_sources.labels_from_csv(bad)


def test_attribute_labels_from_a_dataset():
    class Fake:
        attributes = torch.tensor([[1, -1], [-1, 1]])
        attribute_names = ["Smiling", "Male"]

    labels, names = label_sources.attribute_labels(Fake())
    assert names == ["Smiling", "Male"] and labels.tolist() == [[True, False], [False, True]]

    class NoAttrs:
        pass

    with pytest.raises(ValueError, match="no per-image attributes"):
        label_sources.attribute_labels(NoAttrs())


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


class _Data:
    """A labelled in-memory data set as the tools see it."""

    name = "toy"
    num_classes = 4
    labels = torch.tensor([0, 3, 1, 3, 2, 3])

    def __len__(self):
        return len(self.labels)


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


def test_classes_by_name():
    class Named(_Data):
        class_names = ["cat", "dog", "emu", "fox"]

    labels, names, _ = label_sources.labels_for(Named(), [1, 2, 3], classes=["fox", "1", 3])
    assert names == ["class_fox", "class_dog"] and labels.tolist() == [[True, False], [False, True], [True, False]]
    with pytest.raises(label_sources.LabelsError, match="gnu is not a class of toy .cat, dog, emu, fox, or 0..3.") as e:
        label_sources.labels_for(Named(), [0], classes=["gnu"])
    assert e.value.cli_message.startswith("--class-attribute gnu is not a class of toy")


def test_labels_for_classes_csv_and_attributes(tmp_path):
    labels, names, source = label_sources.labels_for(_Data(), [1, 2, 3], classes=[3, 1, 3])
    assert names == ["class_3", "class_1"] and source == "classes of toy"
    assert labels.tolist() == [[True, False], [False, True], [True, False]]
    with pytest.raises(label_sources.LabelsError, match=r"^classes: 4 is not a class of toy \(0..3\)$") as e:
        label_sources.labels_for(_Data(), [0], classes=[4])
    assert e.value.cli_message == "--class-attribute 4 is not a class of toy (0..3)"
    with pytest.raises(label_sources.LabelsError, match="^attributes picks") as e:
        label_sources.labels_for(_Data(), [0], classes=[1], attributes=["b"])
    assert "--class-attribute" in e.value.cli_message and "--" not in str(e.value)
    csv = tmp_path / "l.csv"
    csv.write_text("id,a,b\n" + "".join(f"{i},{i % 2},{int(i > 2)}\n" for i in range(6)))
    labels, names, source = label_sources.labels_for(_Data(), [5, 0], csv_path=csv, attributes=["b"])
    assert names == ["b"] and source == str(csv) and labels.tolist() == [[True], [False]]
    with pytest.raises(ValueError, match="unknown attribute.*available: a, b"):
        label_sources.labels_for(_Data(), [0], csv_path=csv, attributes=["c"])
    with pytest.raises(label_sources.LabelsError, match="no per-image attributes: pass classes or csv_path$") as e:
        label_sources.labels_for(_Data(), [0])
    assert e.value.cli_message.endswith("pass --class-attribute C, --labels-csv FILE or --directions FILE")

    class Unlabelled(_Data):
        labels = torch.full((6,), -1)

    with pytest.raises(label_sources.LabelsError, match="toy has no class labels: use csv_path") as e:
        label_sources.labels_for(Unlabelled(), [0], classes=[1])
    assert "--labels-csv" in e.value.cli_message

    class Faces(_Data):
        attributes = torch.tensor([[1, -1], [-1, 1], [1, 1]])
        attribute_names = ["Smiling", "Male"]

    labels, names, _ = label_sources.labels_for(Faces(), [2, 0], attributes=["Male"])
    assert names == ["Male"] and labels.tolist() == [[True], [False]]
    with pytest.raises(label_sources.LabelsError, match="^pass attributes .*Smiling, Male") as e:
        label_sources.labels_for(Faces(), [0])
    assert e.value.cli_message.startswith("pass --attribute NAME")


def test_image_ids():
    class Files:
        paths = ["/data/celeba/000001.jpg", "/data/celeba/000002.jpg"]

    assert label_sources.image_ids(Files()) == ["000001.jpg", "000002.jpg"]
    assert label_sources.image_ids([10, 20, 30]) == ["0", "1", "2"]


def test_manipulate_all_and_directions_file_errors(model, tmp_path, monkeypatch):
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
    with pytest.raises(ValueError, match="does not exist"):
        latent.load_directions(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read directions file"):
        latent.load_directions(tmp_path / "junk.safetensors")
