"""``/desktop/{id}`` and ``POST /api/sessions/{id}/stream``: the desktops this server streams itself.

A viewer asks for a stream token of its own (owner or guest, for one desktop
run), loads the noVNC page, and opens the VNC proxy with that token as a
WebSocket subprotocol; the proxy's socket closes with the server or the share.
"""

from __future__ import annotations

import weakref

import attrs
import structlog
from aiohttp import hdrs, web

import auth
from actors.session import SessionActor
from actors.shares import OWNER, Grant
from http_common import HARD_FRAME_LIMIT, WEB_DIR, json_reply
from protocol.errors import SessionNotFound, Unauthorized
from sandboxes.base import StreamedSandbox
from supervisor import Supervisor
from wspeer import WsPeer


def add_routes(
    app: web.Application,
    supervisor: web.AppKey[Supervisor],
    sockets: web.AppKey[weakref.WeakSet[WsPeer]],
    stream_tokens: web.AppKey[auth.StreamTokens],
) -> None:
    """Serve the desktop stream on *app*; the keys say where the supervisor, sockets and tokens live."""
    desktop = _Desktop(supervisor, sockets, stream_tokens)
    app.router.add_post("/api/sessions/{session_id}/stream", desktop.stream_token)
    app.router.add_get("/desktop/{session_id}", desktop.desktop_page)
    app.router.add_get("/desktop/{session_id}/websockify", desktop.desktop_socket)


@attrs.frozen
class _Desktop:
    supervisor: web.AppKey[Supervisor]
    sockets: web.AppKey[weakref.WeakSet[WsPeer]]
    stream_tokens: web.AppKey[auth.StreamTokens]

    def desktop_session(self, request: web.Request) -> SessionActor:
        try:
            return request.app[self.supervisor].get(request.match_info["session_id"])
        except SessionNotFound:
            raise web.HTTPNotFound(reason="no such session") from None

    async def desktop_page(self, request: web.Request) -> web.FileResponse:
        """``GET /desktop/{id}``: the noVNC page; the token travels in the fragment."""
        self.desktop_session(request)
        return web.FileResponse(WEB_DIR / "desktop.html")

    async def stream_token(self, request: web.Request) -> web.Response:
        """``POST /api/sessions/{id}/stream``: a token for the running desktop's stream, for this credential.

        It opens this desktop run only (a new desktop needs a new token) and,
        for a guest, only while the share lives; a view share's stream drops input.
        """
        token = auth.bearer(request.headers.get("Authorization"))
        sid = request.match_info["session_id"]
        actor, grant = request.app[self.supervisor].resolve_for(token, sid)
        run = actor.desktop_run
        if not isinstance(actor.sandbox, StreamedSandbox) or run == 0:
            raise web.HTTPConflict(reason="the desktop is not running")
        mode: auth.StreamMode = "view" if grant.role == "view" else "control"
        grant_name = grant.share_id or auth.OWNER_GRANT
        token = request.app[self.stream_tokens].token(sid, mode, run=run, grant=grant_name)
        return json_reply(
            {
                "token": token,
                "mode": mode,
                "protocol": auth.STREAM_PROTOCOL_PREFIX + token,
                "stream_url": f"/desktop/{sid}#token={token}",
            },
            status=201,
        )

    def stream_grant(self, request: web.Request, actor: SessionActor) -> Grant:
        """Who the handshake's stream token opens the stream for, else ``Unauthorized``."""
        token = auth.stream_token_of(request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, []))
        claim = auth.StreamTokens.parse(token)
        grant = OWNER
        if claim.grant != auth.OWNER_GRANT:
            share = actor.shares.get(claim.grant)
            if share is None:
                raise Unauthorized("this stream token's share is revoked or unknown")
            grant = Grant.of(share)
        mode: auth.StreamMode = "view" if grant.role == "view" else "control"
        request.app[self.stream_tokens].check(actor.info.session_id, token, mode, actor.desktop_run)
        return grant

    async def desktop_socket(self, request: web.Request) -> web.StreamResponse:
        """``GET /desktop/{id}/websockify``: the authenticated VNC proxy.

        The stream token comes as the subprotocol ``deskhive.stream.<token>``
        (next to ``binary``), never in the query string.
        """
        from sandboxes.local.vncproxy import pipe

        actor = self.desktop_session(request)
        grant = self.stream_grant(request, actor)
        sandbox = actor.sandbox
        if not isinstance(sandbox, StreamedSandbox) or (endpoint := sandbox.vnc_endpoint) is None:
            raise web.HTTPConflict(reason="the desktop is not running")
        ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=HARD_FRAME_LIMIT, compress=False)
        # Registered so that shutdown, and a revocation of its share, close it.
        closer = WsPeer(ws, request, await ws.prepare(request))
        request.app[self.sockets].add(closer)
        view_only = grant.role == "view"
        with structlog.contextvars.bound_contextvars(
            session_id=actor.info.session_id,
            stream="view" if view_only else "control",
            share_id=grant.share_id,
        ):
            actor.join_stream(closer, grant)
            try:
                await pipe(
                    ws, endpoint, view_only=view_only, password=sandbox.vnc_password, on_input=actor.touch
                )
            finally:
                actor.leave_stream(closer, grant)
        return ws
