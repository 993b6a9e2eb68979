"""The ``torchglow demo`` command (``cli/demo/command.py``): finding the run, its errors in one
line, binding to the network, loading directions, and, end to end, the page in a real headless
Chromium driven by Selenium against ``python -m torchglow demo`` on a tiny trained run."""

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from torchglow.cli import app as cli

from torchglow import preset
from torchglow.cli.demo import command

from demo_checks import header_only_png, require

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[3]


def test_latest_run_is_the_newest_folder_with_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folder"):
        command.latest_run(tmp_path)
    for i, name in enumerate(["old", "new", "empty"]):
        (tmp_path / name).mkdir()
        if name != "empty":
            (tmp_path / name / "last.pt").write_bytes(b"")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert command.latest_run(tmp_path) == tmp_path / "new"


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


def test_a_taken_port_is_one_line(run, monkeypatch, capsys):
    import socket

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # serve sets them for its process
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
