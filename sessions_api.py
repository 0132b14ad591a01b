"""My sessions: list a user's live sessions, and end them with the password.

``GET /api/sessions`` takes any one of the user's session tokens and lists
every live session of that username, so a page that kept one token can offer
Resume and End for the others. ``POST /api/sessions/mine`` needs no token but
the user's password (a users file is required): someone who forgot every tab
is never locked out by their own sessions. Tokens are never listed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

import auth
from actors.session import SessionActor
from http_common import json_reply, read_body
from protocol.errors import NotConfigured, ProtocolError
from supervisor import Supervisor

#: Session ids one ``POST /api/sessions/mine`` may end.
MAX_END: Final = 64


#: Checks a username's password through the server's guessing throttle (raises when wrong or locked).
PasswordCheck = Callable[[web.Request, str, object], Awaitable[None]]


def add_routes(
    app: web.Application,
    supervisor: web.AppKey[Supervisor],
    users: web.AppKey[auth.UsersFile | None],
    check_password: PasswordCheck,
) -> None:
    """Serve ``GET /api/sessions`` and ``POST /api/sessions/mine`` on *app*."""

    async def mine(request: web.Request) -> web.Response:
        """``GET /api/sessions``: the live sessions of the token's username."""
        token = auth.bearer(request.headers.get("Authorization"))
        owner = request.app[supervisor].by_token(token)
        return _listing(request.app[supervisor], owner.info.username)

    async def mine_by_password(request: web.Request) -> web.Response:
        """``POST /api/sessions/mine``: prove the password, end the listed sessions, list the rest."""
        found = request.app[users]
        if found is None:
            raise NotConfigured(
                "without a users file there are no passwords: list sessions with one of their "
                "tokens (GET /api/sessions)"
            )
        body = await read_body(request)
        username = auth.check_username(body.get("username"))
        end = _ids(body.get("end"))
        # The same gate as login's: failures here count toward the same throttle.
        await check_password(request, username, body.get("password"))
        sup = request.app[supervisor]
        doomed = [a for a in sup.sessions_of(username) if a.info.session_id in end]
        if doomed:
            async with asyncio.TaskGroup() as tg:
                for actor in doomed:
                    tg.create_task(sup.stop(actor.info.session_id, "logout"), name="end-mine")
        return _listing(sup, username)

    app.router.add_get("/api/sessions", mine)
    app.router.add_post("/api/sessions/mine", mine_by_password)


def _listing(supervisor: Supervisor, username: str) -> web.Response:
    sessions = sorted(supervisor.sessions_of(username), key=lambda a: a.info.created_at)
    body = {"sessions": [describe(actor) for actor in sessions]}
    return json_reply(body)


def describe(actor: SessionActor) -> dict[str, Any]:
    """One session as its user sees it in a list (no token, no secret)."""
    stats = actor.statistics(time.monotonic())
    try:
        desktop = actor.sandbox.desktop_running
    except Exception:  # noqa: BLE001 - a broken backend's session is still listed, so it can be ended
        desktop = False
    return {
        "session_id": actor.info.session_id,
        "created": actor.info.created_at,
        "state": stats.state,
        "idle_seconds": round(stats.idle_seconds, 1),
        "desktop": desktop,
    }


def _ids(value: object) -> set[str]:
    if value is None:
        return set()
    if not isinstance(value, list) or len(value) > MAX_END or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"field 'end' must be a list of at most {MAX_END} session ids")
    return set(value)
