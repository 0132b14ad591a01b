"""Fixtures: a real deskhive server on 127.0.0.1:0 and real WebSocket clients."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestServer

import cli
import server
from client import Client
from config import Settings
from sandboxes.base import SandboxFactory, SandboxSpec
from tests.fakes import FakeSandbox
from tests.fakes_agent import ModelServer

if TYPE_CHECKING:
    from sandboxes.local import LocalSandbox

#: `make test-dev`'s guard against callbacks that block the event loop.
pytest_plugins = ("tests.slow_callbacks",)


@pytest.fixture(autouse=True)
def _logging() -> None:
    cli.configure_logging("debug", "json", cache=False)
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def fakes() -> list[FakeSandbox]:
    FakeSandbox.instances = []
    return FakeSandbox.instances


StartServer = Callable[..., Awaitable[tuple[TestServer, Client]]]


@pytest.fixture
async def start_server(tmp_path: Path, fakes: list[FakeSandbox]) -> AsyncIterator[StartServer]:
    """Start a server with the given settings (FakeSandbox unless told otherwise)."""
    started: list[tuple[TestServer, Client]] = []

    async def start(
        sandbox_factory: SandboxFactory | None = FakeSandbox, **options: Any
    ) -> tuple[TestServer, Client]:
        options.setdefault("sandbox", "null")
        options.setdefault("data_dir", tmp_path / "var")
        options.setdefault("admin_token", "admin-secret")
        app = server.create_app(Settings(**options), sandbox_factory=sandbox_factory)
        test_server = TestServer(app, host="127.0.0.1", port=0)
        await test_server.start_server()
        client = Client(str(test_server.make_url("")))
        await client.__aenter__()
        started.append((test_server, client))
        return test_server, client

    yield start
    for test_server, client in reversed(started):
        await client.__aexit__(None, None, None)
        await test_server.close()
    leftover = [t for t in asyncio.all_tasks() if t.get_name().startswith(("session:", "job:", "jobs:"))]
    assert not leftover, f"tasks outlived the server: {leftover}"


@pytest.fixture
async def served(start_server: StartServer) -> tuple[TestServer, Client]:
    """A server with the fake sandbox and default settings."""
    return await start_server()


# ----------------------------------------------------------------------------
# Local sandboxes, made directly (no server)


@pytest.fixture
def root() -> Iterator[Path]:
    """A sandbox root every uid can traverse (pytest's own tmp folders are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="deskhive-test-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


MakeLocal = Callable[..., "LocalSandbox"]


async def serve_local(
    start_server: StartServer, root: Path, **options: Any
) -> tuple[TestServer, Client, list[LocalSandbox]]:
    """A server on local sandboxes under *root*, and the list of the sandboxes it makes."""
    from sandboxes.local import LocalConfig, LocalSandbox

    made: list[LocalSandbox] = []
    config = LocalConfig(root=root / "sandboxes")

    def factory(spec: SandboxSpec) -> LocalSandbox:
        made.append(LocalSandbox(spec, config))
        return made[-1]

    test_server, client = await start_server(sandbox_factory=factory, **options)
    return test_server, client, made


@pytest.fixture
async def make(root: Path) -> AsyncIterator[MakeLocal]:
    """Make local sandboxes under *root* (config fields as keywords); all closed after the test."""
    from sandboxes.local import LocalConfig, LocalSandbox

    made: list[LocalSandbox] = []

    def factory(name: str, **config: Any) -> LocalSandbox:
        spec = SandboxSpec(session_id=f"{name}_1700000000_{len(made):016x}", username=name, data_dir=root)
        sandbox = LocalSandbox(spec, LocalConfig(root=root / "sandboxes", **config))
        made.append(sandbox)
        return sandbox

    yield factory
    async with asyncio.timeout(20):
        for sandbox in made:
            await sandbox.close()


@pytest.fixture
async def endpoint() -> AsyncIterator[ModelServer]:
    """A scripted model endpoint (OpenAI-compatible) on 127.0.0.1; it must have seen no malformed request."""
    server = ModelServer()
    await server.start()
    yield server
    await server.close()
    assert not server.problems, server.problems


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for the agent's model requests."""
    async with aiohttp.ClientSession() as session:
        yield session
