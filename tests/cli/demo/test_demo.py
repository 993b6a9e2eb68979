"""``torchglow demo``: the functions behind the page, the session, the JSON API (Starlette's test
client) and, end to end, the page in a real headless Chromium driven by Selenium against
``python -m torchglow demo`` on a tiny trained run."""

import base64
import io
import os
import queue
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchglow.cli import app as cli

from torchglow import preset
from torchglow.cli.demo import command, upload
from torchglow.cli.demo import session as demo

from tool_checks import digits_like, make_model

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[3]


def require(module: str):
    """Import ``module``; skip without it, except in CI, where the test must fail instead."""
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed: CI installs it with the dev extra (pip install -e '.[dev]')")
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def session():
    model = make_model()
    x = digits_like(40, seed=2)
    labels = torch.arange(40) % 4
    attrs, names = demo.class_attributes(labels, ["a", "b", "c", "d"])
    from torchglow.tools.directions import attribute_directions

    directions = attribute_directions(model, x, attrs, names)
    return demo.DemoSession(model, name="tiny", test_images=x, test_labels=labels, directions=directions,
                            direction_source="test", n_samples=8)


@pytest.fixture(scope="module")
def cond_session():
    model = make_model(num_classes=3)
    return demo.DemoSession(model, test_images=digits_like(20, seed=3), test_labels=torch.arange(20) % 3,
                            class_names=["x", "y", "z"])


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` whose pixel data stop after one row: what a
    decompression bomb looks like to a reader of headers."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    row = zlib.compress(bytes(width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def decode_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as img:
        return np.array(img)


# ------------------------------------------------------------------ uploads
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


def test_latest_run_is_the_newest_folder_with_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folder"):
        command.latest_run(tmp_path)
    for i, name in enumerate(["old", "new", "empty"]):
        (tmp_path / name).mkdir()
        if name != "empty":
            (tmp_path / name / "last.pt").write_bytes(b"")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert command.latest_run(tmp_path) == tmp_path / "new"


# ------------------------------------------------------------------ the JSON API
@pytest.fixture(scope="module")
def client(session):
    require("starlette")
    require("httpx")
    from starlette.testclient import TestClient

    from torchglow.cli.demo.server import create_app

    return TestClient(create_app(session, max_upload_bytes=20_000, token=TOKEN), base_url="http://127.0.0.1:8000",
                      headers={"X-Torchglow-Token": TOKEN})


TOKEN = "test-token"
RAW = {"Content-Type": "application/octet-stream"}


def test_api_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "torchglow demo" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in re.sub(r"<footer>.*</footer>", "", page.text)  # nothing from a network
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/../session.py").status_code == 404
    assert client.get("/static/%2e%2e/session.py").status_code == 404
    evil = client.get("/api/info", headers={"host": "attacker.example"})  # DNS rebinding
    assert evil.status_code == 400


def test_api_round_trip(client):
    info = client.get("/api/info").json()
    assert info["name"] == "tiny" and info["n_samples"] == 8
    assert client.post("/api/samples", json={"temperature": 0.5, "seed": 3}).json()["image"].startswith("data:")
    img = png_bytes(Image.new("L", (30, 30), 90))
    enc = client.post("/api/upload", content=img, headers=RAW).json()
    assert set(enc) == {"token", "input", "reconstruction", "label", "bpd", "readout"}
    other = client.post("/api/test_image", json={"index": 5}).json()
    edit = client.post("/api/edit", json={"token": enc["token"], "alphas": {"class c": 0.5}}).json()
    assert edit["image"] != enc["reconstruction"]
    mix = client.post("/api/mix", json={"a": enc["token"], "b": other["token"], "t": 0.0}).json()
    assert mix["image"] == enc["reconstruction"]


@pytest.mark.parametrize("path, kwargs, status, needle", [
    ("/api/upload", dict(content=b"", headers=RAW), 400, "empty (0 bytes)"),
    ("/api/upload", dict(content=b"<html>", headers=RAW), 400, "not an image"),
    ("/api/upload", dict(content=header_only_png(20_000, 20_000), headers=RAW), 400, "more pixels than the limit"),
    ("/api/upload", dict(content=b"x" * 20_001, headers=RAW), 413, "the upload is larger than the limit of 20 KiB"),
    ("/api/samples", dict(content=b"{not json", headers={"Content-Type": "application/json"}), 400, "not JSON"),
    ("/api/samples", dict(json={"temperature": "hot"}), 400, "'temperature' must be a number"),
    ("/api/samples", dict(json={"temperature": 5}), 400, "'temperature' must be in [0, 2], got 5"),
    ("/api/test_image", dict(json={"index": 99}), 400, "no test image 99"),
    ("/api/test_image", dict(json={}), 400, "missing 'index'"),
    ("/api/edit", dict(json={"token": "gone", "alphas": {}}), 404, "no longer held"),
    ("/api/edit", dict(json={"token": "gone", "alphas": [1]}), 400, "'alphas' must map"),
    ("/api/mix", dict(json={"a": "x", "b": "y", "t": 0.5}), 404, "no longer held"),
], ids=["empty", "html", "bomb", "too-big", "bad-json", "bad-type", "bad-range", "bad-index", "no-index",
        "bad-token", "bad-alphas", "mix-token"])
def test_api_errors_are_messages(client, path, kwargs, status, needle):
    r = client.post(path, **kwargs)
    assert r.status_code == status
    assert needle in r.json()["error"]
    assert client.get("/api/info").status_code == 200  # and the server keeps serving


# ------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> str:
    from torchglow.config import TrainConfig
    from torchglow.train.loop import train

    out = tmp_path_factory.mktemp("run")
    train(preset("digits", n_steps=2, hidden_channels=16),
          TrainConfig(dataset="digits", out=str(out), epochs=1, batch_size=64, init_images=64,
                      device="cpu", num_workers=0, sample_temperatures=(1.0,), lr=2e-3, warmup_images=640),
          progress=False)
    return str(out)


@pytest.mark.parametrize("argv, code, needle", [
    (["demo", "{tmp}/nothing"], 1, "does not exist"),
    (["demo", "{run}", "--port", "70000"], 2, "--port must be in 0..65535"),
    (["demo", "{run}", "--directions", "{tmp}/none.safetensors"], 2, "does not exist"),
], ids=["no-run", "bad-port", "no-directions-file"])
def test_command_errors_are_one_line(run, tmp_path, capsys, argv, code, needle):
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_a_taken_port_is_one_line(run, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["demo", run, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"torchglow demo: error: cannot listen on 127.0.0.1:{port}")


class Unbound:
    """Stands in for a socket listening on ``address``: nothing is bound, nothing is sent."""

    def __init__(self, address):
        self.address = address

    def getsockname(self):
        return self.address

    def close(self):
        pass


@pytest.mark.parametrize("host, shown, warning", [
    ("0", "127.0.0.1", "serving on 0.0.0.0:8768 (every network interface): other machines can use the page and its "
                       "API (samples, uploads, the model's compute) without authentication; it answers requests whose "
                       "Host is 127.0.0.1, localhost, [::1], demo.lan, and --allow-host NAME (repeatable) adds"),
    ("192.0.2.2", "192.0.2.2", "serving on 192.0.2.2:8768: other machines can use the page and its API"),
    ("0.0.0.0", "127.0.0.1", "serving on 0.0.0.0:8768 (every network interface)"),
    ("localhost", "127.0.0.1", None),
    ("::1", "[::1]", None),
], ids=["0", "lan", "0.0.0.0", "localhost", "::1"])
def test_a_network_bind_warns_in_one_line_and_keeps_the_host_check(run, monkeypatch, capsys, host, shown, warning):
    import uvicorn
    from starlette.testclient import TestClient

    from torchglow.cli.demo import server as demo_server

    served = {}
    monkeypatch.setattr(demo_server, "_listen", lambda h, port: Unbound(demo_server._resolve(h, 8768)[1]))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.update(app=self.config.app))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # serve sets them for its process
    with warnings.catch_warnings():
        assert cli.main(["demo", run, "--host", host, "--allow-host", "demo.lan"]) == 0
    out, err = capsys.readouterr()
    assert f"at http://{shown}:8768/ (Ctrl+C to stop)" in out
    warned = [line for line in err.splitlines() if "warning" in line]
    if warning is None:
        assert warned == []
    else:
        assert len(warned) == 1 and warned[0].startswith(f"torchglow demo: warning: {warning}")
    client = TestClient(served["app"], base_url="http://127.0.0.1:8768")
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
    assert client.get("/", headers={"host": "demo.lan:8768"}).status_code == 200
    assert client.get("/", headers={"host": f"{shown}:8768"}).status_code == 200


@pytest.mark.parametrize("name, needle", [
    ("*", "'*' would answer requests naming any host"),
    ("evil.example/x", "'evil.example/x' is not a host name"),
    ("", "'' is not a host name"),
])
def test_allow_host_takes_names_only(run, capsys, name, needle):
    assert cli.main(["demo", run, "--allow-host", name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("torchglow demo: error: --allow-host: ") and needle in err[0]


def test_directions_from_classes_csv_and_file(run, tmp_path, capsys):
    import argparse

    from torchglow.tools.directions import save_directions
    from torchglow.train.runs import open_run

    opened = open_run(run)

    def args(**kw):
        base = dict(directions=None, labels_csv=None, dataset=None, data_dir=None, max_images=200, seed=0)
        return argparse.Namespace(**{**base, **kw})

    classes, source = command._directions(args(), opened)
    assert list(classes) == [f"class {d}" for d in range(10)] and source == "classes of digits/train (200 images)"
    rows = ["id,odd,never"] + [f"{i},{i % 2},0" for i in range(1497)]  # the training split's 1497 images
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    from_csv, source = command._directions(args(labels_csv=str(tmp_path / "labels.csv")), opened)
    assert list(from_csv) == ["odd"] and "labels.csv on digits/train" in source
    assert "no slider for never" in capsys.readouterr().err
    save_directions(classes, tmp_path / "d.safetensors")
    loaded, source = command._directions(args(directions=str(tmp_path / "d.safetensors")), opened)
    assert all(torch.equal(a, b) for n in classes for a, b in zip(classes[n], loaded[n]))
    save_directions({"bad": [torch.zeros(3), torch.zeros(2)]}, tmp_path / "bad.safetensors")
    with pytest.raises(cli.CLIError, match="direction 'bad' has levels of"):
        command._directions(args(directions=str(tmp_path / "bad.safetensors")), opened)


def start_server(run: str, log: Path) -> tuple[subprocess.Popen, str]:
    """``python -m torchglow demo RUN --port 0`` with this checkout's code; returns it and its URL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torchglow", "demo", run, "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        url = re.search(r"http://\S+/", line)
        if url:
            return proc, url.group(0)
    proc.kill()
    pytest.fail(f"torchglow demo did not start: {log.read_text()[-2000:]}")


def chrome():
    """A headless Chromium under Selenium (Debian's chromium + chromium-driver), browser logs on."""
    require("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        reason = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: .ci/run installs them")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1300", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def stroke_png(path: Path, box) -> Path:
    """A white stroke on black, 64x64 (a digit-like upload)."""
    from PIL import ImageDraw

    img = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(img).line(box, fill=255, width=9)
    img.save(path)
    return path


@pytest.mark.slow
def test_page_in_a_real_browser(run, tmp_path):
    """Load the page, move the temperature slider, upload an image, move an attribute slider, mix two
    uploads, then send bad files: every image changes, the numbers appear, the browser console has
    no errors, bad files get a message on the page and the server keeps serving."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get("TORCHGLOW_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    driver = chrome()
    proc, url = start_server(run, tmp_path / "server.log")
    try:
        wait = WebDriverWait(driver, 30)
        src = lambda id_: driver.find_element(By.ID, id_).get_attribute("src") or ""
        text = lambda id_: driver.find_element(By.ID, id_).text

        def changes(id_, old):
            wait.until(lambda d: src(id_) not in ("", old), f"#{id_} did not change")
            return src(id_)

        driver.get(url)
        wait.until(lambda d: src("samples") and src("strip") and text("bpd") != "–", "the page did not fill in")
        assert "test images" in text("model-info")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#readout li")) == 3 and text("verdict")
        driver.save_screenshot(str(shots / "1-loaded.png"))

        samples = src("samples")
        driver.find_element(By.ID, "temperature").send_keys(Keys.ARROW_LEFT * 6)  # 0.70 -> 0.40
        changes("samples", samples)
        assert text("temperature-value") == "0.40"

        bpd, recon = text("bpd"), src("reconstruction")
        driver.find_element(By.ID, "upload").send_keys(str(stroke_png(tmp_path / "one.png", [(32, 6), (32, 58)])))
        recon = changes("reconstruction", recon)
        assert src("input") and re.fullmatch(r"\d+\.\d{3}", text("bpd")) and text("bpd") != bpd
        driver.save_screenshot(str(shots / "2-uploaded.png"))

        assert src("edited") == recon
        slider = driver.find_elements(By.CSS_SELECTOR, "#sliders input")[7]
        slider.send_keys(Keys.ARROW_RIGHT * 12)
        changes("edited", recon)
        driver.save_screenshot(str(shots / "3-edited.png"))

        strip, mixed = src("strip"), src("mixed")
        for slot, line in (("a", [(10, 10), (54, 54)]), ("b", [(8, 32), (56, 32)])):
            image = src(f"mix-{slot}")
            driver.find_element(By.ID, f"upload-{slot}").send_keys(str(stroke_png(tmp_path / f"{slot}.png", line)))
            changes(f"mix-{slot}", image)
            strip, mixed = changes("strip", strip), changes("mixed", mixed)  # one update each per new image
        driver.find_element(By.ID, "mix-t").send_keys(Keys.ARROW_RIGHT * 15)
        changes("mixed", mixed)
        driver.save_screenshot(str(shots / "4-mixed.png"))

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors

        (tmp_path / "notes.png").write_text("not an image at all")
        driver.find_element(By.ID, "upload").send_keys(str(tmp_path / "notes.png"))
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "notes.png: the upload is not an image" in text("error-text")
        (tmp_path / "bomb.png").write_bytes(header_only_png(20_000, 20_000))
        driver.find_element(By.ID, "upload").send_keys(str(tmp_path / "bomb.png"))
        wait.until(lambda d: "bomb.png" in text("error-text"))
        assert "more pixels than the limit" in text("error-text")
        driver.save_screenshot(str(shots / "5-bad-upload.png"))

        driver.find_element(By.ID, "upload").send_keys(str(tmp_path / "a.png"))  # still serving
        wait.until(lambda d: not d.find_element(By.ID, "error").is_displayed())
        assert proc.poll() is None
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_ctrl_c_stops_the_demo_with_one_line(run, tmp_path):
    """SIGINT (Ctrl+C) while serving, with a browser-like keep-alive connection open: exit status
    130 (128 + SIGINT, as train), one line on stderr, no traceback."""
    import signal
    import socket

    proc, url = start_server(run, tmp_path / "server.log")
    try:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"GET /static/app.js HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 130
    finally:
        proc.kill()
        proc.wait(timeout=20)
    err = (tmp_path / "server.log").read_text().strip().splitlines()
    assert err == ["torchglow demo: stopped (Ctrl+C)"]
