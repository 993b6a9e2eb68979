"""``torchglow demo`` against a hostile page and a hostile upload, through the real server over a
socket: a subprocess serving a tiny model on 127.0.0.1 (a free port; it exits when the tests close
its stdin, or after 10 minutes), driven with ``http.client`` and raw sockets. Memory is read from the
server process's ``/proc/<pid>/status``."""

import http.client
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from torchglow.cli.demo import session as demo

from demo_checks import header_only_png, png_bytes, png_chunk, require
from tool_checks import digits_like, make_model

require("starlette")
require("uvicorn")
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[3]
MAX_PIXELS = 9_000_000  # the test server's pixel limit: a 3000 x 3000 image is the largest it decodes

SERVER = """
import os, sys, threading
sys.path[:0] = [{root!r}, {tests!r}]
import torch
torch.set_num_threads(1)
from tool_checks import digits_like, make_model
from torchglow.cli.demo import session as demo
from torchglow.cli.demo import server as demo_server

def exit_with_the_tests():
    sys.stdin.read()  # returns when the tests close stdin, or end in any way
    os._exit(0)

threading.Thread(target=exit_with_the_tests, daemon=True).start()
deadline = threading.Timer(600, os._exit, (3,))
deadline.daemon = True
deadline.start()
session = demo.DemoSession(make_model(), name="tiny", test_images=digits_like(8, seed=2), n_samples=4)
demo_server.serve(session, "127.0.0.1", 0, max_pixels={max_pixels}, head_timeout=1.0, body_timeout=2.0)
"""


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    token: str
    log: Path

    def memory_mb(self) -> dict[str, float]:
        """VmHWM (peak) and VmRSS of the server process, in MiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return {k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) / 1024 for k in ("VmHWM", "VmRSS")}

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             token: bool = True) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={**({"X-Torchglow-Token": self.token} if token else {}),
                                                           **(headers or {})})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def post_json(self, path: str, value, **kwargs):
        body = value if isinstance(value, bytes) else json.dumps(value).encode()
        return self.call("POST", path, body, {"Content-Type": "application/json", **kwargs.pop("headers", {})},
                         **kwargs)

    def upload(self, data: bytes, **kwargs):
        return self.call("POST", "/api/upload?invert=0", data, {"Content-Type": "application/octet-stream"}, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path("/proc/self/status").is_file():
        pytest.skip("the memory checks read /proc/<pid>/status (Linux)")
    log = tmp_path_factory.mktemp("server") / "server.log"
    script = SERVER.format(root=str(ROOT), tests=str(ROOT / "tests"), max_pixels=MAX_PIXELS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()  # the URL line, or "" when the server died
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not url:
            pytest.fail(f"the demo server did not start: {line}{log.read_text()[-2000:]}")
        port = int(url.group(1))
        page = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        page.request("GET", "/")
        token = re.search(r'<meta name="torchglow-token" content="([^"]+)">', page.getresponse().read().decode())
        page.close()
        yield Server(proc, port, token.group(1), log)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "Traceback" not in text and "Exception" not in text and "internal error" not in text, text[-3000:]


def ico_bomb(side: int) -> bytes:
    """An ICO whose directory says 16 x 16 but which holds a ``side`` x ``side`` RGBA PNG of zeros:
    Pillow's ICO plugin decodes that PNG while it opens the file."""
    pixels = zlib.compress(bytes((4 * side + 1) * side))  # each row: filter byte 0, then zeros
    png = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0))
           + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b""))
    header = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22)
    return header + png


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n")


def error_of(response) -> str:
    status, headers, body = response
    assert 400 <= status < 500, (status, body)
    assert headers["Cache-Control"] == "no-store" and headers["Connection"] == "close"
    return json.loads(body)["error"]


# ------------------------------------------------------------------ uploads
@pytest.mark.filterwarnings("ignore:Image was not the expected size")  # Pillow's, opening the ICO here
def test_ico_bomb_and_a_burst_of_them_leave_memory_where_it_was(server):
    bomb = ico_bomb(6000)  # 144 MB of pixels in ~140 KB
    with Image.open(io.BytesIO(bomb)) as img:  # what an unrestricted Pillow sees: an ICO
        assert img.format == "ICO"
    before = server.memory_mb()
    message = error_of(server.upload(bomb))
    assert "not an image of a kind the demo reads (PNG, JPEG, GIF, WebP or BMP)" in message
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: server.upload(bomb)[0], range(8)))
    assert set(answers) <= {400, 503}, answers  # refused, or turned away while 4 others were in flight
    after = server.memory_mb()
    assert after["VmHWM"] - before["VmHWM"] < 40, (before, after)


def test_large_uploads_are_decoded_two_at_a_time_and_their_memory_returned(server):
    """Three waves of 4 concurrent 3000 x 3000 PNGs (the most the server holds at once): each decode
    needs ~45 MB (4-byte RGB, then grey); two at a time, with the memory handed back after each."""
    big = png_bytes(Image.new("RGB", (3000, 3000), (200, 30, 90)))
    before = server.memory_mb()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert [r[0] for r in pool.map(lambda _: server.upload(big), range(4))] == [200] * 4
    after = server.memory_mb()
    assert after["VmHWM"] - before["VmHWM"] < 150, (before, after)  # 12 decodes kept: > 500 MB
    assert after["VmRSS"] - before["VmRSS"] < 40, (before, after)


