"""The envd side of the fake E2B service: what runs inside a fake sandbox.

envd's ``process.Process`` and ``filesystem.Filesystem`` Connect services are
served by the SDK's own generated ASGI applications, bridged onto aiohttp,
with the SDK's protobuf messages: the real client code reads real frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
from aiohttp import web
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from e2b.envd.filesystem import filesystem_pb
from e2b.envd.process import process_pb
from protobuf import Oneof

if TYPE_CHECKING:
    from tests.e2b_service import E2BService

#: The longest a scripted hang lasts, so a failing test cannot hang the suite.
HANG_LIMIT = 20.0
#: A PNG header: enough for a screenshot's caller to recognise.
PNG = b"\x89PNG\r\n\x1a\nfake-screenshot"
ENVD_VERSION = "0.6.4"


@attrs.define
class Script:
    """What a command does: print *output*, maybe hang until killed, exit with *exit_code*."""

    output: list[tuple[str, str]] = attrs.Factory(list)
    exit_code: int = 0
    hang: bool = False
    #: Set by the test to end a hanging command normally.
    release: asyncio.Event = attrs.Factory(asyncio.Event)
    #: Set when a command following this script has started.
    started: asyncio.Event = attrs.Factory(asyncio.Event)


@attrs.define(eq=False)
class FakeProcess:
    """One command started in a fake sandbox."""

    pid: int
    cmd: str
    user: str | None
    envs: dict[str, str]
    killed: asyncio.Event = attrs.Factory(asyncio.Event)
    ended: asyncio.Event = attrs.Factory(asyncio.Event)


@attrs.define(eq=False)
class FakeBox:
    """One fake sandbox and everything done to it."""

    sandbox_id: str
    template: str
    metadata: dict[str, str]
    timeout: int
    alive: bool = True
    kills: int = 0
    timeouts: list[int] = attrs.Factory(list)
    processes: list[FakeProcess] = attrs.Factory(list)
    files: dict[str, bytes] = attrs.Factory(dict)

    def commands(self) -> list[str]:
        """The text of every command run in this sandbox, in order."""
        return [p.cmd for p in self.processes]

    def running(self) -> list[FakeProcess]:
        return [p for p in self.processes if not p.ended.is_set()]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def asgi(app: Any) -> Handler:
    """Serve an ASGI application (the SDK's generated Connect services) from aiohttp."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        done = asyncio.Event()
        delivered = False
        response: web.StreamResponse | None = None

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal response
            if message["type"] == "http.response.start":
                headers = [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
                response = web.StreamResponse(status=message["status"], headers=headers)
                await response.prepare(request)
            elif message["type"] == "http.response.body" and response is not None and not done.is_set():
                try:
                    await response.write(message.get("body", b""))
                    if not message.get("more_body", False):
                        await response.write_eof()
                except ConnectionResetError:
                    pass  # the client left the stream (a disconnect, a cancelled call)
                if not message.get("more_body", False) or request.transport is None:
                    done.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": "http",
            "path": request.path,
            "raw_path": request.path.encode(),
            "query_string": request.query_string.encode(),
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
            "server": ("127.0.0.1", 0),
            "client": ("127.0.0.1", 0),
        }
        try:
            await app(scope, receive, send)
        finally:
            done.set()
        assert response is not None
        return response

    return handler


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of *events* is set (at most ``HANG_LIMIT``)."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=HANG_LIMIT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _box_of(service: E2BService, ctx: RequestContext[Any, Any]) -> FakeBox:
    return service.boxes[ctx.request_headers["e2b-sandbox-id"]]


def _event(**kind: Any) -> process_pb.ProcessEvent:
    ((field, value),) = kind.items()
    return process_pb.ProcessEvent(event=Oneof(field, value))


class ProcessService:
    """envd's process service: commands follow the service's scripts."""

    def __init__(self, service: E2BService) -> None:
        self._service = service

    async def start(
        self, request: process_pb.StartRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[process_pb.StartResponse]:
        box = _box_of(self._service, ctx)
        config = request.process or process_pb.ProcessConfig()
        cmd = config.args[-1] if config.args else config.cmd
        process = FakeProcess(
            pid=next(self._service._pids),
            cmd=cmd,
            user=ctx.request_headers.get("authorization"),
            envs=dict(config.envs),
        )
        box.processes.append(process)
        self._service.run_builtin(box, cmd)
        script = self._service.script_for(cmd)
        try:
            yield process_pb.StartResponse(
                event=_event(start=process_pb.ProcessEvent.StartEvent(pid=process.pid))
            )
            for stream, text in script.output:
                data = process_pb.ProcessEvent.DataEvent(output=Oneof(stream, text.encode()))
                yield process_pb.StartResponse(event=_event(data=data))
            script.started.set()
            if script.hang:
                await _first(process.killed, script.release)
            if not box.alive:
                raise ConnectError(Code.UNAVAILABLE, f"The sandbox {box.sandbox_id} was not found")
            killed = process.killed.is_set()
            end = process_pb.ProcessEvent.EndEvent(
                exit_code=-1 if killed else script.exit_code,
                exited=not killed,
                status="signal: killed" if killed else f"exit status {script.exit_code}",
            )
            yield process_pb.StartResponse(event=_event(end=end))
        finally:
            # As with envd, a client that leaves the stream does not end the
            # process: a hanging one runs on until killed or released.
            if not script.hang or process.killed.is_set() or script.release.is_set():
                process.ended.set()

    async def send_signal(
        self, request: process_pb.SendSignalRequest, ctx: RequestContext[Any, Any]
    ) -> process_pb.SendSignalResponse:
        box = _box_of(self._service, ctx)
        selector = request.process.selector if request.process else None
        pid = selector.value if selector is not None else None
        process = next((p for p in box.running() if p.pid == pid), None)
        if process is None:
            raise ConnectError(Code.NOT_FOUND, f"process {pid} not found")
        process.killed.set()
        process.ended.set()
        return process_pb.SendSignalResponse()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def unimplemented(*_args: Any) -> Any:
            raise ConnectError(Code.UNIMPLEMENTED, f"the fake envd has no process.{name}")

        return unimplemented


class FilesystemService:
    """envd's filesystem service, as far as deskhive uses it."""

    def __init__(self, service: E2BService) -> None:
        self._service = service

    async def remove(
        self, request: filesystem_pb.RemoveRequest, ctx: RequestContext[Any, Any]
    ) -> filesystem_pb.RemoveResponse:
        _box_of(self._service, ctx).files.pop(request.path, None)
        return filesystem_pb.RemoveResponse()

    async def list_dir(
        self, request: filesystem_pb.ListDirRequest, ctx: RequestContext[Any, Any]
    ) -> filesystem_pb.ListDirResponse:
        """The folder's entries; a folder exists while a file is under it (the home always)."""
        prefix = request.path.rstrip("/") + "/"
        found: dict[str, tuple[bool, int]] = {}
        for path, data in _box_of(self._service, ctx).files.items():
            if path.startswith(prefix):
                head, sep, _ = path[len(prefix) :].partition("/")
                found[head] = (bool(sep), len(data))
        if not found and request.path != "/home/user":
            raise ConnectError(Code.NOT_FOUND, f"path {request.path} not found")
        kinds = filesystem_pb.FileType
        entries = [
            filesystem_pb.EntryInfo(
                name=name, type=kinds.DIRECTORY if folder else kinds.FILE, path=prefix + name, size=size
            )
            for name, (folder, size) in found.items()
        ]
        return filesystem_pb.ListDirResponse(entries=entries)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def unimplemented(*_args: Any) -> Any:
            raise ConnectError(Code.UNIMPLEMENTED, f"the fake envd has no filesystem.{name}")

        return unimplemented
