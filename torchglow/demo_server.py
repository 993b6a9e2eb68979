"""The web layer of ``torchglow demo``: one static page and a small JSON API over a
:class:`torchglow.demo.DemoSession`, served by Starlette on uvicorn.

Why Starlette and not Gradio: the page needs a handful of endpoints and one hand-written page;
Starlette + uvicorn are two small, well-kept packages with no frontend of their own, so nothing
is fetched from a CDN, there is no telemetry, and the page works with no network at all.

API (JSON in and out; errors are ``{"error": message}`` with a 4xx status and a message that names
the field):

=========================== ======================================= ================================
``GET /api/info``           model, classes, directions, histogram   :meth:`DemoSession.info`
``POST /api/samples``       ``{temperature, seed, label}``           ``{image}``
``POST /api/upload?invert`` the image file as the raw body           ``{token, input, reconstruction,
                                                                     bpd, label, readout}``
``POST /api/test_image``    ``{index}`` (of the gallery)             as upload
``POST /api/edit``          ``{token, alphas: {name: alpha}}``       ``{image}``
``POST /api/mix``           ``{a, b, t}`` (t null: the strip)        ``{image}``
=========================== ======================================= ================================

The security model: the page runs in the user's browser, beside pages of other sites that may try
to use it, and on a network that may reach it when ``--host`` is not loopback.

* **Host.** Only requests that name the server's own address, localhost or a name given with
  ``--allow-host`` are answered, whatever the bind address: this defeats DNS rebinding.
* **Same origin.** Every ``/api/`` request must carry the server's random token in the
  ``X-Torchglow-Token`` header (the page gets it in a ``<meta>`` tag of ``index.html``, a new one
  each time the server starts), must not come from another site (``Sec-Fetch-Site``, ``Origin``),
  and a POST must have its route's content type: ``application/json``, or for the upload
  ``application/octet-stream`` or ``image/*``. A browser sends such requests across origins only
  after a CORS preflight, which this server never grants, and another origin cannot read the
  token: a foreign page cannot use the API at all. (No multipart uploads: ``multipart/form-data``
  is what any web page's form may post without asking.)
* **Input.** JSON bodies of at most :data:`JSON_LIMIT` bytes, nested at most :data:`JSON_DEPTH`
  deep, numbers of at most :data:`MAX_NUMBER_CHARS` characters, each field range-checked; uploads
  capped at ``max_upload_bytes`` while they stream, at most :data:`UPLOADS_IN_FLIGHT` at a time
  (503 beyond), decoded as :func:`torchglow.demo.read_upload` says. Every refusal is a 4xx.
* **Time.** A connection must send a complete request head within ``head_timeout`` (10 s) of
  opening or of its last response, and a request's body within ``body_timeout`` (30 s); else it
  is closed (408 for a late body). Idle keep-alive connections close after 5 s.
* **Responses.** No endpoint takes a path. CSP (nothing but the page's own files and ``data:``
  images), nosniff and no-referrer on every response; ``Cache-Control: no-store`` on all but the
  static files (``no-cache``: revalidated); errors close the connection.

It is not authentication: anyone who can reach a non-loopback bind can use the page.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import secrets
import socket
import sys
import threading
import traceback
import warnings
from importlib.resources import files
from typing import Any, Callable, Sequence

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .demo import MAX_ALPHA, MAX_PIXELS, MAX_SEED, MAX_TEMPERATURE, MAX_UPLOAD_BYTES, DemoSession, human_size

STATIC_DIR = files("torchglow") / "demo_static"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
TOKEN_HEADER = "X-Torchglow-Token"
TOKEN_META = '<meta name="torchglow-token" content="">'  # in index.html; the server fills in its token
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
JSON_LIMIT = 64 * 1024
JSON_DEPTH = 4  # the API's deepest body, {"alphas": {name: alpha}}, is 2 deep
MAX_NUMBER_CHARS = 24  # a float64's 17 significant digits and exponent; 2**63 has 19 digits
UPLOADS_IN_FLIGHT = 4  # bodies held at once: at most 4 x max_upload_bytes
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _short(value: Any) -> str:
    """``repr(value)``, cut to 40 characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------- every request
