"""The command line: ``deskhive serve`` and ``deskhive hash-password``.

Where things go: log lines (JSON, or readable on a terminal) go to stdout,
the start-up banner goes to stderr. The banner is the only place a generated
admin token is ever written, so a log collector reading stdout never holds it;
a configured admin token is never printed at all.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from typing import Any, TextIO

import structlog
from aiohttp import web

import auth
import httpguard
import store
from config import Settings, from_args, parser
from protocol.errors import GatewayError
from server import ADMIN_TOKEN, SETTINGS, USERS, create_app

logger = structlog.get_logger("deskhive.cli")


def configure_logging(level: str = "info", fmt: str = "auto", *, cache: bool = True) -> None:
    """structlog to stdout: JSON lines in production, readable on a terminal.

    Tracebacks never carry frame locals: a frame of the model client holds
    its request headers, the model key among them.
    """
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if console
        else structlog.processors.JSONRenderer()
    )
    tracebacks = structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([] if console else [tracebacks]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_LineLoggerFactory(sys.stdout),
        cache_logger_on_first_use=cache,
    )


class _LineLogger:
    """Writes each rendered line to *file*; a line that cannot be written is dropped.

    A closed or broken stdout (the pipe to a log collector gone) must not
    raise into whatever logged: a crash report that crashes would take the
    supervisor down with it.
    """

    __slots__ = ("_file",)

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def msg(self, message: str) -> None:
        try:
            self._file.write(message + "\n")
            self._file.flush()
        except (OSError, ValueError):  # closed, broken, or text it cannot encode
            pass

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = msg


class _LineLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _LineLogger:
        return _LineLogger(self._file)


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
    """Serve until SIGINT or SIGTERM, then shut down in order.

    The data folder is held for as long as the server runs: a second server
    on the same folder would share its store and its sandboxes' homes.
    """
    with store.lock_data_dir(settings.data_dir):
        await _serve(settings)


async def _serve(settings: Settings) -> None:
    app = create_app(settings)
    freeze_startup_heap()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0, handle_signals=False)
    await runner.setup()
    guard = httpguard.ConnectionGuard(httpguard.connection_limit(settings.max_connections))
    listener = await guard.listen(runner, settings.host, settings.port)
    host, port = listener.sockets[0].getsockname()[:2]
    _banner(app, f"http://{host}:{port}", sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        logger.info("server.stopping")
        # Stop accepting first, then let the runner close sockets and sessions.
        listener.close()
        await runner.cleanup()
        async with asyncio.timeout(5):
            await listener.wait_closed()
        logger.info("server.stopped")


def _banner(app: web.Application, url: str, out: TextIO) -> None:
    settings = app[SETTINGS]
    lines = [f"deskhive listening on {url}", f"sandbox: {settings.sandbox}"]
    if app[USERS] is None:
        lines.append("WARNING: demo mode: no users file, anyone may log in with any username")
    for option in settings.secrets_on_command_line:
        lines.append(
            f"WARNING: --{option} on the command line is visible to every local user (ps); "
            f"use DESKHIVE_{option.upper().replace('-', '_')} or --{option}-file"
        )
    # The last line, which scripts wait for.
    if settings.admin_token is None:
        lines.append(f"admin token: {app[ADMIN_TOKEN]}")
    else:
        lines.append("admin token: as configured")
    print("\n".join(lines), file=out, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "hash-password":
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            # A login needs a password: a hash of none could never be used.
            raise SystemExit("deskhive: hash-password: the password read on stdin is empty")
        print(auth.hash_password(password))
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
