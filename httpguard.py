"""Guards of the HTTP surface: headers of every answer, socket origins, connections.

- ``security_headers`` gives every answer a Content-Security-Policy (no
  inline script; framed only by this site), ``nosniff`` and no referrer.
- ``same_origin`` refuses (403) a WebSocket handshake sent by a page of
  another site: a browser attaches its cookies and its user's network
  position to any site's socket, so a session token is not the only thing
  worth guarding.
- ``ConnectionGuard`` caps open connections below the descriptor limit, so
  that at the limit the server refuses new connections with a 503 and keeps
  descriptors for its sessions' own work (pipes, files, sandboxes).
- ``accept_failures_logged`` turns the event loop's report of a failed
  ``accept()`` (EMFILE: retried every second while it lasts) into one log
  line per interval that counts the rest.

The request-head timeout itself is aiohttp's keep-alive timer, which runs
from accept and from the end of each response (``create_app`` sets it).
"""

from __future__ import annotations

import asyncio
import errno
import resource
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from protocol import codec
from protocol.errors import Forbidden

logger = structlog.get_logger("deskhive.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Scripts, styles and sockets from this server only; images may be data: URLs
#: (screenshots) and blobs; nobody else may frame the pages.
CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "frame-src 'self'",
        "frame-ancestors 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    )
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "SAMEORIGIN",
}
#: Descriptors kept back from connections: at least this many, or a quarter of the limit.
RESERVE_MIN: Final = 256
#: Seconds between two log lines about refused connections or failed accepts.
LOG_INTERVAL_S: Final = 60.0
_ACCEPT_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer (pages, files, errors) carries ``SECURITY_HEADERS``."""
    response = await handler(request)
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response


def same_origin(allowed: Collection[str]) -> Middleware:
    """A middleware refusing WebSocket handshakes whose ``Origin`` is another site.

    A request without ``Origin`` comes from a program, not a page, and passes.
    """
    extra = frozenset(allowed)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if (
            origin is not None
            and request.headers.get("Upgrade", "").lower() == "websocket"
            and not _trusted(request, origin, extra)
        ):
            # The origin is not echoed: it is the other site's text, not ours.
            raise Forbidden(
                "pages of another site may not open this server's sockets (see --allowed-origins)"
            )
        return await handler(request)

    return middleware


def _trusted(request: web.Request, origin: str, extra: frozenset[str]) -> bool:
    origin = origin.strip().lower().rstrip("/")
    if origin in extra:
        return True
    scheme, sep, netloc = origin.partition("://")
    host = (request.host or "").lower()
    return bool(sep) and scheme == request.scheme and _netloc(netloc, scheme) == _netloc(host, scheme)


def _netloc(netloc: str, scheme: str) -> str:
    """*netloc* without its scheme's default port (browsers leave it out, proxies may not)."""
    default = ":443" if scheme == "https" else ":80"
    return netloc.removesuffix(default)


# ----------------------------------------------------------------------------
# Connections


def connection_limit(configured: int = 0) -> int:
    """*configured*, or the descriptor limit less a reserve (``RESERVE_MIN`` or a quarter)."""
    if configured > 0:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft - max(RESERVE_MIN, soft // 4))


class _Throttled:
    """Counts occurrences; says it is time to log at most once per interval."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.count = 0
        self._last: float | None = None

    def due(self, now: float) -> int | None:
        """The occurrences since the last log line when one is due now, else ``None``."""
        self.count += 1
        if self._last is not None and now - self._last < self.interval:
            return None
        self._last, count, self.count = now, self.count, 0
        return count


_REFUSAL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Retry-After: 5\r\n"
)


def _refusal(limit: int) -> bytes:
    body = codec.dumps(
        {"error": {"code": "busy", "message": f"the server is at its limit of {limit} open connections"}}
    ).encode()
    return _REFUSAL + b"Content-Length: %d\r\n\r\n" % len(body) + body


class ConnectionGuard:
    """Counts the server's open connections and refuses those past ``limit``."""

    def __init__(self, limit: int, *, log_interval: float = LOG_INTERVAL_S) -> None:
        self.limit = limit
        self.open = 0
        self._refused = _Throttled(log_interval)
        self._answer = _refusal(limit)

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory that counts *factory*'s connections, or refuses one past the limit."""

        def make() -> asyncio.Protocol:
            if self.open >= self.limit:
                return _Refuse(self)
            self.open += 1
            return _Counted(self, factory())

        return make

    async def listen(self, runner: web.AppRunner, host: str, port: int) -> asyncio.Server:
        """Listen on *host*:*port* for *runner*'s app (after ``runner.setup()``)."""
        server = runner.server
        assert server is not None, "runner.setup() first"
        loop = asyncio.get_running_loop()
        return await loop.create_server(self.wrap(server), host, port, backlog=128, reuse_address=True)

    def refused(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self._answer)
        transport.close()
        count = self._refused.due(asyncio.get_running_loop().time())
        if count is not None:
            logger.warning("http.connections_refused", limit=self.limit, refused=count)


class _Counted(asyncio.Protocol):
    """Forwards to aiohttp's protocol; gives the connection's place back when it ends."""

    __slots__ = ("_guard", "_inner")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard, self._inner = guard, inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.open -= 1
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Refuse(asyncio.Protocol):
    """Answers 503 at once and closes: a clean refusal, one descriptor for an instant."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard.refused(transport)


async def accept_failures_logged(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: failed accepts are logged once per interval, not once per retry."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    throttle = _Throttled(LOG_INTERVAL_S)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if "socket" in context and isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
            count = throttle.due(loop.time())
            if count is not None:
                logger.error("http.accept_failed", error=exc.strerror, failures=count)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
