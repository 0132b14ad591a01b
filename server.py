"""The aiohttp server: authenticate, decode, forward. No session logic here.

Handlers turn a request or a frame into a protocol message and hand it to the
session's actor (``actor.tell``); events come back through ``WsPeer``. The
supervisor runs in a ``cleanup_ctx``: started before the app serves, closed
after ``on_shutdown`` has closed every socket with ``GOING_AWAY``.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import os
import secrets
import signal
import struct
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import WSCloseCode, WSMsgType, web

import auth
from actors.jobs import JobConfig
from actors.session import ActorConfig, SessionActor
from actors.workflows import Workflow, describe, load_workflows
from config import Settings, from_args, parser
from protocol import codec
from protocol import messages as m
from protocol.errors import (
    Forbidden,
    FrameTooLarge,
    GatewayError,
    NotConfigured,
    ProtocolError,
    SessionNotFound,
    Unauthorized,
)
from sandboxes.base import Limits, SandboxFactory
from supervisor import Supervisor, SupervisorConfig

logger = structlog.get_logger("deskhive.server")

WEB_DIR: Final = Path(__file__).parent / "web"
NOVNC_DIR: Final = Path("/usr/share/novnc")
HELLO_TIMEOUT_S: Final = 10.0
#: Frames over this close the socket (1009); frames over 64 KiB get ``too_large``.
HARD_FRAME_LIMIT: Final = 1024 * 1024
#: A socket with this much unsent output is too slow to keep up: it is dropped
#: and may resume from its last ``seq``.
SLOW_PEER_BYTES: Final = 64 * 1024 * 1024
CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_NOT_FOUND: Final = 4404

SUPERVISOR: Final = web.AppKey("supervisor", Supervisor)
SETTINGS: Final = web.AppKey("settings", Settings)
SOCKETS: Final = web.AppKey[weakref.WeakSet[web.WebSocketResponse]]("sockets")
USERS: Final = web.AppKey[auth.UsersFile | None]("users")
STREAM_TOKENS: Final = web.AppKey("stream_tokens", auth.StreamTokens)
ADMIN_TOKEN: Final = web.AppKey("admin_token", str)
SANDBOX_FACTORY: Final = web.AppKey[SandboxFactory]("sandbox_factory")
WORKFLOWS: Final = web.AppKey[Mapping[str, Workflow]]("workflows")

# ----------------------------------------------------------------------------
# Sockets


def _ws_header(length: int) -> bytes:
    # RFC 6455 §5.2: FIN + text opcode; servers send unmasked frames.
    if length < 126:
        return struct.pack("!BB", 0x81, length)
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)


class WsPeer:
    """A WebSocket as the actor sees it: ``deliver`` never suspends.

    Frames are framed here (RFC 6455, one shared payload per broadcast) and
    collected until the end of the current event-loop turn, then written with
    one ``writelines``: a burst of replies costs one system call, a broadcast
    never yields halfway, and every socket of a session gets its frames in
    ``seq`` order. Error replies take the same path, so nothing overtakes an
    event. A socket whose unsent output passes ``SLOW_PEER_BYTES`` is aborted
    rather than left to stall the session; its client resumes from its seq.
    """

    __slots__ = ("__weakref__", "_loop", "_pending", "_pending_bytes", "_transport", "_ws", "remote")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self._ws = ws
        self._transport = request.transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.remote = request.remote

    def deliver(self, frame: bytes) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing() or self._ws.closed:
            return False
        if transport.get_write_buffer_size() + self._pending_bytes > SLOW_PEER_BYTES:
            logger.warning("ws.slow_peer_dropped", peer=self.remote)
            self._pending.clear()
            transport.abort()
            return False
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending += (_ws_header(len(frame)), frame)
        self._pending_bytes += len(frame)
        return True

    def flush(self) -> None:
        """Write what ``deliver`` collected (dropped if the socket closed since)."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        transport = self._transport
        if pending and transport is not None and not transport.is_closing() and not self._ws.closed:
            transport.writelines(pending)

    def send_error(self, exc: GatewayError) -> None:
        self.deliver(codec.encode(codec.error_for(exc)))

    async def close(self, code: int, reason: str) -> None:
        self.flush()
        await self._ws.close(code=code, message=reason.encode()[:120])


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """``GET /ws``: hello, then forward every frame to the session's actor."""
    ws = web.WebSocketResponse(max_msg_size=HARD_FRAME_LIMIT, compress=False, heartbeat=30.0)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    peer = WsPeer(ws, request)
    actor = await _hello(ws, peer, request.app[SUPERVISOR])
    if actor is None:
        return ws
    with structlog.contextvars.bound_contextvars(session_id=actor.info.session_id, peer=request.remote):
        try:
            async for frame in ws:
                if frame.type is WSMsgType.TEXT:
                    await _forward(actor, peer, frame.data)
                elif frame.type is WSMsgType.BINARY:
                    peer.send_error(ProtocolError("binary frames are not part of the protocol"))
        finally:
            actor.detach(peer)
    return ws


