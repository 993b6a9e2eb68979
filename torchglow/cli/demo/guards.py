"""HTTP hardening of ``torchglow demo``'s server (:mod:`.server`, whose docstring
states the security model): the checks every request goes through (Host, a deadline for its body,
the response headers), the same-origin checks of the API, bounded bodies, JSON and numbers, and a
uvicorn protocol that closes connections which never complete a request."""

from __future__ import annotations

import json
import math
import re
import secrets
from typing import Any, Callable, Sequence

import anyio
import numpy as np
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .upload import human_size

HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
TOKEN_HEADER = "X-Torchglow-Token"
JSON_LIMIT = 64 * 1024
JSON_DEPTH = 4  # the API's deepest body, {"alphas": {name: alpha}}, is 2 deep
MAX_NUMBER_CHARS = 24  # a float64's 17 significant digits and exponent; 2**63 has 19 digits


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def short(value: Any) -> str:
    """``repr(value)``, cut to 40 characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------- every request
def host_name(host_header: str) -> str:
    """The host of a ``Host`` header, lowercase, without the port (``[::1]:80`` -> ``[::1]``)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0]


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether ``host`` is one of ``allowed``, or a subdomain of an allowed ``*.domain``."""
    return bool(host) and any(host == a or (a.startswith("*.") and host.endswith(a[1:])) for a in allowed)


def deadline(receive: Callable, seconds: float) -> Callable:
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


def guard(app: Callable, allowed_hosts: Sequence[str], body_timeout: float) -> Callable:
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

        host = host_name(Headers(scope=scope).get("host", ""))
        if not host_allowed(host, allowed_hosts):
            refused = error_response(f"the Host header {short(host)} is not a name of this server ({names}); "
                                     f"start torchglow demo with --allow-host NAME to answer another", 400)
            return await refused(scope, receive, send_with_headers)
        await app(scope, deadline(receive, body_timeout), send_with_headers)

    return guarded


def error_response(message: str, status: int) -> Response:
    """A JSON error that closes the connection (the request's body may be unread)."""
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})


def check_same_origin(request: Request, token: str) -> None:
    """403 unless the request comes from the server's own page: no other site (``Sec-Fetch-Site``)
    or origin (``Origin``: this server's ``Host``, over http or https), and the server's token."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        raise BadRequest(f"refused: the request comes from another site (Sec-Fetch-Site: {short(site)})", 403)
    origin = request.headers.get("origin")
    if origin is not None and origin not in {f"{s}://{request.headers.get('host', '')}" for s in ("http", "https")}:
        raise BadRequest(f"refused: the request comes from another origin (Origin: {short(origin)})", 403)
    sent = request.headers.get(TOKEN_HEADER, "").encode("latin-1")
    if not secrets.compare_digest(sent, token.encode("ascii")):
        raise BadRequest(f"refused: the {TOKEN_HEADER} header is missing or wrong; reload the page "
                         f"(the token changes each time the server starts)", 403)


def check_content_type(request: Request, accepted: Sequence[str]) -> None:
    """415 unless the Content-Type is one of ``accepted`` (``type/*`` matches a whole type)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not any(kind == a or (a.endswith("/*") and kind.startswith(a[:-1])) for a in accepted):
        raise BadRequest(f"the Content-Type must be {' or '.join(accepted)}, got {short(kind) if kind else 'none'}",
                         415)


# ---------------------------------------------------------------------------- bodies and fields
async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The body, refused with 413 as soon as it exceeds ``limit`` bytes (whatever Content-Length says)."""
    too_big = BadRequest(f"{what} is larger than the limit of {human_size(limit)}", 413)
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


def json_depth(body: bytes) -> int:
    """How deep the JSON text's arrays and objects nest (brackets inside strings do not count)."""
    steps = _BRACKETS[np.frombuffer(_STRING.sub(b'""', body), np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def _not_json_number(name: str):
    raise BadRequest(f"the request body has {name}, which is not a JSON number")


async def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object, its size, depth and number literals bounded before parsing."""
    body = await read_body(request, JSON_LIMIT, "the request body")
    if json_depth(body) > JSON_DEPTH:
        raise BadRequest(f"the request body nests more than {JSON_DEPTH} deep")
    literal = lambda convert: lambda text: convert(text) if len(text) <= MAX_NUMBER_CHARS else _TOO_LONG  # noqa: E731
    try:
        value = json.loads(body or b"{}", parse_int=literal(int), parse_float=literal(float),
                           parse_constant=_not_json_number)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    return value


_REQUIRED = object()


def number_field(body: dict[str, Any], key: str, default: Any = _REQUIRED, *, integer: bool = False,
                 lo: float = -math.inf, hi: float = math.inf):
    """``body[key]``, checked to be a number (an integer with ``integer``) in ``[lo, hi]``, as a
    float (an int with ``integer``); ``default`` when absent or null, 400 when absent without one."""
    value = body.get(key)
    if value is None:
        if default is _REQUIRED:
            raise BadRequest(f"missing {short(key)}")
        return default
    if value is _TOO_LONG:
        raise BadRequest(f"{short(key)} is a number of more than {MAX_NUMBER_CHARS} characters")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise BadRequest(f"{short(key)} must be {'an integer' if integer else 'a number'}, got {short(value)}")
    if not lo <= value <= hi:  # (exact for ints; false for NaN)
        raise BadRequest(f"{short(key)} must be in [{lo:g}, {hi:g}], got {value}" if not integer
                         else f"{short(key)} must be in [{lo}, {hi}], got {value}")
    return value if integer else float(value)


def token_field(body: dict[str, Any], key: str) -> str:
    """``body[key]``, checked to be a string (an image token the server handed out)."""
    value = body.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"{short(key)} must be an image token (a string), got {short(value)}")
    return value


# ---------------------------------------------------------------------------- connections
def timed_protocol(head_timeout: float):
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
