"""The web layer of ``torchglow demo``: one static page and a small JSON API over a
:class:`torchglow.demo.DemoSession`, served by Starlette on uvicorn.

Why Starlette and not Gradio: the page needs a handful of endpoints and one hand-written page;
Starlette + uvicorn are two small, well-kept packages with no frontend of their own, so nothing
is fetched from a CDN, there is no telemetry, and the page works with no network at all.

API (JSON in and out; errors are ``{"error": message}`` with status 400, 404 or 413):

=========================== ======================================= ================================
``GET /api/info``           model, classes, directions, histogram   :meth:`DemoSession.info`
``POST /api/samples``       ``{temperature, seed, label}``           ``{image}``
``POST /api/upload?invert`` the image file as the raw body           ``{token, input, reconstruction,
                                                                     bpd, label, readout}``
``POST /api/test_image``    ``{index}`` (of the gallery)             as upload
``POST /api/edit``          ``{token, alphas: {name: alpha}}``       ``{image}``
``POST /api/mix``           ``{a, b, t}`` (t null: the strip)        ``{image}``
=========================== ======================================= ================================

No endpoint takes a path: images arrive as bytes and are referred to by the tokens the server
hands out. Uploads are capped at ``max_upload_bytes`` while they stream in. The server answers only
requests whose ``Host`` is the address it listens on (or localhost), which defeats DNS rebinding,
and its pages may load nothing but their own files and ``data:`` images.
"""

from __future__ import annotations

import json
import socket
import sys
import traceback
from importlib.resources import files
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .demo import MAX_UPLOAD_BYTES, DemoSession, UploadError, human_size

STATIC_DIR = files("torchglow") / "demo_static"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _security_headers(app):
    """ASGI middleware adding :data:`HEADERS` to every response."""
    extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]

    async def wrapped(scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await app(scope, receive, send_with_headers)

    return wrapped


async def _json_body(request: Request, limit: int = 64 * 1024) -> dict[str, Any]:
    body = await _read_body(request, limit)
    try:
        value = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _BadRequest("the request body is not JSON") from None
    if not isinstance(value, dict):
        raise _BadRequest("the request body must be a JSON object")
    return value


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds ``limit`` bytes (whatever Content-Length says)."""
    too_big = _BadRequest(f"the upload is larger than the limit of {human_size(limit)}", 413)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


_REQUIRED = object()


def _number(body: dict[str, Any], key: str, default: Any = _REQUIRED, integer: bool = False):
    """``body[key]`` checked to be a number (an integer with ``integer``); ``default`` when absent
    or null, and a 400 error when absent without a default."""
    value = body.get(key)
    if value is None:
        if default is _REQUIRED:
            raise _BadRequest(f"missing {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _BadRequest(f"{key!r} must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def _endpoint(handler: Callable) -> Callable:
    """Run ``handler(request)`` (async, returning a JSON-able value) and turn the errors a user
    can cause into ``{"error": ...}`` responses; anything else is a 500 whose traceback goes to
    the server's stderr, and the server keeps serving."""

    async def endpoint(request: Request) -> Response:
        try:
            return JSONResponse(await handler(request), headers={"Cache-Control": "no-store"})
        except _BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except (UploadError, ValueError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except KeyError as e:
            return JSONResponse({"error": e.args[0] if e.args else "not found"}, status_code=404)
        except Exception as e:  # a bug, not the user's doing: say so, log it, keep serving
            traceback.print_exc(file=sys.stderr)
            return JSONResponse({"error": f"internal error ({type(e).__name__}); see the server's log"},
                                status_code=500)

    return endpoint


def create_app(session: DemoSession, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               allowed_hosts: list[str] | None = None) -> Starlette:
    """The Starlette app serving ``session``. ``allowed_hosts``: values of the ``Host`` header to
    answer (default: localhost and 127.0.0.1; ``["*"]`` for any)."""

    async def info(request: Request):
        return session.info()

    async def samples(request: Request):
        body = await _json_body(request)
        return {"image": await run_in_threadpool(
            session.samples, float(_number(body, "temperature", 0.7)), int(_number(body, "seed", 0, integer=True)),
            _number(body, "label", None, integer=True))}

    async def upload(request: Request):
        data = await _read_body(request, max_upload_bytes)
        invert = request.query_params.get("invert", "0") in ("1", "true")
        return await run_in_threadpool(session.encode_upload, data, invert, max_upload_bytes)

    async def test_image(request: Request):
        body = await _json_body(request)
        return await run_in_threadpool(session.encode_test, int(_number(body, "index", integer=True)))

    async def edit(request: Request):
        body = await _json_body(request)
        alphas = body.get("alphas", {})
        if not isinstance(alphas, dict):
            raise _BadRequest("'alphas' must map direction names to numbers")
        alphas = {str(k): float(_number(alphas, k)) for k in alphas}
        return {"image": await run_in_threadpool(session.edit, body.get("token"), alphas)}

    async def mix(request: Request):
        body = await _json_body(request)
        t = _number(body, "t", None)
        return {"image": await run_in_threadpool(session.mix, body.get("a"), body.get("b"),
                                                 None if t is None else float(t))}

    async def index(request: Request):
        return FileResponse(str(STATIC_DIR / "index.html"), headers={"Cache-Control": "no-store"})

    routes = [
        Route("/", index),
        Route("/api/info", _endpoint(info)),
        Route("/api/samples", _endpoint(samples), methods=["POST"]),
        Route("/api/upload", _endpoint(upload), methods=["POST"]),
        Route("/api/test_image", _endpoint(test_image), methods=["POST"]),
        Route("/api/edit", _endpoint(edit), methods=["POST"]),
        Route("/api/mix", _endpoint(mix), methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static"),
    ]
    hosts = allowed_hosts or ["127.0.0.1", "localhost", "[::1]"]
    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])
    return _security_headers(app)


def serve(session: DemoSession, host: str = "127.0.0.1", port: int = 8000,
          max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
    """Listen on ``host:port`` (port 0: a free one), print the page's URL, serve until Ctrl+C.
    Raises OSError, with the address in its message, when the address cannot be bound."""
    import uvicorn

    wildcard = host in ("0.0.0.0", "::", "")
    if wildcard:
        print(f"torchglow demo: warning: --host {host or '0.0.0.0'} makes the page reachable from other "
              f"machines; it has no authentication", file=sys.stderr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # before the URL is printed: early connections wait in the backlog for uvicorn
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if wildcard else (f"[{host}]" if ":" in host else host)
    hosts = ["*"] if wildcard else sorted({"127.0.0.1", "localhost", "[::1]", shown})
    app = create_app(session, max_upload_bytes, hosts)
    print(f"torchglow demo: serving {session.name} at http://{shown}:{port}/ (Ctrl+C to stop)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
