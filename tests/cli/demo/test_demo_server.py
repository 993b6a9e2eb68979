"""``torchglow demo``'s JSON API (``cli/demo/server.py``) through Starlette's test client: the
page and its static files, a round trip through every route, and errors as messages."""

import re

import pytest
from PIL import Image

from demo_checks import header_only_png, make_session, png_bytes, require

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def session():
    return make_session()


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