def _host_name(host_header: str) -> str:
    """The host of a ``Host`` header, lowercase, without the port (``[::1]:80`` -> ``[::1]``)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0]


def _host_allowed(host: str, allowed: Sequence[str]) -> bool:
    return bool(host) and any(host == a or (a.startswith("*.") and host.endswith(a[1:])) for a in allowed)


def _deadline(receive: Callable, seconds: float) -> Callable:
    """``receive`` that raises TimeoutError when the request's body is not complete ``seconds``
    after its first part was asked for."""
    state = {"end": None, "done": False}

    async def timed():
        if state["done"]:
            return await receive()
        if state["end"] is None:
            state["end"] = anyio.current_time() + seconds
        with anyio.fail_after(max(0.0, state["end"] - anyio.current_time())):
            message = await receive()
        state["done"] = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return timed


def _guard(app: Callable, allowed_hosts: Sequence[str], body_timeout: float) -> Callable:
    """ASGI middleware for every request: the Host check, the body's deadline, and :data:`HEADERS`
    and a Cache-Control on every response."""
    extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
    names = ", ".join(allowed_hosts)

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        cache = b"no-cache" if scope["path"].startswith("/static/") else b"no-store"

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", cache))
                message = {**message, "headers": headers + extra}
            await send(message)

        host = _host_name(Headers(scope=scope).get("host", ""))
        if not _host_allowed(host, allowed_hosts):
            refused = _error(f"the Host header {_short(host)} is not a name of this server ({names}); "
                             f"start torchglow demo with --allow-host NAME to answer another", 400)
            return await refused(scope, receive, send_with_headers)
        await app(scope, _deadline(receive, body_timeout), send_with_headers)

    return guarded


def _error(message: str, status: int) -> Response:
    """A JSON error that closes the connection (the request's body may be unread)."""
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})


