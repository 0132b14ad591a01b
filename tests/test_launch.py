"""``launch``: a program on the desktop, answered as soon as it runs, ended with the desktop."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from client import Client
from tests.conftest import StartServer, serve_local
from tests.fakes import FakeSandbox


async def test_launch_without_a_desktop_says_to_start_it(
    served: tuple[TestServer, Client], fakes: list[FakeSandbox]
) -> None:
    """With no desktop running, launch ends ok:false with bad_message naming start_desktop."""
    _, client = served
    login = await client.login("launcher")
    async with client.connect(login) as conn:
        result = await conn.result(await conn.send("launch", app="terminal"))
    assert result["ok"] is False
    assert result["error"]["code"] == "bad_message"
    assert "start_desktop" in result["error"]["message"]
    assert not [c for c in fakes[0].calls if c[0] in ("launch", "open")]


async def test_launch_terminal_and_a_url_in_the_browser(
    served: tuple[TestServer, Client], fakes: list[FakeSandbox]
) -> None:
    """On a desktop, terminal is launched, a url opens in the browser, a url for another app is refused."""
    _, client = served
    login = await client.login("launcher")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("start_desktop")))["ok"]
        term = await conn.result(await conn.send("launch", app="terminal"))
        web = await conn.result(await conn.send("launch", app="browser", url="https://example.invalid/"))
        wrong = await conn.result(await conn.send("launch", app="xterm", url="https://example.invalid/"))
    assert term["ok"] and term["data"] == {"app": "terminal"}
    assert web["ok"]
    assert wrong["ok"] is False and wrong["error"]["code"] == "bad_message"
    calls = [c for c in fakes[0].calls if c[0] in ("launch", "open")]
    assert calls == [("launch", ("terminal",)), ("open", ("https://example.invalid/",))]


async def test_launch_needs_an_app(served: tuple[TestServer, Client]) -> None:
    """A launch frame without app is refused with an error frame, not run."""
    _, client = served
    login = await client.login("launcher")
    async with client.connect(login) as conn:
        await conn.send_raw('{"type": "launch", "id": "l1"}')
        reply = await conn.wait_for(lambda e: e.get("id") == "l1")
    assert reply["type"] == "error" and reply["code"] == "bad_message"


@pytest.mark.local
@pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox drops to session uids as root")
async def test_local_launch_returns_while_the_program_runs_and_dies_with_the_desktop(
    start_server: StartServer, root: Path
) -> None:
    """A launched program keeps running after its ok result, a job after it runs, and kill_desktop ends it."""
    _, client, made = await serve_local(start_server, root)
    login = await client.login("launcher")
    async with client.connect(login) as conn:
        started = await conn.result(await conn.send("start_desktop"), timeout=30)
        if not started["ok"]:
            pytest.skip(f"no local desktop on this machine: {started['error']}")
        launched = await conn.result(await conn.send("launch", app="sleep 600"), timeout=10)
        assert launched["ok"], launched
        after = await conn.result(await conn.send("run_command", cmd="true"), timeout=30)
        assert after["ok"], after
        missing = await conn.result(await conn.send("launch", app="no-such-program-here"), timeout=10)
        assert missing["ok"] is False and missing["error"]["code"] == "sandbox_failed"
        jail = made[0].jail
        assert jail is not None
        assert await asyncio.to_thread(_programs, jail.identity.uid, b"sleep\x00600\x00")
        assert (await conn.result(await conn.send("kill_desktop"), timeout=30))["ok"]
    assert not await asyncio.to_thread(_programs, jail.identity.uid, b"sleep\x00600\x00")


def _programs(uid: int, cmdline: bytes) -> list[int]:
    """Host pids of *uid* whose command line ends with *cmdline* (programs start by their full path)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if f.read().endswith(b"/" + cmdline):
                    found.append(int(name))
        except OSError:
            continue  # gone meanwhile
    return found
