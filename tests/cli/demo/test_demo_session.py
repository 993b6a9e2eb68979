"""``torchglow demo``'s session (``cli/demo/session.py``): the functions behind the page (images
as data URLs, the typicality readout, attribute directions) and the session that encodes, edits,
mixes and samples."""

import base64
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from torchglow.cli.demo import session as demo

from demo_checks import make_session, png_bytes
from tool_checks import digits_like, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def session():
    return make_session()


@pytest.fixture(scope="module")
def cond_session():
    model = make_model(num_classes=3)
    return demo.DemoSession(model, test_images=digits_like(20, seed=3), test_labels=torch.arange(20) % 3,
                            class_names=["x", "y", "z"])


def decode_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as img:
        return np.array(img)


def test_png_data_url_upscales_small_images():
    single = decode_url(demo.png_data_url(torch.full((1, 1, 8, 8), 200, dtype=torch.uint8)))
    assert single.shape == (32, 32) and (single == 200).all()
    grid = decode_url(demo.png_data_url(torch.zeros((5, 3, 8, 8), dtype=torch.uint8), nrow=3))
    assert grid.shape == (1 + 2 * 33, 1 + 3 * 33, 3)  # 2 rows of 3; 1-px white padding around every cell
    assert (grid[0] == 255).all() and (grid[34:, 67:] == 255).all()  # padding; the sixth cell is empty


# ------------------------------------------------------------------ typicality readout
def test_readout_against_hand_counts():
    ref = demo.Reference(bpd=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
                         complexity=torch.tensor([-3.0, -2.0, -1.0, 0.0], dtype=torch.float64))
    r = ref.readout(bpd=3.0, complexity=-1.5)
    assert r["h_hat"] == 2.5 and r["percentile"] == 75.0  # 1, 2, 3 <= 3
    assert r["typicality"] == 0.5 and r["typicality_tail"] == 1.0  # |d| = 1.5, .5, .5, 1.5: all >= .5
    assert r["complexity_tail"] == 0.5 and r["verdict"] == "typical"
    far = ref.readout(bpd=9.0, complexity=-1.5)
    assert far["typicality_tail"] == 0.0 and far["verdict"] == "atypical"
    too_likely = ref.readout(bpd=-4.0, complexity=-9.0)  # far below every test image: atypical too
    assert too_likely["percentile"] == 0.0 and too_likely["verdict"] == "atypical"
    hist = ref.histogram(bins=3)
    assert hist["counts"] == [1, 1, 2] and hist["edges"] == [1.0, 2.0, 3.0, 4.0]


def test_class_attributes_skip_classes_that_are_absent():
    labels, names = demo.class_attributes(torch.tensor([0, 2, 2, 0]), ["zero", "one", "two"])
    assert names == ["class zero", "class two"]
    assert labels.tolist() == [[True, False], [False, True], [False, True], [True, False]]


def test_edited_adds_each_direction_times_alpha():
    eps = [torch.zeros(1, 2, 2, 2), torch.ones(1, 4, 1, 1)]
    dirs = {"u": [torch.ones(8), torch.arange(4.0)], "v": [torch.full((2, 2, 2), 2.0), torch.zeros(4, 1, 1)]}
    out = demo.edited(eps, dirs, {"u": 0.5, "v": -1.0})
    assert torch.equal(out[0], torch.full((1, 2, 2, 2), 0.5 - 2.0))
    assert torch.equal(out[1].flatten(), torch.tensor([1.0, 1.5, 2.0, 2.5]))
    assert torch.equal(eps[0], torch.zeros(1, 2, 2, 2))  # the cached latents are not modified


# ------------------------------------------------------------------ the session
def test_encode_reconstructs_the_model_input_exactly(session):
    r = session.encode_test(3)
    assert np.array_equal(decode_url(r["input"]), decode_url(r["reconstruction"]))
    assert r["readout"]["bpd"] == r["bpd"]  # the verdict itself: test_readout_against_hand_counts
    info = session.info()
    assert info["n_test"] == 40 and len(info["gallery"]) == 16 and sum(info["histogram"]["counts"]) == 40
    assert info["directions"] == ["class a", "class b", "class c", "class d"]


def test_upload_goes_through_the_data_range(session):
    img = Image.new("L", (80, 80), 0)
    img.paste(255, (20, 0, 60, 80))  # a white bar on black
    r = session.encode_upload(png_bytes(img))
    shown = decode_url(r["input"])
    assert shown.max() == 255 and shown.min() == 0  # the data's top bin (16) is shown white
    white = png_bytes(Image.new("L", (9, 9), 255))
    assert (decode_url(session.encode_upload(white)["input"]) == 255).all()
    assert (decode_url(session.encode_upload(white, invert=True)["input"]) == 0).all()


