"""A fake of the E2B service on 127.0.0.1, for the real SDK to talk to.

The ``e2b`` SDK honours ``api_url`` and ``sandbox_url``: pointed here, its
own code makes every request a real sandbox would see. This server answers
the control-plane REST calls deskhive makes (create, connect, set_timeout,
kill, list) and envd's ``process.Process`` and ``filesystem.Filesystem``
Connect services, served by the SDK's own generated ASGI applications and
protobuf messages, plus envd's ``/health`` and ``/files``. So a changed SDK
(a renamed field, a new route) fails here as it would against E2B.

What the commands do is scripted: by default each exits 0 without output;
``on(prefix, Script(...))`` makes the commands that start with *prefix*
print, fail or hang until killed. A test can also refuse creates with 429,
hold a create's answer, make kills fail, and expire a sandbox.
"""

from __future__ import annotations

import asyncio
import itertools
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from e2b.envd.filesystem import filesystem_connect, filesystem_pb
from e2b.envd.process import process_connect, process_pb
from protobuf import Oneof

from sandboxes.base import SandboxSpec
from sandboxes.e2b import E2BConfig, E2BSandbox

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


class E2BService:
    """The fake service: start it, point the SDK at :meth:`api_params`, inspect, close."""

    def __init__(self) -> None:
        self.boxes: dict[str, FakeBox] = {}
        self.rules: list[tuple[str, Script]] = []
        #: The next this many creates are answered 429.
        self.refuse_creates = 0
        #: Idempotency-Key of every create request, refused ones included.
        self.create_keys: list[str | None] = []
        #: When set, a create makes its sandbox, then answers only once released.
        self.hold_creates = False
        self.create_held = asyncio.Event()
        self.release_creates = asyncio.Event()
        #: When set, envd cannot be reached (E2B's proxy says its port is not open).
        self.unreachable = False
        #: The next this many kills are answered 500.
        self.fail_kills = 0
        #: Set at each kill (tests clear it, then wait).
        self.killed = asyncio.Event()
        #: Set at each ``set_timeout`` (tests clear it, then wait).
        self.timeout_set = asyncio.Event()
        #: Number of requests each route got, by route name.
        self.hits: dict[str, int] = {}
        self._by_key: dict[str, FakeBox] = {}
        self._ids = itertools.count(1)
        self._pids = itertools.count(100)
        self._server: TestServer | None = None

    # ------------------------------------------------------------------
    # Set-up, knobs and inspection

    def on(self, prefix: str, script: Script) -> Script:
        """Make commands starting with *prefix* follow *script* (later rules win)."""
        self.rules.insert(0, (prefix, script))
        return script

    def expire(self, sandbox_id: str) -> None:
        """End a sandbox as E2B does at its timeout: gone for envd and the API alike."""
        box = self.boxes[sandbox_id]
        box.alive = False
        for process in box.running():
            process.killed.set()
            process.ended.set()  # gone with its sandbox, streamed or not

    def live(self) -> list[FakeBox]:
        return [b for b in self.boxes.values() if b.alive]

    def only(self) -> FakeBox:
        """The one sandbox created so far."""
        (box,) = self.boxes.values()
        return box

    def api_params(self) -> dict[str, Any]:
        """The SDK connection options that lead to this server."""
        assert self._server is not None
        url = str(self._server.make_url("")).rstrip("/")
        return {"api_url": url, "sandbox_url": url, "http_version": "1.1", "domain": "e2b.test"}

    async def start(self) -> None:
        self._server = TestServer(self._app(), host="127.0.0.1", port=0)
        await self._server.start_server()

    async def close(self) -> None:
        self.release_creates.set()
        for box in self.boxes.values():
            for process in box.processes:
                process.killed.set()
        for _, script in self.rules:
            script.release.set()
        if self._server is not None:
            await self._server.close()

    # ------------------------------------------------------------------
    # The HTTP side

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.router.add_post("/v2/sandboxes", self._create)
        app.router.add_get("/v2/sandboxes", self._list)
        app.router.add_post("/v2/sandboxes/{id}/connect", self._connect)
        app.router.add_post("/sandboxes/{id}/timeout", self._set_timeout)
        app.router.add_delete("/sandboxes/{id}", self._kill)
        app.router.add_get("/sandboxes/{id}", self._info)
        app.router.add_get("/health", self._envd(self._health))
        app.router.add_get("/files", self._envd(self._read_file))
        process_app = process_connect.ProcessASGIApplication(_ProcessService(self))
        fs_app = filesystem_connect.FilesystemASGIApplication(_FilesystemService(self))
        app.router.add_post("/process.Process/{method}", self._envd(_asgi(process_app)))
        app.router.add_post("/filesystem.Filesystem/{method}", self._envd(_asgi(fs_app)))
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        name = request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
        key = f"{request.method} {name}"
        self.hits[key] = self.hits.get(key, 0) + 1
        return await handler(request)

    def _box(self, request: web.Request) -> FakeBox | None:
        box = self.boxes.get(request.match_info["id"])
        return box if box is not None and box.alive else None

    async def _create(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        self.create_keys.append(key)
        if self.refuse_creates > 0:
            self.refuse_creates -= 1
            return _error(429, "Rate limit exceeded", headers={"Retry-After": "0"})
        box = self._by_key.get(key) if key else None
        if box is None:
            body = await request.json()
            box = FakeBox(
                sandbox_id=f"sbx{next(self._ids)}",
                template=body.get("templateID", ""),
                metadata=dict(body.get("metadata") or {}),
                timeout=int(body.get("timeout", 300)),
            )
            self.boxes[box.sandbox_id] = box
            if key:
                self._by_key[key] = box
        if self.hold_creates:
            self.create_held.set()
            async with asyncio.timeout(HANG_LIMIT):
                await self.release_creates.wait()
        return web.json_response(_sandbox_json(box), status=201)

    async def _connect(self, request: web.Request) -> web.Response:
        box = self._box(request)
        if box is None:
            return _error(404, f"sandbox {request.match_info['id']} not found")
        return web.json_response(_sandbox_json(box), status=201)

    async def _set_timeout(self, request: web.Request) -> web.Response:
        box = self._box(request)
        if box is None:
            return _error(404, f"sandbox {request.match_info['id']} not found")
        box.timeouts.append(int((await request.json())["timeout"]))
        self.timeout_set.set()
        return web.Response(status=204)

    async def _kill(self, request: web.Request) -> web.Response:
        if self.fail_kills > 0:
            self.fail_kills -= 1
            return _error(500, "internal error", headers={"Should-Retry": "false"})
        box = self._box(request)
        if box is None:
            return _error(404, f"sandbox {request.match_info['id']} not found")
        box.kills += 1
        self.expire(box.sandbox_id)
        self.killed.set()
        return web.Response(status=204)

    async def _info(self, request: web.Request) -> web.Response:
        box = self._box(request)
        if box is None:
            return _error(404, f"sandbox {request.match_info['id']} not found")
        return web.json_response(_listed_json(box))

    async def _list(self, request: web.Request) -> web.Response:
        wanted = {
            urllib.parse.unquote(k): urllib.parse.unquote(v)
            for k, v in urllib.parse.parse_qsl(request.query.get("metadata", ""))
        }
        found = [b for b in self.live() if wanted.items() <= b.metadata.items()]
        return web.json_response([_listed_json(b) for b in found])

    def _envd(self, handler: Handler) -> Handler:
        """Route an envd request to its sandbox; a gone one is answered as E2B's proxy does."""

        async def routed(request: web.Request) -> web.StreamResponse:
            sandbox_id = request.headers.get("E2b-Sandbox-Id", "")
            if self.unreachable:
                return _error(502, f"The sandbox {sandbox_id} is running but port is not open")
            box = self.boxes.get(sandbox_id)
            if box is None or not box.alive:
                return _error(502, f"The sandbox {sandbox_id} was not found")
            return await handler(request)

        return routed

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _read_file(self, request: web.Request) -> web.Response:
        box = self.boxes[request.headers["E2b-Sandbox-Id"]]
        data = box.files.get(request.query["path"])
        if data is None:
            return _error(404, f"path {request.query['path']} not found")
        return web.Response(body=data, content_type="application/octet-stream")

    # ------------------------------------------------------------------
    # What commands do

    def script_for(self, cmd: str) -> Script:
        return next((s for prefix, s in self.rules if cmd.startswith(prefix)), Script())

    def run_builtin(self, box: FakeBox, cmd: str) -> None:
        """The side effects real programs would have that tests rely on."""
        if cmd.startswith("scrot "):
            box.files[cmd.split()[-1]] = PNG


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status, headers=headers)


