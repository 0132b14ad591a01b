"""What the route modules share: JSON replies and bodies, the owner's and admin's checks, the web folder.

The route modules (``server`` and its ``*_api`` and ``webpages`` siblings)
answer and read JSON the same way, refuse a share's token where only the
owner's will do and check the admin token; this is the one place those
rules live.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Final

from aiohttp import web

import auth
from actors.session import SessionActor
from protocol import codec
from protocol.errors import Forbidden, FrameTooLarge, ProtocolError, Unauthorized
from supervisor import Supervisor

WEB_DIR: Final = Path(__file__).parent / "web"
#: Frames over this close the socket (1009); frames over 64 KiB get ``too_large``.
HARD_FRAME_LIMIT: Final = 1024 * 1024


def json_reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=codec.dumps(data), content_type="application/json")


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object ({} when empty)."""
    if request.content_length and request.content_length > codec.MAX_FRAME_BYTES:
        raise FrameTooLarge(f"body is over {codec.MAX_FRAME_BYTES} bytes")
    raw = await request.read()
    if not raw.strip():
        return {}
    obj = codec.loads(raw)
    if not isinstance(obj, dict):
        raise ProtocolError("body must be a JSON object")
    return obj


def optional_text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 128:
        raise ProtocolError(f"field {key!r} must be a string of at most 128 characters")
    return value


def owner_session(request: web.Request, supervisor: web.AppKey[Supervisor]) -> SessionActor:
    """The session of the path, for its owner's token only (a share's gets 403)."""
    token = auth.bearer(request.headers.get("Authorization"))
    actor, grant = request.app[supervisor].resolve_for(token, request.match_info["session_id"])
    if grant.share_id is not None:
        raise Forbidden("a share token cannot manage shares or end the session")
    return actor


def check_admin(request: web.Request, admin_token: web.AppKey[str]) -> None:
    """Refuse (401) a request without the operator's token."""
    token = auth.bearer(request.headers.get("Authorization"))
    if not hmac.compare_digest(token.encode(), request.app[admin_token].encode()):
        raise Unauthorized("wrong admin token")