async def _hello(ws: web.WebSocketResponse, peer: WsPeer, supervisor: Supervisor) -> SessionActor | None:
    """Bind the socket to a session, or close it with 4401/4404."""
    try:
        async with asyncio.timeout(HELLO_TIMEOUT_S):
            frame = await ws.receive()
    except TimeoutError:
        await ws.close(code=CLOSE_UNAUTHORIZED, message=b"no hello within 10 s")
        return None
    if frame.type is not WSMsgType.TEXT:
        await ws.close(code=CLOSE_UNAUTHORIZED, message=b"the first frame must be a hello")
        return None
    try:
        hello = codec.decode(frame.data)
        if not isinstance(hello, m.Hello):
            raise Unauthorized("the first frame must be a hello", request_id=getattr(hello, "id", None))
        actor = supervisor.by_token(hello.token)
        actor.attach(peer, hello.last_seq)
    except SessionNotFound as exc:
        peer.send_error(exc)
        await peer.close(CLOSE_NOT_FOUND, exc.message)
        return None
    except GatewayError as exc:
        peer.send_error(exc)
        await peer.close(CLOSE_UNAUTHORIZED, exc.message)
        return None
    return actor


async def _forward(actor: SessionActor, peer: WsPeer, data: str) -> None:
    try:
        msg = codec.decode(data)
        if isinstance(msg, m.Hello):
            raise ProtocolError("this socket is already bound to a session")
        actor.tell(msg, peer)
    except SessionNotFound as exc:
        await peer.close(CLOSE_NOT_FOUND, exc.message)
    except GatewayError as exc:
        peer.send_error(exc)


async def close_sockets(app: web.Application) -> None:
    """``on_shutdown``: tell every client the server is going away."""
    sockets = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


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
    """Every error answers ``{"error": {"code", "message"}}``."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return _error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "bad_message" if exc.status < 500 else "internal")
        return _error_response(exc.status, code, exc.reason)


def _error_response(status: int, code: str, message: str) -> web.Response:
    body = codec.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, text=body, content_type="application/json")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=codec.dumps(data), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
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


def _optional_text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 128:
        raise ProtocolError(f"field {key!r} must be a string of at most 128 characters")
    return value


def _session(request: web.Request) -> SessionActor:
    token = auth.bearer(request.headers.get("Authorization"))
    return request.app[SUPERVISOR].by_token(token)


def _stream_url(app: web.Application, session_id: str, mode: auth.StreamMode = "control") -> str | None:
    """The noVNC page of a desktop this server streams itself (``None`` for others)."""
    if app[SETTINGS].sandbox != "local":
        return None
    return f"/desktop/{session_id}#token={app[STREAM_TOKENS].token(session_id, mode)}"


async def login(request: web.Request) -> web.Response:
    """``POST /api/sessions``: a new session for *username*."""
    body = await _body(request)
    username = auth.check_username(body.get("username"))
    aws_login, customer_name = _optional_text(body, "aws_login"), _optional_text(body, "customer_name")
    users = request.app[USERS]
    if users is not None:
        await users.check(username, body.get("password"))
    session = await request.app[SUPERVISOR].spawn(username, aws_login=aws_login, customer_name=customer_name)
    actor = session.actor
    sid = actor.info.session_id
    ws_url = f"{'wss' if request.secure else 'ws'}://{request.host}/ws"
    logger.info("session.created", session_id=sid, username=username, peer=request.remote)
    return _json(
        {
            "session_id": sid,
            "token": session.token,
            "ws_url": ws_url,
            "stream_url": actor.sandbox.stream_url,
            # A link to share: it shows the desktop but its input is dropped.
            "view_url": _stream_url(request.app, sid, "view"),
            "username": username,
            "state": actor.state,
        },
        status=201,
    )


async def logout(request: web.Request) -> web.Response:
    """``DELETE /api/sessions/{id}``: end the session the token belongs to."""
    actor = _session(request)
    sid = request.match_info["session_id"]
    if actor.info.session_id != sid:
        raise Forbidden(f"this token does not belong to session {sid}")
    await request.app[SUPERVISOR].stop(sid, "logout")
    return web.Response(status=204)


def seed_endpoint(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``POST /start-desktop`` and friends: forward a request of type *kind*."""

    async def handler(request: web.Request) -> web.Response:
        actor = _session(request)
        msg = codec.from_object({**(await _body(request)), "type": kind})
        assert not isinstance(msg, m.Hello)
        return _json({"request_id": actor.tell(msg)}, status=202)

    handler.__name__ = kind
    return handler


