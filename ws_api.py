"""``GET /ws``: a socket's hello, then every frame forwarded to its session's actor.

The handler decodes and forwards, nothing more: the first frame must be a
``hello`` that binds the socket to a session (as its owner or a share's
guest) within ``HELLO_TIMEOUT_S``, and each frame after it is decoded and
told to the actor. Events go back through the socket's ``WsPeer``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable
from typing import Final

import attrs
import structlog
from aiohttp import WSMsgType, web

from actors.session import SessionActor
from actors.shares import Grant
from http_common import HARD_FRAME_LIMIT
from limits import Limit, Limits, TokenBucket
from metrics import Metrics
from protocol import codec
from protocol import messages as m
from protocol.closecodes import CloseCode
from protocol.errors import (
    Forbidden,
    GatewayError,
    MailboxFull,
    ProtocolError,
    SessionNotFound,
    TooManySockets,
    Unauthorized,
)
from supervisor import Supervisor
from wspeer import WsPeer

HELLO_TIMEOUT_S: Final = 10.0
#: Shutdown gives the close handshakes of all sockets together this long.
SHUTDOWN_CLOSE_S: Final = 3.0


def add_routes(
    app: web.Application,
    supervisor: web.AppKey[Supervisor],
    sockets: web.AppKey[weakref.WeakSet[WsPeer]],
    limits: web.AppKey[Limits],
    metrics: web.AppKey[Metrics | None],
) -> None:
    """Serve ``GET /ws`` on *app*; the keys say where the supervisor, sockets, limits and metrics live."""
    app.router.add_get("/ws", _Sockets(supervisor, sockets, limits, metrics).websocket)


@attrs.frozen
class _Sockets:
    supervisor: web.AppKey[Supervisor]
    sockets: web.AppKey[weakref.WeakSet[WsPeer]]
    limits: web.AppKey[Limits]
    metrics: web.AppKey[Metrics | None]

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /ws``: hello, then forward every frame to the session's actor."""
        ws = web.WebSocketResponse(max_msg_size=HARD_FRAME_LIMIT, compress=False, heartbeat=30.0)
        app = request.app
        metrics = app[self.metrics]
        peer = WsPeer(ws, request, await ws.prepare(request), metrics=metrics)
        app[self.sockets].add(peer)
        bound = await _hello(ws, peer, app[self.supervisor])
        if bound is None:
            return ws
        actor, grant = bound
        sid = actor.info.session_id
        limit, mailbox = app[self.limits]["frames_per_second"], app[self.limits]["mailbox_size"]
        bucket = TokenBucket(limit.value, 2 * limit.value) if limit.on else None
        if metrics is not None:
            metrics.sockets_open += 1
            metrics.frames_received += 1  # the hello
        with structlog.contextvars.bound_contextvars(session_id=sid, peer=request.remote):
            # The socket's own task sends the rest of a replay and closes it on
            # overflow; it ends with the socket.
            async with asyncio.TaskGroup() as tg:
                tg.create_task(peer.run(), name=f"ws-out:{sid}")
                try:
                    async for frame in ws:
                        if metrics is not None:
                            metrics.frames_received += 1
                        if bucket is not None and not bucket.take():
                            peer.send_error(limit.refuse(request_id=_request_id(frame.data)))
                        elif frame.type is WSMsgType.TEXT:
                            await _forward(actor, peer, grant, frame.data, mailbox)
                        elif frame.type is WSMsgType.BINARY:
                            peer.send_error(ProtocolError("binary frames are not part of the protocol"))
                finally:
                    if metrics is not None:
                        metrics.sockets_open -= 1
                    actor.detach(peer)
                    peer.stop()
        return ws


def _request_id(data: object) -> str | None:
    """The ``id`` of a refused frame, if it has one to repeat (the frame is not handled)."""
    try:
        obj = codec.loads(data) if isinstance(data, str) else None
    except GatewayError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= codec.MAX_ID_CHARS else None


async def _hello(
    ws: web.WebSocketResponse, peer: WsPeer, supervisor: Supervisor
) -> tuple[SessionActor, Grant] | None:
    """Bind the socket to a session as its owner or a share's guest, or close it (4401, 4403, 4404, 4429)."""
    try:
        async with asyncio.timeout(HELLO_TIMEOUT_S):
            frame = await ws.receive()
    except TimeoutError:
        await peer.close(CloseCode.UNAUTHORIZED, "no hello within 10 s")
        return None
    if frame.type is not WSMsgType.TEXT:
        await peer.close(CloseCode.UNAUTHORIZED, "the first frame must be a hello")
        return None
    try:
        hello = codec.decode(frame.data)
        if not isinstance(hello, m.Hello):
            raise Unauthorized("the first frame must be a hello", request_id=getattr(hello, "id", None))
        actor, grant = supervisor.resolve(hello.token)
        actor.attach(peer, hello.last_seq, grant)
    except GatewayError as exc:
        if isinstance(exc, TooManySockets):
            supervisor.limits["sockets_per_session"].refused += 1
        peer.send_error(exc)
        await peer.close(_hello_close_code(exc), exc.message)
        return None
    return actor, grant


def _hello_close_code(exc: GatewayError) -> CloseCode:
    if isinstance(exc, SessionNotFound):
        return CloseCode.NOT_FOUND
    if isinstance(exc, TooManySockets):
        return CloseCode.RATE_LIMITED
    if isinstance(exc, Forbidden):
        return CloseCode.FORBIDDEN
    return CloseCode.UNAUTHORIZED


async def _forward(actor: SessionActor, peer: WsPeer, grant: Grant, data: str, mailbox: Limit) -> None:
    try:
        msg = codec.decode(data)
        if isinstance(msg, m.Hello):
            raise ProtocolError("this socket is already bound to a session")
        actor.tell(msg, peer, grant)
    except SessionNotFound as exc:
        await peer.close(CloseCode.NOT_FOUND, exc.message)
    except GatewayError as exc:
        if isinstance(exc, MailboxFull):
            mailbox.refused += 1
        peer.send_error(exc)


async def close_sockets(peers: Iterable[WsPeer]) -> None:
    """Tell every client the server is going away, all at once.

    Each close is bounded and cut when it overruns, so a hundred clients
    that never answer cost one deadline, not a hundred.
    """
    async with asyncio.TaskGroup() as tg:
        for peer in list(peers):
            tg.create_task(peer.close(CloseCode.GOING_AWAY, "server shutdown", timeout=SHUTDOWN_CLOSE_S))
