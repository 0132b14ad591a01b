"""A desktop that dies by itself is reported (`desktop.lost`), its job fails, and the session goes on."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from client import Client, Connection
from sandboxes.base import SandboxSpec
from sandboxes.e2b import E2BSandbox
from sandboxes.e2b_sdk import SandboxLost
from tests.conftest import StartServer, serve_local
from tests.e2b_service import E2BService, e2b_service, make_config
from tests.fakes import FakeSandbox

__all__ = ["e2b_service"]  # fixture

Event = dict[str, Any]


async def until_idle_after(conn: Connection, rid: str, timeout: float = 10.0) -> list[Event]:
    """Every frame up to the first ``idle`` state after *rid*'s result."""
    frames: list[Event] = []
    answered = False
    async with asyncio.timeout(timeout):
        while True:
            event = await conn.recv(timeout)
            frames.append(event)
            answered = answered or (event["type"] == "result" and event.get("id") == rid)
            if answered and event["type"] == "state" and event["state"] == "idle":
                return frames


def lost_events(frames: list[Event]) -> list[Event]:
    return [e for e in frames if e["type"] == "log" and e.get("event") == "desktop.lost"]


def result_of(frames: list[Event], rid: str) -> Event:
    return next(e for e in frames if e["type"] == "result" and e.get("id") == rid)


async def test_a_dying_desktop_fails_its_screenshot_and_the_next_start_makes_a_new_one(
    served: tuple[TestServer, Client], fakes: list[FakeSandbox]
) -> None:
    """A screenshot under way when the desktop dies ends sandbox_failed; desktop.lost says why, state idle."""
    _, client = served
    login = await client.login("lost")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("start_desktop")))["ok"]
        fake = fakes[0]
        fake.hold = {"screenshot"}
        rid = await conn.send("screenshot")
        async with asyncio.timeout(5):
            await fake.call_started.wait()
        fake.lose_desktop("Xvfb exited with code 1")
        frames = await until_idle_after(conn, rid)
        result = result_of(frames, rid)
        assert result["ok"] is False
        assert result["error"]["code"] == "sandbox_failed"
        assert "Xvfb exited with code 1" in result["error"]["message"]
        [lost] = lost_events(frames)
        assert lost["reason"] == "Xvfb exited with code 1"
        fake.hold = set()
        again = await conn.result(await conn.send("start_desktop"))
        assert again["ok"] and again["data"]["stream_url"]
        got = await conn.send("get_state")
        state = await conn.wait_for(lambda e: e["type"] == "state" and e.get("id") == got)
        assert state["state"] == "ready"
    assert [c[0] for c in fake.calls].count("start_desktop") == 2


async def test_a_command_goes_on_when_the_desktop_dies(
    served: tuple[TestServer, Client], fakes: list[FakeSandbox]
) -> None:
    """A running command does not need the desktop: it is not cut off, and desktop.lost is still said."""
    _, client = served
    login = await client.login("lost")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("start_desktop")))["ok"]
        fake = fakes[0]
        fake.hold_commands = True
        rid = await conn.send("run_command", cmd="sleep")
        async with asyncio.timeout(5):
            await fake.command_started.wait()
        fake.lose_desktop("x11vnc exited with code 3")
        lost = await conn.wait_for(lambda e: e.get("event") == "desktop.lost")
        assert lost["reason"] == "x11vnc exited with code 3"
        got = await conn.send("get_state")
        state = await conn.wait_for(lambda e: e["type"] == "state" and e.get("id") == got)
        assert state["running_id"] == rid and state["stream_url"] is None
        assert not fake.released.is_set()
        cancel = await conn.send("cancel", target=rid)
        results = await conn.results(rid, cancel)
        assert results[rid]["error"]["code"] == "cancelled"
        assert results[cancel]["ok"]


async def test_a_desktop_dying_after_a_crash_of_the_actor_is_still_noticed(
    served: tuple[TestServer, Client], fakes: list[FakeSandbox]
) -> None:
    """The restarted incarnation watches the desktop that outlived the crash, and reports its death."""
    _, client = served
    login = await client.login("lost")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("start_desktop")))["ok"]
        fakes[0].break_stream_url = True
        await conn.send("get_state", id="boom")
        await conn.wait_for(lambda e: e.get("event") == "session.restarted")
        pong = await conn.send("ping")
        await conn.wait_for(lambda e: e["type"] == "pong" and e["id"] == pong)
        fakes[0].lose_desktop("Xvfb exited with code 1")
        lost = await conn.wait_for(lambda e: e.get("event") == "desktop.lost")
        assert lost["reason"] == "Xvfb exited with code 1"
        state = await conn.wait_for(lambda e: e["type"] == "state")
        assert state["state"] == "idle"