async def workflows(request: web.Request) -> web.Response:
    """``GET /api/workflows``: the server's workflows, for pickers."""
    return _json({"workflows": [describe(w) for w in request.app[WORKFLOWS].values()]})


async def status(request: web.Request) -> web.Response:
    """``GET /status``: the supervisor's snapshot, for the admin token only."""
    token = auth.bearer(request.headers.get("Authorization"))
    if not hmac.compare_digest(token.encode(), request.app[ADMIN_TOKEN].encode()):
        raise Unauthorized("wrong admin token")
    return _json(request.app[SUPERVISOR].status())


async def healthz(request: web.Request) -> web.Response:
    return _json({"ok": True, "sessions": len(request.app[SUPERVISOR])})


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html")


# ----------------------------------------------------------------------------
# The desktop stream (sandboxes streamed through this server)


def _desktop_session(request: web.Request) -> SessionActor:
    try:
        return request.app[SUPERVISOR].get(request.match_info["session_id"])
    except SessionNotFound:
        raise web.HTTPNotFound(reason="no such session") from None


async def desktop_page(request: web.Request) -> web.FileResponse:
    """``GET /desktop/{id}``: the noVNC page; the token travels in the fragment."""
    _desktop_session(request)
    return web.FileResponse(WEB_DIR / "desktop.html")


async def desktop_socket(request: web.Request) -> web.StreamResponse:
    """``GET /desktop/{id}/websockify?token=``: the authenticated VNC proxy."""
    from sandboxes.local.vncproxy import pipe

    actor = _desktop_session(request)
    mode = request.app[STREAM_TOKENS].mode(actor.info.session_id, request.query.get("token", ""))
    endpoint = getattr(actor.sandbox, "vnc_endpoint", None)
    if endpoint is None:
        raise web.HTTPConflict(reason="the desktop is not running")
    ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=HARD_FRAME_LIMIT, compress=False)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    with structlog.contextvars.bound_contextvars(session_id=actor.info.session_id, stream=mode):
        await pipe(
            ws,
            endpoint,
            view_only=mode == "view",
            password=getattr(actor.sandbox, "vnc_password", None),
            on_input=actor.touch,
        )
    return ws


# ----------------------------------------------------------------------------
# The application


def _sandbox_factory(settings: Settings) -> SandboxFactory:
    if settings.sandbox == "null":
        from sandboxes.null import NullSandbox

        return NullSandbox
    if settings.sandbox == "e2b":
        from sandboxes.e2b import e2b_factory

        return e2b_factory()
    from sandboxes.local import LocalConfig, local_factory

    root = settings.data_dir / "sandboxes"
    if os.geteuid() == 0:
        _check_enterable(root)
    limits = Limits(
        cpu_seconds=settings.command_cpu_seconds,
        memory_bytes=settings.command_memory,
        processes=settings.command_processes,
        file_bytes=settings.command_file_size,
    )
    return local_factory(LocalConfig(root=root, limits=limits, network=settings.sandbox_network))


def _check_enterable(folder: Path) -> None:
    """Fail at start-up, not at the first command, on a folder sandboxes cannot reach."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    for part in (folder.resolve(), *folder.resolve().parents):
        if not part.stat().st_mode & 0o001:
            raise NotConfigured(
                f"data folder {folder}: {part} is not enterable by other users, and sandboxed "
                "commands run as other users; choose another --data-dir or chmod o+x it"
            )


def _model(settings: Settings) -> Any:
    if not settings.model_url:
        return None
    from agent import ModelConfig

    return ModelConfig(
        url=settings.model_url,
        model=settings.model,
        api_key=settings.model_key,
        timeout=settings.model_timeout,
        max_steps=settings.agent_max_steps,
        task_timeout=settings.agent_timeout,
        retries=settings.model_retries,
        keep_images=settings.agent_images,
        image_width=settings.agent_image_width,
        image_height=settings.agent_image_height,
        image_format="png" if settings.agent_image_format == "png" else "jpeg",
        coordinate_grid=settings.agent_coordinate_grid,
    )


async def _run_supervisor(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the supervisor lives exactly as long as the app serves."""
    settings = app[SETTINGS]
    async with aiohttp.ClientSession() as http:
        config = SupervisorConfig(
            idle_timeout=settings.idle_timeout,
            sweep_interval=settings.sweep_interval,
            sessions_per_user=settings.sessions_per_user,
            data_dir=settings.data_dir,
            actor=ActorConfig(
                mailbox_size=settings.mailbox_size,
                journal_size=settings.journal_size,
                jobs=JobConfig(
                    command_timeout=settings.command_timeout,
                    output_limit=settings.output_limit,
                    model=_model(settings),
                    workflows=app[WORKFLOWS],
                    http=http,
                ),
            ),
        )
        supervisor = Supervisor(config, app[SANDBOX_FACTORY], stream_url=lambda sid: _stream_url(app, sid))
        app[SUPERVISOR] = supervisor
        task = asyncio.create_task(supervisor.run(), name="supervisor")
        await supervisor.wait_running()
        yield
        await supervisor.aclose()
        await task


