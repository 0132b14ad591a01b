"""An E2B sandbox lives as long as its session: kept alive while it is used, kept across a restart."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import TestServer

import server
from client import Client, Connection, Login
from config import Settings
from sandboxes.e2b import e2b_factory
from sandboxes.e2b_input import PROBE_COMMAND, idle_from, watcher_source
from supervisor import Supervisor
from tests.e2b_envd import Script
from tests.e2b_service import E2BService, e2b_service, make_config

__all__ = ["e2b_service"]  # fixtures

Event = dict[str, Any]


@attrs.define
class Servers:
    """Servers started one after another on one data folder and store, all on the fake E2B service."""

    tmp_path: Path
    service: E2BService
    running: list[tuple[TestServer, Client]] = attrs.Factory(list)

    async def start(self, *, sandbox_timeout: int = 600, **options: Any) -> Client:
        options.setdefault("data_dir", self.tmp_path / "var")
        options.setdefault("store", f"sqlite://{self.tmp_path / 'deskhive.db'}")
        factory = e2b_factory(make_config(self.service, sandbox_timeout=sandbox_timeout))
        app = server.create_app(Settings(sandbox="e2b", **options), sandbox_factory=factory)
        test_server = TestServer(app, host="127.0.0.1", port=0)
        await test_server.start_server()
        client = Client(str(test_server.make_url("")))
        await client.__aenter__()
        self.running.append((test_server, client))
        return client

    async def stop(self) -> None:
        """A clean shutdown, as at SIGTERM."""
        test_server, client = self.running.pop()
        await client.__aexit__(None, None, None)
        await test_server.close()

    def supervisor(self) -> Supervisor:
        return self.running[-1][0].app[server.SUPERVISOR]


@pytest.fixture
async def servers(tmp_path: Path, e2b_service: E2BService) -> AsyncIterator[Servers]:
    started = Servers(tmp_path, e2b_service)
    yield started
    while started.running:
        await started.stop()


def at(client: Client, login: Login) -> Login:
    """*login* as seen through the server *client* talks to (a restarted one listens elsewhere)."""
    return attrs.evolve(login, ws_url=client.base_url.replace("http", "ws", 1) + "/ws")


async def frames_until(conn: Connection, match: Callable[[Event], bool]) -> list[Event]:
    """Every frame up to and including the first that *match* accepts."""
    frames: list[Event] = []
    while not frames or not match(frames[-1]):
        frames.append(await conn._next_frame(10))
    return frames


async def started(script: Script, times: int) -> None:
    """Return once *times* more commands following *script* have started."""
    for _ in range(times):
        script.started.clear()
        async with asyncio.timeout(10):
            await script.started.wait()


def reading(idle: float) -> Script:
    """The input watcher's answer: the desktop's last input was *idle* seconds ago."""
    return Script(output=[("stdout", f"1000.0 {1000.0 - idle}\n")])


async def test_a_clean_restart_keeps_the_sandbox_and_reattaches_it(
    servers: Servers, e2b_service: E2BService
) -> None:
    """After a SIGTERM-style restart the desktop runs again in the same sandbox, which was never killed."""
    client = await servers.start()
    login = await client.login("ada")
    async with client.connect(login) as conn:
        first_url = (await conn.result(await conn.send("start_desktop")))["data"]["stream_url"]
        seen = conn.last_seq
    box = e2b_service.only()
    await servers.stop()
    assert box.alive and box.kills == 0
    assert box.timeouts[-1] == 600  # E2B ends it at the idle timeout if no server takes it back

    client = await servers.start()
    async with client.connect(at(client, login), last_seq=seen) as conn:
        # The desktop comes back on a new stream (a new password), never reported lost.
        frames = await frames_until(conn, lambda f: f.get("type") == "state" and f["stream_url"] != first_url)
        assert not [f for f in frames if f.get("event") == "desktop.lost"]
        assert frames[-1]["state"] == "ready" and frames[-1]["stream_url"] is not None
        assert (await conn.result(await conn.send("run_command", cmd="echo still-here")))["ok"]
    assert e2b_service.boxes == {box.sandbox_id: box}  # the orphan sweep left it alone
    assert box.alive and box.kills == 0
    assert "echo still-here" in box.commands()


async def test_a_sandbox_that_expired_while_down_is_reported_lost(
    servers: Servers, e2b_service: E2BService
) -> None:
    """A stored sandbox E2B no longer runs is reported desktop.lost, idle; the next start makes a new one."""
    client = await servers.start()
    login = await client.login("bob")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("start_desktop")))["ok"]
        seen = conn.last_seq
    await servers.stop()
    old = e2b_service.only()
    e2b_service.expire(old.sandbox_id)

    client = await servers.start()
    async with client.connect(at(client, login), last_seq=seen) as conn:
        lost = await conn.wait_for(lambda e: e.get("event") == "desktop.lost")
        assert "restarted" in lost["reason"] and lost["sandbox_id"] == old.sandbox_id
        assert (await conn.wait_for(lambda e: e["type"] == "state"))["state"] == "idle"
        assert (await conn.result(await conn.send("start_desktop")))["ok"]
    assert [b.sandbox_id for b in e2b_service.live()] != [old.sandbox_id]
    assert len(e2b_service.live()) == 1


async def test_each_sweep_keeps_e2b_past_the_idle_deadline_without_a_call_each_time(
    servers: Servers, e2b_service: E2BService
) -> None:
    """The sweep holds an active session's sandbox past its idle deadline, once, not at every sweep."""
    probe = e2b_service.on(PROBE_COMMAND, Script())
    client = await servers.start(sandbox_timeout=60, idle_timeout=3000, sweep_interval=0.1)
    login = await client.login("cy")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("start_desktop")))["ok"]
        box = e2b_service.only()  # created for 60 s and its slack only
        await started(probe, 6)  # six sweeps came by
        (timeout,) = box.timeouts
        assert timeout >= 3000


