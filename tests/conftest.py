"""Fixtures: a real deskhive server on 127.0.0.1:0 and real WebSocket clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestServer

import server
from client import Client
from config import Settings
from sandboxes.base import SandboxFactory
from tests.fakes import FakeSandbox


@pytest.fixture(autouse=True)
def _logging() -> None:
    server.configure_logging("debug", "json", cache=False)
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