@pytest.mark.parametrize("kind", ["EPS", "ICO", "TIFF", "PPM"])
def test_formats_outside_the_allowlist_are_refused(server, kind):
    if kind == "EPS":
        data = EPS
        with Image.open(io.BytesIO(data)) as img:  # Pillow would render it with Ghostscript
            assert img.format == "EPS"
    else:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), 50).save(buf, format=kind)
        data = buf.getvalue()
    message = error_of(server.upload(data))
    assert message == "the upload is not an image of a kind the demo reads (PNG, JPEG, GIF, WebP or BMP)"


def test_pillows_own_pixel_limit_is_set_for_the_server_process(server):
    """A 4000 x 4000 header over the server's 9 MP: Pillow itself refuses it while opening (its
    message), before read_upload's own check would (which names the size)."""
    message = error_of(server.upload(header_only_png(4000, 4000)))
    assert message == f"the upload has more pixels than the limit of {MAX_PIXELS:,}; make it smaller first"


# ------------------------------------------------------------------ other sites
def test_a_foreign_page_cannot_use_the_api(server):
    ok = server.post_json("/api/samples", {"temperature": 0.5}, headers={"Origin": f"http://127.0.0.1:{server.port}",
                                                                         "Sec-Fetch-Site": "same-origin"})
    assert ok[0] == 200 and json.loads(ok[2])["image"].startswith("data:image/png")
    # what a page of another site can send without a preflight: text/plain or a form, no token
    simple = server.call("POST", "/api/samples", b'{"temperature": 0.5}',
                         {"Content-Type": "text/plain", "Origin": "http://evil.example"}, token=False)
    assert "another origin (Origin: 'http://evil.example')" in error_of(simple) and simple[0] == 403
    for headers, needle in [
        ({"Origin": "http://evil.example"}, "another origin"),
        ({"Origin": "null"}, "another origin"),
        ({"Sec-Fetch-Site": "cross-site"}, "another site (Sec-Fetch-Site: 'cross-site')"),
        ({"Sec-Fetch-Site": "same-site"}, "another site"),
    ]:
        r = server.post_json("/api/samples", {"temperature": 0.5}, headers=headers)
        assert r[0] == 403 and needle in error_of(r)
    for r in (server.post_json("/api/samples", {}, token=False), server.call("GET", "/api/info", token=False),
              server.post_json("/api/samples", {}, headers={"X-Torchglow-Token": "guess"}, token=False)):
        assert r[0] == 403 and "X-Torchglow-Token header is missing or wrong; reload the page" in error_of(r)
    png = png_bytes(Image.new("L", (9, 9), 255))
    for kind, path in [("text/plain", "/api/samples"), ("multipart/form-data; boundary=x", "/api/upload"),
                       (None, "/api/edit"), ("application/json", "/api/upload")]:
        r = server.call("POST", path, png, {"Content-Type": kind} if kind else {})
        assert r[0] == 415 and "the Content-Type must be" in error_of(r)
    assert server.call("POST", "/api/upload", png, {"Content-Type": "image/png"})[0] == 200


def test_host_check_and_cache_headers(server):
    r = server.call("GET", "/api/info", headers={"Host": "evil.example"})
    assert r[0] == 400 and "the Host header 'evil.example' is not a name of this server" in error_of(r)
    assert "--allow-host NAME" in error_of(r)
    status, headers, _ = server.call("GET", "/static/app.js")
    assert status == 200 and headers["Cache-Control"] == "no-cache"
    status, headers, _ = server.call("GET", "/")
    assert status == 200 and headers["Cache-Control"] == "no-store"  # the page holds this server's token
    status, headers, _ = server.call("GET", "/api/info")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, _ = server.call("GET", "/no/such/page")
    assert status == 404 and headers["Cache-Control"] == "no-store"


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("body, needle", [
    ({"temperature": 10**400}, "'temperature' is a number of more than 24 characters"),
    ({"temperature": 1e308 * 10}, "has Infinity, which is not a JSON number"),
    (b'{"temperature": NaN}', "has NaN, which is not a JSON number"),
    ({"seed": 2**64}, "'seed' must be in [0, 9223372036854775807], got 18446744073709551616"),
    ({"seed": -1}, "'seed' must be in [0, 9223372036854775807], got -1"),
    (b'{"seed": ' + b"7" * 5000 + b"}", "'seed' is a number of more than 24 characters"),
    ({"seed": 1.5}, "'seed' must be an integer, got 1.5"),
    ({"temperature": "1" * 5000}, "'temperature' must be a number, got '11111111111111111"),
    (b"[" * 30_000 + b"]" * 30_000, "the request body nests more than 4 deep"),
    (b'{"a": "' + b"x" * 70_000 + b'"}', "the request body is larger than the limit of 64 KiB"),
    (b'{"a": [[["[[[[[[[[[["]]]}', None),  # brackets inside strings do not count
], ids=["401-digits", "inf", "nan", "seed-2**64", "seed-negative", "5000-digits", "seed-float", "long-string",
        "deep", "large", "brackets-in-a-string"])