async def test_input_in_e2b_s_own_stream_keeps_the_session_from_being_reaped(
    servers: Servers, e2b_service: E2BService
) -> None:
    """A user working only in E2B's noVNC is active: the session lives on, and is reaped once input stops."""
    probe = e2b_service.on(PROBE_COMMAND, reading(idle=0.01))
    client = await servers.start(idle_timeout=1.0, sweep_interval=0.1)
    login = await client.login("dee")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("start_desktop")))["ok"]
        await started(probe, 25)  # well past the idle timeout without a frame from us
        assert servers.supervisor().get(login.session_id).sandbox.desktop_running
        probe.output[:] = reading(idle=600.0).output
        ended = await conn.wait_for(lambda e: e.get("event") == "session.ended")
        assert ended["reason"] == "idle"
    assert e2b_service.only().kills == 1


@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("Xvfb", "xdotool", "xdpyinfo", "python3")),
    reason="needs Xvfb, xdotool, xdpyinfo and python3",
)
async def test_the_input_watcher_sees_input_and_not_a_new_x_client(tmp_path: Path) -> None:
    """The watcher's reading moves on pointer input (as x11vnc gives), not when a new X client connects."""
    xvfb = await asyncio.create_subprocess_exec(
        "Xvfb", "-displayfd", "1", "-screen", "0", "640x480x24", "-nolisten", "tcp",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    watcher: asyncio.subprocess.Process | None = None
    try:
        assert xvfb.stdout is not None
        async with asyncio.timeout(10):
            env = {**os.environ, "DISPLAY": f":{(await xvfb.stdout.readline()).decode().strip()}"}
        path = tmp_path / "last-input"
        source = watcher_source(str(path), every=0.05)
        watcher = await asyncio.create_subprocess_exec(
            "python3", "-c", source, env=env, stdout=asyncio.subprocess.PIPE
        )
        assert watcher.stdout is not None
        readings = watcher.stdout

        async def reading() -> float:
            async with asyncio.timeout(10):
                return float(await readings.readline())

        first = await reading()
        client = await asyncio.create_subprocess_exec("xdpyinfo", env=env, stdout=asyncio.subprocess.DEVNULL)
        async with asyncio.timeout(10):
            await client.wait()
        for _ in range(3):  # readings taken after the new client came and went
            assert abs(await reading() - first) < 0.05
        pointer = await asyncio.create_subprocess_exec("xdotool", "mousemove", "5", "5", env=env)
        async with asyncio.timeout(10):
            await pointer.wait()
            while (last := await reading()) < first + 0.05:
                pass
        assert idle_from(f"{time.time()} {path.read_text()}") == pytest.approx(time.time() - last, abs=0.5)
    finally:
        for process in (watcher, xvfb):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