async def test_a_workflow_with_a_desktop_step_fails_when_the_desktop_dies(
    start_server: StartServer, fakes: list[FakeSandbox], tmp_path: Path
) -> None:
    """A workflow that started the desktop ends sandbox_failed when it dies, even in a command step."""
    folder = tmp_path / "workflows"
    folder.mkdir()
    steps = '[[steps]]\nkind = "desktop"\n\n[[steps]]\nkind = "command"\ncmd = "sleep"\n'
    (folder / "work.toml").write_text(f'description = "desktop, then a command"\n\n{steps}')
    _, client = await start_server(workflows_dir=folder)
    login = await client.login("lost")
    async with client.connect(login) as conn:
        FakeSandbox.instances[0].hold_commands = True
        rid = await conn.send("run_workflow", workflow="work")
        fake = fakes[0]
        async with asyncio.timeout(5):
            await fake.command_started.wait()
        fake.lose_desktop("openbox exited with code 2")
        frames = await until_idle_after(conn, rid)
    result = result_of(frames, rid)
    assert result["ok"] is False and result["error"]["code"] == "sandbox_failed"
    assert len(lost_events(frames)) == 1
    assert fake.released.is_set()


async def test_an_expired_e2b_sandbox_is_reported_lost_once(
    start_server: StartServer, e2b_service: E2BService
) -> None:
    """An expired E2B sandbox: its call is sandbox_failed, desktop.lost comes once, a new one starts."""
    config = make_config(e2b_service)
    _, client = await start_server(sandbox_factory=lambda spec: E2BSandbox(spec, config))
    login = await client.login("lost")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("start_desktop"), timeout=20))["ok"]
        first = e2b_service.only().sandbox_id
        e2b_service.expire(first)
        rid = await conn.send("screenshot")
        frames = await until_idle_after(conn, rid, timeout=20)
        assert result_of(frames, rid)["error"]["code"] == "sandbox_failed"
        later = await conn.send("run_command", cmd="true")
        frames += [await conn.result(later, timeout=20)]
        got = await conn.send("get_state")
        frames += [await conn.wait_for(lambda e: e["type"] == "state" and e.get("id") == got)]
        assert frames[-1]["state"] == "idle"
        [lost] = lost_events(frames)
        assert first in lost["reason"] and "gone" in lost["reason"]
        again = await conn.result(await conn.send("start_desktop"), timeout=20)
        assert again["ok"], again
    assert first not in {b.sandbox_id for b in e2b_service.live()}


async def test_an_e2b_sandbox_found_gone_outside_any_job_is_reported_at_once(
    start_server: StartServer, e2b_service: E2BService
) -> None:
    """A keep-alive that finds the sandbox expired: desktop.lost and idle come without any request."""
    # A short first lifetime, so that the keep-alive below must ask E2B.
    config = make_config(e2b_service, sandbox_timeout=60)
    made: list[E2BSandbox] = []

    def factory(spec: SandboxSpec) -> E2BSandbox:
        made.append(E2BSandbox(spec, config))
        return made[-1]

    _, client = await start_server(sandbox_factory=factory)
    login = await client.login("lost")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("start_desktop"), timeout=20))["ok"]
        first = e2b_service.only().sandbox_id
        e2b_service.expire(first)
        with pytest.raises(SandboxLost):
            await made[0].keep_alive(config.max_sandbox_timeout)
        lost = await conn.wait_for(lambda e: e.get("event") == "desktop.lost")
        assert first in lost["reason"]
        state = await conn.wait_for(lambda e: e["type"] == "state")
        assert state["state"] == "idle" and state["stream_url"] is None


def _descendant(pid: int, name: str) -> int | None:
    """The host pid of a process named *name* under *pid* (through the jail's namespaces)."""
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/comm") as f:
                if f.read().strip() == name:
                    return current
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue  # gone meanwhile
    return None


@pytest.mark.local
@pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox drops to session uids as root")
async def test_a_killed_xvfb_is_noticed_at_once_and_the_desktop_comes_back(
    start_server: StartServer, root: Path
) -> None:
    """SIGKILL of Xvfb from the host: desktop.lost names it and its code, the rest stops, a new one starts."""
    _, client, made = await serve_local(start_server, root)
    login = await client.login("lost")
    async with client.connect(login) as conn:
        started = await conn.result(await conn.send("start_desktop"), timeout=30)
        if not started["ok"]:
            pytest.skip(f"no local desktop on this machine: {started['error']}")
        programs = made[0].desktop_programs()
        xvfb = await asyncio.to_thread(_descendant, programs["Xvfb"], "Xvfb")
        assert xvfb is not None
        os.kill(xvfb, signal.SIGKILL)
        lost = await conn.wait_for(lambda e: e.get("event") == "desktop.lost", timeout=5)
        assert lost["reason"].startswith("Xvfb exited with code")
        got = await conn.send("get_state")
        state = await conn.wait_for(lambda e: e["type"] == "state" and e.get("id") == got)
        assert state["state"] == "idle" and state["stream_url"] is None
        for pid in programs.values():
            assert not await asyncio.to_thread(os.path.exists, f"/proc/{pid}/comm") or _zombie(pid)
        again = await conn.result(await conn.send("start_desktop"), timeout=30)
        assert again["ok"], again
        shot = await conn.result(await conn.send("screenshot"), timeout=30)
        assert shot["ok"], shot


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True
