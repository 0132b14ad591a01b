"""The aiohttp server: authenticate, decode, forward. No session logic here.

Handlers turn a request or a frame into a protocol message and hand it to the
session's actor (``actor.tell``); events come back through ``WsPeer``. The
socket's handler is ``ws_api``'s; the other route modules add theirs. The
supervisor runs in a ``cleanup_ctx``: started before the app serves, closed
after ``on_shutdown`` has closed every socket with ``GOING_AWAY``.
"""

from __future__ import annotations

import asyncio
import secrets
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

import aiohttp
import structlog
from aiohttp import web

import auth
import desktop_api
import files_api
import httpguard
import sessions_api
import shares_api
import webpages
import wiring
import ws_api
from actors.journal import Journal
from actors.session import SessionActor
from actors.shares import Grant
from actors.workflows import Workflow, describe, load_workflows
from config import Settings
from http_common import (
    WEB_DIR,
    check_admin,
    json_reply,
    optional_text,
    owner_session,
    read_body,
)
from limits import Limits, LoginGate
from metrics import CONTENT_TYPE, Metrics
from protocol import codec
from protocol import messages as m
from protocol.errors import GatewayError, MailboxFull, from_code
from sandboxes.base import SandboxFactory
from supervisor import Supervisor
from wspeer import WsPeer

logger = structlog.get_logger("deskhive.server")

NOVNC_DIR: Final = Path("/usr/share/novnc")
#: Bound on the actor's acknowledging an HTTP request (it waits for the store to keep it).
REPLY_TIMEOUT_S: Final = 10.0

SUPERVISOR: Final = web.AppKey("supervisor", Supervisor)
SUPERVISOR_TASK: Final = web.AppKey[asyncio.Task[None]]("supervisor_task")
SETTINGS: Final = web.AppKey("settings", Settings)
SOCKETS: Final = web.AppKey[weakref.WeakSet[WsPeer]]("sockets")
USERS: Final = web.AppKey[auth.UsersFile | None]("users")
STREAM_TOKENS: Final = web.AppKey("stream_tokens", auth.StreamTokens)
ADMIN_TOKEN: Final = web.AppKey("admin_token", str)
SANDBOX_FACTORY: Final = web.AppKey[SandboxFactory]("sandbox_factory")
WORKFLOWS: Final = web.AppKey[Mapping[str, Workflow]]("workflows")
LIMITS: Final = web.AppKey("limits", Limits)
LOGIN_GATE: Final = web.AppKey("login_gate", LoginGate)
#: ``None`` with ``--metrics off``: nothing is counted per frame.
METRICS: Final = web.AppKey[Metrics | None]("metrics")

# ----------------------------------------------------------------------------
# HTTP

_HTTP_CODES: Final = {
    400: "bad_message",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    413: "too_large",
}


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error answers ``{"error": {"code", "message"}}``, a bug included.

    An unexpected error is logged (its traceback without frame locals) and
    answers a fixed message: its own text may hold what it was handling.
    """
    try:
        return await handler(request)
    except GatewayError as exc:
        return _error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "bad_message" if exc.status < 500 else "internal")
        return _error_response(exc.status, code, exc.reason)
    except Exception:
        logger.exception("http.failed", method=request.method, route=_route(request), peer=request.remote)
        if request.writer.output_size > 0:
            raise  # a socket's handshake went out already: nothing to answer on
        return _error_response(500, "internal", "internal error (the server log has the details)")


def _route(request: web.Request) -> str:
    """The route's pattern (``/desktop/{session_id}``): paths and queries may carry tokens."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "?"


def _error_response(status: int, code: str, message: str) -> web.Response:
    body = codec.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, text=body, content_type="application/json")


def _credential(request: web.Request) -> tuple[SessionActor, Grant]:
    """The session the bearer token opens, and as whom (owner or a share's guest)."""
    token = auth.bearer(request.headers.get("Authorization"))
    return request.app[SUPERVISOR].resolve(token)


def _stream_url(app: web.Application, session_id: str) -> str | None:
    """The noVNC page of a desktop this server streams itself (``None`` for others).

    It holds no token: every socket of the session sees it in ``state``
    events, guests' included; each viewer asks for a stream token of its own.
    """
    if app[SETTINGS].sandbox != "local":
        return None
    return f"/desktop/{session_id}"