def _sandbox_json(box: FakeBox) -> dict[str, Any]:
    return {
        "templateID": box.template,
        "sandboxID": box.sandbox_id,
        "clientID": "fake",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": f"token-{box.sandbox_id}",
    }


def _listed_json(box: FakeBox) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        **_sandbox_json(box),
        "startedAt": now.isoformat(),
        "endAt": (now + timedelta(seconds=box.timeout)).isoformat(),
        "cpuCount": 2,
        "memoryMB": 1024,
        "diskSizeMB": 1024,
        "state": "running",
        "metadata": box.metadata,
    }


def _asgi(app: Any) -> Handler:
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


class _ProcessService:
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


class _FilesystemService:
    """envd's filesystem service, as far as deskhive uses it."""

    def __init__(self, service: E2BService) -> None:
        self._service = service

    async def remove(
        self, request: filesystem_pb.RemoveRequest, ctx: RequestContext[Any, Any]
    ) -> filesystem_pb.RemoveResponse:
        _box_of(self._service, ctx).files.pop(request.path, None)
        return filesystem_pb.RemoveResponse()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def unimplemented(*_args: Any) -> Any:
            raise ConnectError(Code.UNIMPLEMENTED, f"the fake envd has no filesystem.{name}")

        return unimplemented


# ----------------------------------------------------------------------
# Fixtures (import them into a test module to use them)


@pytest.fixture
async def e2b_service() -> AsyncIterator[E2BService]:
    """The fake E2B service, running on 127.0.0.1 for the test."""
    service = E2BService()
    await service.start()
    yield service
    await service.close()


def make_config(service: E2BService, **overrides: Any) -> E2BConfig:
    """A backend config pointed at *service*, with bounds short enough for tests."""
    options: dict[str, Any] = {
        "api_key": "e2b_test",
        "call_timeout": 5.0,
        "create_timeout": 10.0,
        "instance_id": "test-instance",
        "connection": service.api_params(),
    }
    return E2BConfig(**{**options, **overrides})


SPEC = SandboxSpec(session_id="ada_1700000000_0123456789abcdef", username="ada", data_dir=Path())


def spec(name: str) -> SandboxSpec:
    """A session spec for user *name*."""
    return SandboxSpec(
        session_id=f"{name}_1700000000_{abs(hash(name)):016x}"[:40], username=name, data_dir=Path()
    )


@pytest.fixture
async def sandbox(e2b_service: E2BService) -> AsyncIterator[E2BSandbox]:
    """One session's E2B backend against the fake service; closed after the test."""
    box = E2BSandbox(SPEC, make_config(e2b_service))
    yield box
    await box.close()