def test_former_500s_are_4xx_naming_the_field(server, body, needle):
    r = server.post_json("/api/samples", body)
    if needle is None:
        assert r[0] == 200
    else:
        assert needle in error_of(r)


@pytest.mark.parametrize("path, body, needle", [
    ("/api/edit", {"token": "x", "alphas": {"class a": 10**400}}, "'class a' is a number of more than 24"),
    ("/api/edit", {"token": "x", "alphas": {"class a": 3}}, "'class a' must be in [-2, 2], got 3"),
    ("/api/edit", {"token": ["x"], "alphas": {}}, "'token' must be an image token (a string), got ['x']"),
    ("/api/mix", {"a": "x", "b": "y", "t": 10**400}, "'t' is a number of more than 24 characters"),
    ("/api/mix", {"a": "x", "b": "y", "t": 1.5}, "'t' must be in [0, 1], got 1.5"),
    ("/api/test_image", {"index": 10**30}, "'index' is a number of more than 24 characters"),
    ("/api/test_image", {"index": 10**20}, "there is no test image 100000000000000000000"),
], ids=["alpha-digits", "alpha-range", "token-type", "t-digits", "t-range", "index-digits", "index-range"])
def test_every_field_is_bounded(server, path, body, needle):
    assert needle in error_of(server.post_json(path, body))


def test_a_client_that_leaves_mid_upload_is_not_an_error(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Length: 100000\r\n"
                     f"Content-Type: image/png\r\nX-Torchglow-Token: {server.token}\r\n\r\n".encode() + b"x" * 1000)
    assert server.call("GET", "/api/info")[0] == 200  # the server logs nothing (the fixture checks its log)
    assert server.proc.poll() is None


# ------------------------------------------------------------------ slow clients
# (the test server allows 1 s for a request head, 2 s for a body)
def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout: 30 s)."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


@pytest.mark.parametrize("sent", [b"", b"POST /api/samples HTTP/1.1\r\nHost: 127.0.0.1\r\n"], ids=["idle", "half-head"])
def test_a_connection_without_a_request_is_closed(server, sent):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(sent)
        assert read_until_closed(sock) == b""


def test_a_slow_body_gets_408_and_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /api/samples HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Length: 1000\r\n"
                     f"Content-Type: application/json\r\nX-Torchglow-Token: {server.token}\r\n\r\n{{".encode())
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive in time" in answer


def test_a_keep_alive_connection_serves_requests_then_closes_when_idle(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for _ in range(3):
        conn.request("GET", "/api/info", headers={"X-Torchglow-Token": server.token})
        assert conn.getresponse().read() and conn.sock is not None  # the same connection, kept alive
    assert read_until_closed(conn.sock) == b""
    conn.close()


# ------------------------------------------------------------------ one client's uploads
def test_a_client_cannot_evict_another_clients_images():
    session = demo.DemoSession(make_model(), cache_size=8, per_client=4)
    x = digits_like(1, seed=4)
    mine = [session.encode(x, client="me")["token"] for _ in range(2)]
    for i in range(30):  # a flood from one other client, then from two more
        session.encode(x, client="other")
        session.encode(x, client=f"visitor {i % 2}")
    assert all(session.edit(t, {}) for t in mine)  # 4 clients, room for 8: each keeps 2 at least
    mine.append(session.encode(x, client="me")["token"])  # over my share of 2: my least recently used goes
    with pytest.raises(KeyError, match="choose it again"):
        session.edit(mine[0], {})
    assert all(session.edit(t, {}) for t in mine[1:])
    alone = demo.DemoSession(make_model(), cache_size=8, per_client=4)
    tokens = [alone.encode(x, client="me")["token"] for _ in range(5)]  # room for 8, 4 a client
    with pytest.raises(KeyError, match="choose it again"):
        alone.edit(tokens[0], {})
    assert all(alone.edit(t, {}) for t in tokens[1:])


def test_many_clients_share_the_cache():
    session = demo.DemoSession(make_model(), cache_size=4, per_client=4)
    x = digits_like(1, seed=4)
    tokens = [session.encode(x, client=f"client {i}")["token"] for i in range(6)]  # 6 clients, room for 4
    held = []
    for t in tokens:
        try:
            session.edit(t, {})
            held.append(t)
        except KeyError:
            pass
    assert held == tokens[2:]  # one image each: the least recently used go first


def test_the_session_checks_the_seed_range():
    session = demo.DemoSession(make_model())
    with pytest.raises(ValueError, match=re.escape("seed must be in [0, 2**63 - 1]")):
        session.samples(0.5, seed=2**64)
    with pytest.raises(ValueError, match=re.escape("seed must be in [0, 2**63 - 1]")):
        session.samples(0.5, seed=-1)