async def login(request: web.Request) -> web.Response:
    """``POST /api/sessions``: a new session for *username*."""
    request.app[LOGIN_GATE].admit(request.remote or "")
    body = await read_body(request)
    username = auth.check_username(body.get("username"))
    aws_login, customer_name = optional_text(body, "aws_login"), optional_text(body, "customer_name")
    await check_password(request, username, body.get("password"))
    session = await request.app[SUPERVISOR].spawn(username, aws_login=aws_login, customer_name=customer_name)
    if (metrics := request.app[METRICS]) is not None:
        metrics.logins += 1
    actor = session.actor
    sid = actor.info.session_id
    # The Host the request named only once same_origin has checked it is ours.
    ws_url = httpguard.own_url(request, "/ws", websocket=True)
    logger.info("session.created", session_id=sid, username=username, peer=request.remote)
    return json_reply(
        {
            "session_id": sid,
            "token": session.token,
            "ws_url": ws_url,
            "stream_url": actor.sandbox.stream_url,
            "username": username,
            "state": actor.state,
        },
        status=201,
    )


async def check_password(request: web.Request, username: str, password: object) -> None:
    """With a users file: *username*'s password, through the guessing throttle (else nothing).

    Every way of proving who one is (login, ``POST /api/sessions/mine``) goes
    through here, so a locked username or address is locked for all of them.
    """
    users = request.app[USERS]
    if users is not None:
        with request.app[LOGIN_GATE].passwords.attempt(username, request.remote or ""):
            await users.check(username, password)


async def logout(request: web.Request) -> web.Response:
    """``DELETE /api/sessions/{id}``: end the session the token belongs to."""
    actor = owner_session(request, SUPERVISOR)
    await request.app[SUPERVISOR].stop(actor.info.session_id, "logout")
    return web.Response(status=204)


