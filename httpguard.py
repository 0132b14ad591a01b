"""Guards of the HTTP surface: headers of every answer, socket origins, connections.

- ``security_headers`` gives every answer a Content-Security-Policy (no
  inline script; framed only by this site), ``nosniff`` and no referrer.
- ``same_origin`` answers 421 to a request naming a ``Host`` that is not
  this server's (a DNS-rebinding page), and refuses (403) a WebSocket
  handshake or a state-changing request sent by a page of another site: a
  browser lends its user's network position to any site's requests, so a
  session token is not the only thing worth guarding.
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
import ipaddress
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
    """A middleware refusing what a page of another site, or of a rebound name, may send.

    - A ``Host`` that is not this server's (see ``_own_host``) answers 421:
      a DNS-rebinding page, whose name now leads to this server, gets nothing.
    - A WebSocket handshake or a state-changing request (``POST``, ``PUT``,
      ``PATCH``, ``DELETE``) whose ``Origin`` is another site answers 403:
      a cross-site form or ``fetch`` cannot log in or act for the user.

    A request without ``Origin`` comes from a program, not a page, and passes.
    """
    extra = frozenset(allowed)
    hosts = _allowed_hosts(extra)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is not None:
            scheme = _own_host(host, hosts)
            if scheme is None:
                # The name is not echoed: it is whoever sent it's text, not ours.
                return _refused(421, "forbidden", MISDIRECTED)
            request[_CHECKED] = (scheme or ("https" if request.secure else "http"), host.strip().lower())
        origin = request.headers.get("Origin")
        if origin is not None and _guarded(request) and not _trusted(request, origin, extra):
            raise Forbidden(
                "pages of another site may not open this server's sockets or change anything"
                " (see --allowed-origins)"
            )
        return await handler(request)

    return middleware


#: Methods that change something: a page of another site may send them (a
#: form, a "simple" fetch) without asking, so their Origin is checked.
STATE_CHANGING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MISDIRECTED: Final = (
    "this server does not answer to that host name: reach it by its address, localhost,"
    " or a name listed in --allowed-origins"
)
#: The request's checked ``(scheme, host)``, set by ``same_origin``.
_CHECKED: Final = web.RequestKey("checked_host", tuple[str, str])


def _guarded(request: web.Request) -> bool:
    return request.method in STATE_CHANGING or request.headers.get("Upgrade", "").lower() == "websocket"


def _allowed_hosts(origins: frozenset[str]) -> dict[str, str]:
    """The ``Host`` values the allowed origins stand for, each with its origin's scheme."""
    hosts = {}
    for origin in origins:
        scheme, _, netloc = origin.partition("://")
        default = ":443" if scheme == "https" else ":80"
        bare = netloc.removesuffix(default)
        hosts[bare] = scheme
        if _host_name(bare) == bare:  # no port: browsers send none, proxies may send the default
            hosts[bare + default] = scheme
    return hosts


def _own_host(host: str, allowed: dict[str, str]) -> str | None:
    """``""`` when *host* names this server by itself, the scheme of its allowed origin, else ``None``.

    An IP address or ``localhost`` (which browsers never look up) involves no
    DNS that another site could point here; any other name must be listed.
    """
    host = host.strip().lower()
    if host in allowed:
        return allowed[host]
    name = _host_name(host)
    if name == "localhost" or name.endswith(".localhost"):
        return ""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return None
    return ""


def _host_name(host: str) -> str:
    """The name or address in a ``Host`` value, without its port."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") > 1:
        return host  # a bare IPv6 address
    return host.partition(":")[0]


def _refused(status: int, code: str, message: str) -> web.Response:
    body = codec.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, text=body, content_type="application/json")


def own_url(request: web.Request, path: str, *, websocket: bool = False) -> str:
    """An absolute URL of *path* on this server, as the request reached it (its checked Host)."""
    scheme, host = request.get(_CHECKED) or (
        "https" if request.secure else "http",
        _socket_netloc(request),
    )
    if websocket:
        scheme = "wss" if scheme == "https" else "ws"
    return f"{scheme}://{host}{path}"


def _socket_netloc(request: web.Request) -> str:
    """The address the request's connection came in on (no Host was sent)."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return "localhost"
    address, port = str(sockname[0]), int(sockname[1])
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


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