def test_edit_and_reset(session):
    r = session.encode_test(0)
    assert session.edit(r["token"], {}) == r["reconstruction"]
    assert session.edit(r["token"], {"class a": 0.0}) == r["reconstruction"]
    moved = session.edit(r["token"], {"class a": 1.0})
    assert moved != r["reconstruction"]
    with pytest.raises(ValueError, match="unknown direction"):
        session.edit(r["token"], {"smile": 1.0})
    with pytest.raises(ValueError, match="alpha must be in"):
        session.edit(r["token"], {"class a": float("nan")})
    with pytest.raises(KeyError):
        session.edit("no-such-token", {})


def test_mix_ends_are_the_two_images(session):
    a, b = session.encode_test(1), session.encode_test(2)
    assert session.mix(a["token"], b["token"], 0.0) == a["reconstruction"]
    assert session.mix(a["token"], b["token"], 1.0) == b["reconstruction"]
    strip = decode_url(session.mix(a["token"], b["token"], None, steps=5))
    assert strip.shape == (1 + 32 + 1, 1 + 5 * 33)
    cells = [strip[1:33, 1 + 33 * i : 33 * (i + 1)] for i in range(5)]
    assert np.array_equal(cells[0], decode_url(a["reconstruction"]))
    assert not np.array_equal(cells[2], cells[0]) and not np.array_equal(cells[2], cells[4])
    with pytest.raises(ValueError, match="t must be in"):
        session.mix(a["token"], b["token"], 1.5)


def test_samples_temperature_and_seed(session):
    cold = decode_url(session.samples(0.0, seed=0))  # T=0: every sample is the prior mean
    assert cold.shape == (1 + 2 * 33, 1 + demo.SAMPLES_PER_ROW * 33)  # 8 samples: a full row, then 2
    k = demo.SAMPLES_PER_ROW
    cells = [cold[1 + 33 * (i // k) : 33 * (i // k + 1), 1 + 33 * (i % k) : 33 * (i % k + 1)] for i in range(8)]
    assert all(np.array_equal(c, cells[0]) for c in cells)
    warm = session.samples(0.8, seed=0)
    assert warm == session.samples(0.8, seed=0) and warm != session.samples(0.8, seed=1)
    with pytest.raises(ValueError, match="temperature"):
        session.samples(-0.1, seed=0)
    with pytest.raises(ValueError, match="not class-conditional"):
        session.samples(0.5, seed=0, label=1)


def test_cache_forgets_the_oldest_image():
    s = demo.DemoSession(make_model(), cache_size=2)
    x = digits_like(3, seed=4)
    tokens = [s.encode(x[i : i + 1])["token"] for i in range(3)]
    with pytest.raises(KeyError, match="choose it again"):
        s.edit(tokens[0], {})
    assert s.edit(tokens[2], {}).startswith("data:image/png")
    assert s.info()["histogram"] is None and s.info()["gallery"] == []


def test_concurrent_requests_give_the_serial_results(session):
    tokens = [session.encode_test(i)["token"] for i in range(4)]
    serial = [session.edit(t, {"class b": 0.7}) for t in tokens]
    results = [None] * 4

    def work(i):
        results[i] = session.edit(tokens[i], {"class b": 0.7})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


def test_class_conditional_session(cond_session):
    from torchglow.tools.ood import scores_bpd

    x = digits_like(1, seed=5)
    r = cond_session.encode(x)
    per_class = [float(scores_bpd(cond_session.model, x, labels=torch.tensor([c]))) for c in range(3)]
    assert r["label"] == int(np.argmin(per_class))
    a = cond_session.encode(x, y=0)
    b = cond_session.encode(digits_like(1, seed=6), y=2)
    assert cond_session.mix(a["token"], b["token"], 0.0) == a["reconstruction"]
    assert cond_session.mix(a["token"], b["token"], 1.0) == b["reconstruction"]
    assert cond_session.samples(0.5, 0, label=2) != cond_session.samples(0.5, 0, label=0)
    assert cond_session.encode_test(4)["label"] == 1  # the test image's own label


def test_directions_must_fit_the_model():
    model = make_model()
    with pytest.raises(ValueError, match="direction 'd'"):
        demo.DemoSession(model, directions={"d": [torch.zeros(3), torch.zeros(5)]})