def seed_endpoint(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``POST /start-desktop`` and friends: forward a request of type *kind*."""

    async def handler(request: web.Request) -> web.Response:
        actor, grant = _credential(request)
        msg = codec.from_object({**(await read_body(request)), "type": kind})
        assert not isinstance(msg, m.Hello)
        reply = _Reply()
        # A view share's token is refused here (403) as on the socket.
        try:
            rid = actor.tell(msg, reply, grant=grant)
        except MailboxFull:
            request.app[LIMITS]["mailbox_size"].refused += 1
            raise
        # 202 once the actor acknowledged it: then the store keeps the request,
        # and its result is owed even across a restart.
        await reply.acknowledged()
        return json_reply({"request_id": rid}, status=202)

    handler.__name__ = kind
    return handler


class _Reply:
    """The actor's answer to one HTTP request, taken as a socket takes it: an ``ack`` or an ``error``."""

    __slots__ = ("_frame", "_got")

    def __init__(self) -> None:
        self._frame: bytes | None = None
        self._got = asyncio.Event()

    def deliver(self, frame: bytes) -> bool:
        if self._frame is None:
            self._frame = frame
            self._got.set()
        return True

    def follow(self, journal: Journal, last_seq: int) -> None:
        raise NotImplementedError("an HTTP request watches no journal")

    def notify(self, seq: int, frame: bytes) -> bool:
        return False

    async def close(self, code: int, reason: str) -> None:
        return None

    async def acknowledged(self) -> None:
        """Return on the ack; raise the error the actor answered instead."""
        try:
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                await self._got.wait()
        except TimeoutError:
            raise GatewayError(f"the session did not take the request within {REPLY_TIMEOUT_S:g} s") from None
        answer = codec.loads(self._frame or b"{}")
        if answer.get("type") == "error":
            raise from_code(answer.get("code"), str(answer.get("message", "")))


async def workflows(request: web.Request) -> web.Response:
    """``GET /api/workflows``: the server's workflows, for pickers."""
    return json_reply({"workflows": [describe(w) for w in request.app[WORKFLOWS].values()]})


async def status(request: web.Request) -> web.Response:
    """``GET /status``: the supervisor's snapshot, for the admin token only."""
    check_admin(request, ADMIN_TOKEN)
    return json_reply(request.app[SUPERVISOR].status())


async def metrics_page(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text format, for the admin token only."""
    check_admin(request, ADMIN_TOKEN)
    metrics = request.app[METRICS]
    if metrics is None:
        raise web.HTTPNotFound(reason="metrics are off (--metrics off)")
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    if not supervisor.running:
        return _error_response(503, "internal", "the supervisor is not running")
    return json_reply({"ok": True, "sessions": len(supervisor)})


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html")


# ----------------------------------------------------------------------------
# The application


async def _run_supervisor(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the supervisor lives exactly as long as the app serves."""
    settings = app[SETTINGS]
    async with aiohttp.ClientSession() as http:
        config = wiring.supervisor_config(settings, app[WORKFLOWS], http)
        supervisor = Supervisor(
            config,
            app[SANDBOX_FACTORY],
            stream_url=lambda sid: _stream_url(app, sid),
            limits=app[LIMITS],
            metrics=app[METRICS],
        )
        app[SUPERVISOR] = supervisor
        app[SUPERVISOR_TASK] = asyncio.create_task(supervisor.run(), name="supervisor")
        await supervisor.wait_running()
        yield
        await _stop_supervisor(app)


async def _shutdown(app: web.Application) -> None:
    """``on_shutdown``: stop the sessions, then tell every client the server is going away.

    The sessions stop first, while their sockets are open: each cancelled
    job's result reaches the clients watching it before their socket
    closes.
    """
    try:
        await _stop_supervisor(app)
    except Exception:
        # Raised again where the supervisor's life ends (cleanup); the sockets still go.
        logger.exception("server.supervisor_stop_failed")
    sockets = app[SOCKETS]
    await ws_api.close_sockets(sockets)


async def _stop_supervisor(app: web.Application) -> None:
    """Stop every session and wait for the supervisor's end (idempotent; its own stops are bounded)."""
    task = app.get(SUPERVISOR_TASK)
    if task is None:
        return
    await app[SUPERVISOR].aclose()
    await task


def _add_limits(app: web.Application, settings: Settings) -> None:
    """The limits the server enforces itself (the supervisor adds its own), and the metrics."""
    limits = app[LIMITS] = Limits()
    limits.add("frames_per_second", settings.frames_per_second, "too many frames on this socket")
    app[LOGIN_GATE] = LoginGate(limits, settings.logins_per_minute)
    app[METRICS] = (
        Metrics(sessions=lambda: _sessions_by_state(app), refusals=limits.refusals)
        if settings.metrics
        else None
    )


def _sessions_by_state(app: web.Application) -> Mapping[str, int]:
    # The supervisor exists only while the app runs.
    supervisor = app.get(SUPERVISOR)
    return supervisor.sessions_by_state() if supervisor is not None else {}


async def _close_users(app: web.Application) -> None:
    if (users := app[USERS]) is not None:
        users.close()


def create_app(settings: Settings, *, sandbox_factory: SandboxFactory | None = None) -> web.Application:
    """The whole server; *sandbox_factory* overrides ``settings.sandbox`` (tests)."""
    app = web.Application(
        middlewares=[
            httpguard.security_headers,
            json_errors,
            httpguard.same_origin(settings.allowed_origins),
        ],
        client_max_size=codec.MAX_FRAME_BYTES,
        # aiohttp's keep-alive timer runs from accept and from each response's
        # end, and closes a connection still without a complete request head.
        handler_args={"keepalive_timeout": settings.header_timeout},
    )
    app[SETTINGS] = settings
    app[SOCKETS] = weakref.WeakSet()
    app[USERS] = auth.UsersFile.load(settings.users_file) if settings.users_file else None
    app[STREAM_TOKENS] = auth.StreamTokens()
    app[ADMIN_TOKEN] = settings.admin_token or secrets.token_urlsafe(24)
    app[SANDBOX_FACTORY] = sandbox_factory or wiring.sandbox_factory(settings)
    app[WORKFLOWS] = load_workflows(settings.workflows_dir)
    _add_limits(app, settings)
    app.cleanup_ctx.append(httpguard.accept_failures_logged)
    app.cleanup_ctx.append(_run_supervisor)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_close_users)
    app.add_routes(
        [
            web.get("/", index),
            web.get("/healthz", healthz),
            web.get("/status", status),
            web.get("/metrics", metrics_page),
            web.post("/api/sessions", login),
            web.delete("/api/sessions/{session_id}", logout),
            web.get("/api/workflows", workflows),
            web.post("/start-desktop", seed_endpoint("start_desktop")),
            web.post("/setup-environment", seed_endpoint("setup_environment")),
            web.post("/run-task", seed_endpoint("run_task")),
            web.post("/kill-desktop", seed_endpoint("kill_desktop")),
            web.post("/run-workflow", seed_endpoint("run_workflow")),
            web.static("/static", WEB_DIR),
        ]
    )
    ws_api.add_routes(app, SUPERVISOR, SOCKETS, LIMITS, METRICS)
    files_api.add_routes(app, SUPERVISOR, settings.upload_limit)
    shares_api.add_routes(app, SUPERVISOR)
    desktop_api.add_routes(app, SUPERVISOR, SOCKETS, STREAM_TOKENS)
    sessions_api.add_routes(app, SUPERVISOR, USERS, check_password)
    webpages.setup(app, settings, SUPERVISOR, ADMIN_TOKEN)
    if NOVNC_DIR.is_dir():
        app.router.add_static("/novnc", NOVNC_DIR)
    return app