def _same_origin(request: Request, token: str) -> None:
    """403 unless the request comes from the server's own page (see the module docstring)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        raise _BadRequest(f"refused: the request comes from another site (Sec-Fetch-Site: {_short(site)})", 403)
    origin = request.headers.get("origin")
    if origin is not None and origin not in {f"{s}://{request.headers.get('host', '')}" for s in ("http", "https")}:
        raise _BadRequest(f"refused: the request comes from another origin (Origin: {_short(origin)})", 403)
    sent = request.headers.get(TOKEN_HEADER, "").encode("latin-1")
    if not secrets.compare_digest(sent, token.encode("ascii")):
        raise _BadRequest(f"refused: the {TOKEN_HEADER} header is missing or wrong; reload the page "
                          f"(the token changes each time the server starts)", 403)


def _content_type(request: Request, accepted: Sequence[str]) -> None:
    """415 unless the Content-Type is one of ``accepted`` (``type/*`` matches a whole type)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not any(kind == a or (a.endswith("/*") and kind.startswith(a[:-1])) for a in accepted):
        raise _BadRequest(f"the Content-Type must be {' or '.join(accepted)}, got {_short(kind) if kind else 'none'}",
                          415)


# ---------------------------------------------------------------------------- bodies and fields
async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The body, refused with 413 as soon as it exceeds ``limit`` bytes (whatever Content-Length says)."""
    too_big = _BadRequest(f"{what} is larger than the limit of {human_size(limit)}", 413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 15 or int(declared) > limit):
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class _TooLong:
    """A JSON number literal of more than :data:`MAX_NUMBER_CHARS` characters, left unconverted."""


_TOO_LONG = _TooLong()
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = np.zeros(256, np.int8)
_BRACKETS[[ord("["), ord("{")]] = 1
_BRACKETS[[ord("]"), ord("}")]] = -1


def _depth(body: bytes) -> int:
    """How deep the JSON text's arrays and objects nest (brackets inside strings do not count)."""
    steps = _BRACKETS[np.frombuffer(_STRING.sub(b'""', body), np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def _not_json_number(name: str):
    raise _BadRequest(f"the request body has {name}, which is not a JSON number")


async def _json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object, its size, depth and number literals bounded before parsing."""
    body = await _read_body(request, JSON_LIMIT, "the request body")
    if _depth(body) > JSON_DEPTH:
        raise _BadRequest(f"the request body nests more than {JSON_DEPTH} deep")
    literal = lambda convert: lambda text: convert(text) if len(text) <= MAX_NUMBER_CHARS else _TOO_LONG  # noqa: E731
    try:
        value = json.loads(body or b"{}", parse_int=literal(int), parse_float=literal(float),
                           parse_constant=_not_json_number)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _BadRequest("the request body is not JSON") from None
    if not isinstance(value, dict):
        raise _BadRequest("the request body must be a JSON object")
    return value


_REQUIRED = object()


def _number(body: dict[str, Any], key: str, default: Any = _REQUIRED, *, integer: bool = False,
            lo: float = -math.inf, hi: float = math.inf):
    """``body[key]``, checked to be a number (an integer with ``integer``) in ``[lo, hi]``, as a
    float (an int with ``integer``); ``default`` when absent or null, 400 when absent without one."""
    value = body.get(key)
    if value is None:
        if default is _REQUIRED:
            raise _BadRequest(f"missing {_short(key)}")
        return default
    if value is _TOO_LONG:
        raise _BadRequest(f"{_short(key)} is a number of more than {MAX_NUMBER_CHARS} characters")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _BadRequest(f"{_short(key)} must be {'an integer' if integer else 'a number'}, got {_short(value)}")
    if not lo <= value <= hi:  # (exact for ints; false for NaN)
        raise _BadRequest(f"{_short(key)} must be in [{lo:g}, {hi:g}], got {value}" if not integer
                          else f"{_short(key)} must be in [{lo}, {hi}], got {value}")
    return value if integer else float(value)


def _token(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise _BadRequest(f"{_short(key)} must be an image token (a string), got {_short(value)}")
    return value


# ---------------------------------------------------------------------------- the app
def _endpoint(handler: Callable, token: str, body_types: Sequence[str] = ()) -> Callable:
    """Check the request's origin (and a POST's content type), run ``handler(request)`` (async,
    returning a JSON-able value) and turn the errors a user can cause into 4xx ``{"error": ...}``
    responses; anything else is a 500 whose traceback goes to the server's stderr, and the server
    keeps serving."""

    async def endpoint(request: Request) -> Response:
        try:
            _same_origin(request, token)
            if request.method == "POST":
                _content_type(request, body_types)
            return JSONResponse(await handler(request))
        except _BadRequest as e:
            return _error(str(e), e.status)
        except ValueError as e:  # UploadError and the session's range checks
            return _error(str(e), 400)
        except KeyError as e:
            return _error(e.args[0] if e.args else "not found", 404)
        except TimeoutError:  # _deadline
            return _error("the request's body did not arrive in time", 408)
        except ClientDisconnect:  # the client left mid-body: nobody to answer, nothing to log
            return Response(status_code=400)
        except Exception as e:  # a bug, not the user's doing: say so, log it, keep serving
            traceback.print_exc(file=sys.stderr)
            return _error(f"internal error ({type(e).__name__}); see the server's log", 500)

    return endpoint


def create_app(session: DemoSession, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               allowed_hosts: Sequence[str] = LOCAL_HOSTS, *, token: str | None = None,
               max_pixels: int = MAX_PIXELS, body_timeout: float = BODY_TIMEOUT_S) -> Callable:
    """The ASGI app serving ``session``: answers requests whose ``Host`` is one of ``allowed_hosts``
    (``*.domain`` for its subdomains), API requests carrying ``token`` (default: a new random one,
    put into the page)."""
    token = token or secrets.token_urlsafe(32)
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if TOKEN_META not in page:
        raise RuntimeError(f"index.html has no {TOKEN_META}")
    page = page.replace(TOKEN_META, TOKEN_META.replace('content=""', f'content="{token}"'))
    uploads = threading.BoundedSemaphore(UPLOADS_IN_FLIGHT)
    client = lambda request: request.client.host if request.client else ""  # noqa: E731

    async def info(request: Request):
        return session.info()

    async def samples(request: Request):
        body = await _json_body(request)
        return {"image": await run_in_threadpool(
            session.samples, _number(body, "temperature", 0.7, lo=0, hi=MAX_TEMPERATURE),
            _number(body, "seed", 0, integer=True, lo=0, hi=MAX_SEED), _number(body, "label", None, integer=True))}

    async def upload(request: Request):
        invert = request.query_params.get("invert", "0")
        if invert not in ("0", "1"):
            raise _BadRequest(f"'invert' must be 0 or 1, got {_short(invert)}")
        if not uploads.acquire(blocking=False):
            raise _BadRequest(f"the server is busy with {UPLOADS_IN_FLIGHT} other uploads; try again", 503)
        try:
            data = await _read_body(request, max_upload_bytes, "the upload")
            return await run_in_threadpool(session.encode_upload, data, invert == "1", max_upload_bytes,
                                           max_pixels, client(request))
        finally:
            uploads.release()

    async def test_image(request: Request):
        body = await _json_body(request)
        return await run_in_threadpool(session.encode_test, _number(body, "index", integer=True), client(request))

    async def edit(request: Request):
        body = await _json_body(request)
        alphas = body.get("alphas", {})
        if not isinstance(alphas, dict):
            raise _BadRequest("'alphas' must map direction names to numbers")
        alphas = {k: _number(alphas, k, lo=-MAX_ALPHA, hi=MAX_ALPHA) for k in alphas}
        return {"image": await run_in_threadpool(session.edit, _token(body, "token"), alphas)}

    async def mix(request: Request):
        body = await _json_body(request)
        t = _number(body, "t", None, lo=0, hi=1)
        return {"image": await run_in_threadpool(session.mix, _token(body, "a"), _token(body, "b"), t)}

    async def index(request: Request):
        return HTMLResponse(page)

    json_in = ("application/json",)
    routes = [
        Route("/", index),
        Route("/api/info", _endpoint(info, token)),
        Route("/api/samples", _endpoint(samples, token, json_in), methods=["POST"]),
        Route("/api/upload", _endpoint(upload, token, ("application/octet-stream", "image/*")), methods=["POST"]),
        Route("/api/test_image", _endpoint(test_image, token, json_in), methods=["POST"]),
        Route("/api/edit", _endpoint(edit, token, json_in), methods=["POST"]),
        Route("/api/mix", _endpoint(mix, token, json_in), methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static"),
    ]
    return _guard(Starlette(routes=routes), [h.lower() for h in allowed_hosts], body_timeout)


# ---------------------------------------------------------------------------- listening
def check_host_names(names: Sequence[str]) -> None:
    """ValueError unless every name is a host name, an IP address (``[...]`` for IPv6) or
    ``*.domain``; a bare ``*`` would answer any Host and undo the DNS-rebinding check."""
    for name in names:
        if name == "*":
            raise ValueError("'*' would answer requests naming any host, which lets other web sites reach the "
                             "page (DNS rebinding); name the hosts")
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]", name):
            raise ValueError(f"{_short(name)} is not a host name, an IP address ([...] for IPv6) or *.domain")


def _host_form(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def exposure_warning(address: str, port: int, allow_hosts: Sequence[str] = ()) -> str | None:
    """The one-line warning for listening on ``address`` (an IP address), or None for loopback."""
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        return None
    where = f"{_host_form(address)}:{port}" + (" (every network interface)" if ip.is_unspecified else "")
    names = [*LOCAL_HOSTS, *([] if ip.is_unspecified else [_host_form(address)]), *allow_hosts]
    return (f"serving on {where}: other machines can use the page and its API (samples, uploads, the model's "
            f"compute) without authentication; it answers requests whose Host is {', '.join(names)}, and "
            f"--allow-host NAME (repeatable) adds the names other machines use")


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    """The family and socket address ``bind`` takes for ``host:port`` (``0`` is 0.0.0.0, as in C)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        *_, address = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return family, address


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``."""
    family, address = _resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)  # before the URL is printed: early connections wait in the backlog for uvicorn
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _timed_protocol(head_timeout: float):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has no complete request head
    ``head_timeout`` seconds after it opened or after its last response: uvicorn's own keep-alive
    timeout starts only after a response, so a client that sent half a request, or nothing, held
    its connection (and a file handle) for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def on_response_complete(self):
            super().on_response_complete()
            self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def connection_lost(self, exc):
            self._head_timer.cancel()
            super().connection_lost(exc)

        def _head_timed_out(self):
            waiting = self.cycle is None or self.cycle.response_complete  # no request in progress
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


def serve(session: DemoSession, host: str = "127.0.0.1", port: int = 8000,
          max_upload_bytes: int = MAX_UPLOAD_BYTES, allow_hosts: Sequence[str] = (), *,
          max_pixels: int = MAX_PIXELS, head_timeout: float = HEAD_TIMEOUT_S,
          body_timeout: float = BODY_TIMEOUT_S) -> None:
    """Listen on ``host:port`` (port 0: a free one), warn in one line when that is not loopback,
    print the page's URL, serve until Ctrl+C (uvicorn then raises KeyboardInterrupt). Sets Pillow's
    own pixel limit for this process to ``max_pixels`` and makes its warning an error, a second
    check behind :func:`torchglow.demo.read_upload`'s. Raises OSError, with the address in its
    message, when the address cannot be bound."""
    import uvicorn
    from PIL import Image

    check_host_names(allow_hosts)
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    sock = _listen(host, port)
    address, port = sock.getsockname()[:2]
    warning = exposure_warning(address, port, allow_hosts)
    if warning:
        print(f"torchglow demo: warning: {warning}", file=sys.stderr)
    wildcard = ipaddress.ip_address(address).is_unspecified
    shown = "127.0.0.1" if wildcard else _host_form(address)
    hosts = [*LOCAL_HOSTS, *([] if wildcard else [shown]), *allow_hosts]
    app = create_app(session, max_upload_bytes, hosts, max_pixels=max_pixels, body_timeout=body_timeout)
    print(f"torchglow demo: serving {session.name} at http://{shown}:{port}/ (Ctrl+C to stop)", flush=True)
    config = uvicorn.Config(app, log_level="warning", http=_timed_protocol(head_timeout),
                            timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
