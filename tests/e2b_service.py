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
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from e2b.envd.filesystem import filesystem_connect
from e2b.envd.process import process_connect

from sandboxes.base import SandboxSpec
from sandboxes.e2b import E2BConfig, E2BSandbox
from tests.e2b_envd import (
    ENVD_VERSION,
    HANG_LIMIT,
    PNG,
    FakeBox,
    FilesystemService,
    Handler,
    ProcessService,
    Script,
    asgi,
)


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
        app.router.add_post("/files", self._envd(self._write_file))
        process_app = process_connect.ProcessASGIApplication(ProcessService(self))
        fs_app = filesystem_connect.FilesystemASGIApplication(FilesystemService(self))
        app.router.add_post("/process.Process/{method}", self._envd(asgi(process_app)))
        app.router.add_post("/filesystem.Filesystem/{method}", self._envd(asgi(fs_app)))
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

    async def _write_file(self, request: web.Request) -> web.Response:
        box = self.boxes[request.headers["E2b-Sandbox-Id"]]
        path = request.query["path"]
        box.files[path] = await request.read()
        return web.json_response([{"name": path.rsplit("/", 1)[-1], "type": "file", "path": path}])

    # ------------------------------------------------------------------
    # What commands do

    def script_for(self, cmd: str) -> Script:
        return next((s for prefix, s in self.rules if cmd.startswith(prefix)), Script())

    def run_builtin(self, box: FakeBox, cmd: str) -> None:
        """The side effects real programs would have that tests rely on."""
        if cmd.startswith("scrot "):
            box.files[cmd.split()[-1]] = PNG


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
