"""The web layer of ``torchglow demo``: one static page and a small JSON API over a
:class:`~.session.DemoSession`, served by Starlette on uvicorn.

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
* **Input.** JSON bodies of at most 64 KiB, nested at most 4 deep, numbers of at most 24
  characters (:mod:`.guards`), each field range-checked: a 4xx naming the field.
  Uploads are capped at ``max_upload_bytes`` while they stream, at most :data:`UPLOADS_IN_FLIGHT`
  at a time (503 beyond), decoded as :func:`.upload.read_upload` says.
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
import re
import secrets
import socket
import sys
import threading
import traceback
import warnings
from importlib.resources import files
from typing import Callable, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .session import MAX_ALPHA, MAX_SEED, MAX_TEMPERATURE, DemoSession
from .upload import MAX_PIXELS, MAX_UPLOAD_BYTES
from .guards import (
    BadRequest, check_content_type, check_same_origin, error_response, guard, json_body, number_field, read_body,
    short, timed_protocol, token_field,
)

STATIC_DIR = files("torchglow.cli.demo") / "static"
TOKEN_META = '<meta name="torchglow-token" content="">'  # in index.html; the server fills in its token
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
UPLOADS_IN_FLIGHT = 4  # bodies held at once: at most 4 x max_upload_bytes
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5


# ---------------------------------------------------------------------------- the app
def _endpoint(handler: Callable, token: str, body_types: Sequence[str] = ()) -> Callable:
    """Check the request's origin (and a POST's content type), run ``handler(request)`` (async,
    returning a JSON-able value) and turn the errors a user can cause into 4xx ``{"error": ...}``
    responses; anything else is a 500 whose traceback goes to the server's stderr, and the server
    keeps serving."""

    async def endpoint(request: Request) -> Response:
        try:
            check_same_origin(request, token)
            if request.method == "POST":
                check_content_type(request, body_types)
            return JSONResponse(await handler(request))
        except BadRequest as e:
            return error_response(str(e), e.status)
        except ValueError as e:  # UploadError and the session's range checks
            return error_response(str(e), 400)
        except KeyError as e:
            return error_response(e.args[0] if e.args else "not found", 404)
        except TimeoutError:  # deadline
            return error_response("the request's body did not arrive in time", 408)
        except ClientDisconnect:  # the client left mid-body: nobody to answer, nothing to log
            return Response(status_code=400)
        except Exception as e:  # a bug, not the user's doing: say so, log it, keep serving
            traceback.print_exc(file=sys.stderr)
            return error_response(f"internal error ({type(e).__name__}); see the server's log", 500)

    return endpoint


def _page(token: str) -> str:
    """index.html with ``token`` in its :data:`TOKEN_META` tag."""
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if TOKEN_META not in page:
        raise RuntimeError(f"index.html has no {TOKEN_META}")
    return page.replace(TOKEN_META, TOKEN_META.replace('content=""', f'content="{token}"'))


def _routes(page: str, token: str, api: dict[str, Callable]) -> list:
    """The page, its static files, ``GET /api/info`` and a POST route per other handler of ``api``
    (the upload takes a file's bytes, the others JSON)."""

    async def index(request: Request):
        return HTMLResponse(page)

    body_types = {"upload": ("application/octet-stream", "image/*")}
    posts = [Route(f"/api/{name}", _endpoint(handler, token, body_types.get(name, ("application/json",))),
                   methods=["POST"]) for name, handler in api.items() if name != "info"]
    return [Route("/", index), Route("/api/info", _endpoint(api["info"], token)), *posts,
            Mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")]


def create_app(session: DemoSession, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               allowed_hosts: Sequence[str] = LOCAL_HOSTS, *, token: str | None = None,
               max_pixels: int = MAX_PIXELS, body_timeout: float = BODY_TIMEOUT_S) -> Callable:
    """The ASGI app serving ``session``: answers requests whose ``Host`` is one of ``allowed_hosts``
    (``*.domain`` for its subdomains), API requests carrying ``token`` (default: a new random one,
    put into the page)."""
    token = token or secrets.token_urlsafe(32)
    uploads = threading.BoundedSemaphore(UPLOADS_IN_FLIGHT)
    client = lambda request: request.client.host if request.client else ""  # noqa: E731

    async def info(request: Request):
        return session.info()

    async def samples(request: Request):
        body = await json_body(request)
        temperature = number_field(body, "temperature", 0.7, lo=0, hi=MAX_TEMPERATURE)
        seed = number_field(body, "seed", 0, integer=True, lo=0, hi=MAX_SEED)
        label = number_field(body, "label", None, integer=True)
        return {"image": await run_in_threadpool(session.samples, temperature, seed, label)}

    async def upload(request: Request):
        invert = request.query_params.get("invert", "0")
        if invert not in ("0", "1"):
            raise BadRequest(f"'invert' must be 0 or 1, got {short(invert)}")
        if not uploads.acquire(blocking=False):
            raise BadRequest(f"the server is busy with {UPLOADS_IN_FLIGHT} other uploads; try again", 503)
        try:
            data = await read_body(request, max_upload_bytes, "the upload")
            return await run_in_threadpool(session.encode_upload, data, invert == "1", max_upload_bytes,
                                           max_pixels, client(request))
        finally:
            uploads.release()

    async def test_image(request: Request):
        body = await json_body(request)
        return await run_in_threadpool(session.encode_test, number_field(body, "index", integer=True), client(request))

    async def edit(request: Request):
        body = await json_body(request)
        alphas = body.get("alphas", {})
        if not isinstance(alphas, dict):
            raise BadRequest("'alphas' must map direction names to numbers")
        alphas = {k: number_field(alphas, k, lo=-MAX_ALPHA, hi=MAX_ALPHA) for k in alphas}
        return {"image": await run_in_threadpool(session.edit, token_field(body, "token"), alphas)}

    async def mix(request: Request):
        body = await json_body(request)
        t = number_field(body, "t", None, lo=0, hi=1)
        return {"image": await run_in_threadpool(session.mix, token_field(body, "a"), token_field(body, "b"), t)}

    api = dict(info=info, samples=samples, upload=upload, test_image=test_image, edit=edit, mix=mix)
    app = Starlette(routes=_routes(_page(token), token, api))
    return guard(app, [h.lower() for h in allowed_hosts], body_timeout)


# ---------------------------------------------------------------------------- listening
def check_host_names(names: Sequence[str]) -> None:
    """ValueError unless every name is a host name, an IP address (``[...]`` for IPv6) or
    ``*.domain``; a bare ``*`` would answer any Host and undo the DNS-rebinding check."""
    for name in names:
        if name == "*":
            raise ValueError("'*' would answer requests naming any host, which lets other web sites reach the "
                             "page (DNS rebinding); name the hosts")
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]", name):
            raise ValueError(f"{short(name)} is not a host name, an IP address ([...] for IPv6) or *.domain")


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


def serve(session: DemoSession, host: str = "127.0.0.1", port: int = 8000,
          max_upload_bytes: int = MAX_UPLOAD_BYTES, allow_hosts: Sequence[str] = (), *,
          max_pixels: int = MAX_PIXELS, head_timeout: float = HEAD_TIMEOUT_S,
          body_timeout: float = BODY_TIMEOUT_S) -> None:
    """Listen on ``host:port`` (port 0: a free one), warn in one line when that is not loopback,
    print the page's URL, serve until Ctrl+C (uvicorn then raises KeyboardInterrupt). Sets Pillow's
    own pixel limit for this process to ``max_pixels`` and makes its warning an error, a second
    check behind :func:`.upload.read_upload`'s. Raises OSError, with the address in its
    message, when the address cannot be bound."""
    import uvicorn
    from PIL import Image

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
    config = uvicorn.Config(app, log_level="warning", http=timed_protocol(head_timeout),
                            timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
