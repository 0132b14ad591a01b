"""``/api/sessions/{id}/shares``: the owner creates, lists and revokes the shares of a session.

A share's token is shown once, when it is made; the list never holds one.
Revoking goes through the supervisor, which voids the share and closes the
sockets and streams it opened (4403).
"""

from __future__ import annotations

from typing import Final

import attrs
import structlog
from aiohttp import web

from actors.shares import SHARE_MODES
from http_common import json_reply, optional_text, owner_session, read_body
from protocol.errors import ProtocolError
from supervisor import Supervisor

logger = structlog.get_logger("deskhive.server")

ROUTE: Final = "/api/sessions/{session_id}/shares"


def add_routes(app: web.Application, supervisor: web.AppKey[Supervisor]) -> None:
    """Serve the share endpoints on *app*, sessions found through ``app[supervisor]``."""
    shares = _Shares(supervisor)
    app.router.add_post(ROUTE, shares.create_share)
    app.router.add_get(ROUTE, shares.list_shares)
    app.router.add_delete(f"{ROUTE}/{{share_id}}", shares.revoke_share)


@attrs.frozen
class _Shares:
    supervisor: web.AppKey[Supervisor]

    async def create_share(self, request: web.Request) -> web.Response:
        """``POST /api/sessions/{id}/shares``: a guest's token, shown this once."""
        actor = owner_session(request, self.supervisor)
        body = await read_body(request)
        mode = body.get("mode")
        if mode not in SHARE_MODES:
            raise ProtocolError("field 'mode' must be 'view' or 'control'")
        share, token = await request.app[self.supervisor].create_share(
            actor, mode, optional_text(body, "label")
        )
        logger.info("share.created", session_id=share.session_id, share_id=share.share_id, mode=share.mode)
        return json_reply(
            {
                "share_id": share.share_id,
                "token": token,
                "mode": share.mode,
                "label": share.label,
                "created": share.created,
                "url": f"/#share={token}",
            },
            status=201,
        )

    async def list_shares(self, request: web.Request) -> web.Response:
        """``GET /api/sessions/{id}/shares``: the live shares, without their tokens."""
        actor = owner_session(request, self.supervisor)
        return json_reply({"shares": [attrs.asdict(share) for share in actor.shares.stats()]})

    async def revoke_share(self, request: web.Request) -> web.Response:
        """``DELETE /api/sessions/{id}/shares/{share_id}``: void it and close what it opened (4403)."""
        actor = owner_session(request, self.supervisor)
        share_id = request.match_info["share_id"]
        if await request.app[self.supervisor].revoke_share(actor, share_id) is None:
            raise web.HTTPNotFound(reason=f"session {actor.info.session_id} has no share {share_id!r}")
        logger.info("share.revoked", session_id=actor.info.session_id, share_id=share_id)
        return web.Response(status=204)
