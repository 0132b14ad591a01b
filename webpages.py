"""What the web page asks of the server beyond the protocol: ``GET /api/info``
(what this server offers, so the page can disable what it lacks instead of
letting the user fail), ``GET /admin`` (the operator's page, which reads
``/status`` and ``/metrics`` with the admin token the operator types) and
``DELETE /admin/sessions/{id}`` (the operator ends a session).

Registered by ``setup(app)`` in ``server.create_app``; nothing here touches a
session.
"""

from __future__ import annotations

from aiohttp import web

from config import Settings
from http_common import WEB_DIR, check_admin
from supervisor import Supervisor


def info(settings: Settings) -> dict[str, object]:
    """The server's offer as the page needs it; no secret, nothing per session."""
    network = settings.sandbox == "e2b" or (settings.sandbox == "local" and settings.sandbox_network)
    return {
        "sandbox": settings.sandbox,
        # run_task answers an error without a model endpoint: the page says so up front.
        "agent": settings.model_url is not None,
        "passwords": settings.users_file is not None,
        "network": network,
        "idle_timeout": settings.idle_timeout,
    }


def setup(
    app: web.Application,
    settings: Settings,
    supervisor: web.AppKey[Supervisor],
    admin_token: web.AppKey[str],
) -> None:
    """Adds the page's own routes to *app*; the keys say where the supervisor and admin token live."""
    offer = info(settings)

    async def admin_end(request: web.Request) -> web.Response:
        check_admin(request, admin_token)
        # An unknown id raises SessionNotFound: the usual 404 body.
        await request.app[supervisor].stop(request.match_info["session_id"], "logout")
        return web.Response(status=204)

    async def api_info(request: web.Request) -> web.Response:
        return web.json_response(offer, headers={"Cache-Control": "no-store"})

    async def admin_page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "admin.html")

    app.router.add_get("/api/info", api_info)
    app.router.add_get("/admin", admin_page)
    app.router.add_delete("/admin/sessions/{session_id}", admin_end)