def create_app(settings: Settings, *, sandbox_factory: SandboxFactory | None = None) -> web.Application:
    """The whole server; *sandbox_factory* overrides ``settings.sandbox`` (tests)."""
    app = web.Application(middlewares=[json_errors], client_max_size=codec.MAX_FRAME_BYTES)
    app[SETTINGS] = settings
    app[SOCKETS] = weakref.WeakSet()
    app[USERS] = auth.UsersFile.load(settings.users_file) if settings.users_file else None
    app[STREAM_TOKENS] = auth.StreamTokens()
    app[ADMIN_TOKEN] = settings.admin_token or secrets.token_urlsafe(24)
    app[SANDBOX_FACTORY] = sandbox_factory or _sandbox_factory(settings)
    app[WORKFLOWS] = load_workflows(settings.workflows_dir)
    app.cleanup_ctx.append(_run_supervisor)
    app.on_shutdown.append(close_sockets)
    app.add_routes(
        [
            web.get("/", index),
            web.get("/healthz", healthz),
            web.get("/status", status),
            web.get("/ws", websocket),
            web.post("/api/sessions", login),
            web.delete("/api/sessions/{session_id}", logout),
            web.get("/api/workflows", workflows),
            web.post("/start-desktop", seed_endpoint("start_desktop")),
            web.post("/setup-environment", seed_endpoint("setup_environment")),
            web.post("/run-task", seed_endpoint("run_task")),
            web.post("/kill-desktop", seed_endpoint("kill_desktop")),
            web.post("/run-workflow", seed_endpoint("run_workflow")),
            web.get("/desktop/{session_id}", desktop_page),
            web.get("/desktop/{session_id}/websockify", desktop_socket),
            web.static("/static", WEB_DIR),
        ]
    )
    if NOVNC_DIR.is_dir():
        app.router.add_static("/novnc", NOVNC_DIR)
    return app


# ----------------------------------------------------------------------------
# Logging and the command line


def configure_logging(level: str = "info", fmt: str = "auto", *, cache: bool = True) -> None:
    """structlog to stdout: JSON lines in production, readable on a terminal."""
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([] if console else [structlog.processors.dict_tracebacks]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=cache,
    )


def freeze_startup_heap() -> None:
    """Keep what start-up made (modules, the app) out of every later collection.

    With ten thousand sessions a full collection would otherwise rescan the
    whole import graph each time; sessions' own garbage is collected as usual.
    Young collections run every 20,000 allocations rather than 700: a login
    allocates some forty tracked objects, and at the default they cost a few
    percent of each login.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 10)


async def serve(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM, then shut down in order."""
    app = create_app(settings)
    freeze_startup_heap()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    _banner(app, f"http://{host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        logger.info("server.stopping")
        await runner.cleanup()
        logger.info("server.stopped")


def _banner(app: web.Application, url: str) -> None:
    settings = app[SETTINGS]
    lines = [f"deskhive listening on {url}", f"sandbox: {settings.sandbox}"]
    if app[USERS] is None:
        lines.append("WARNING: demo mode: no users file, anyone may log in with any username")
    lines.append(f"admin token: {app[ADMIN_TOKEN]}")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "hash-password":
        print(auth.hash_password(sys.stdin.readline().rstrip("\n")))
        return
    settings = from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (GatewayError, OSError, ValueError) as exc:
        # Start-up failures (no E2B key, port taken, a bad users file) are
        # the operator's to fix: say what, without a traceback.
        raise SystemExit(f"deskhive: {exc}") from None


if __name__ == "__main__":
    main()
