"""The files endpoints on the local sandbox, through a real server running as root."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from client import Client, Connection, Login
from sandboxes.local import LocalSandbox
from tests.conftest import StartServer, serve_local
from tests.test_files import _auth, _url
from tests.test_local_sandbox import run

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox drops to session uids as root"),
]


@pytest.fixture
async def local(start_server: StartServer, root: Path) -> tuple[TestServer, Client, list[LocalSandbox]]:
    """A server on local sandboxes, with the sandboxes it made."""
    test_server, client, made = await serve_local(start_server, root)
    return test_server, client, made


async def _run(conn: Connection, cmd: str) -> str:
    rid = await conn.send("run_command", cmd=cmd)
    out: list[str] = []

    def done(event: dict[str, object]) -> bool:
        if event.get("type") == "output" and event.get("id") == rid:
            out.append(str(event["data"]))
        return event.get("type") in ("result", "error") and event.get("id") == rid

    result = await conn.wait_for(done, timeout=30)
    assert result.get("ok"), result
    return "".join(out)


async def _session(client: Client) -> Login:
    return await client.login("filer")


async def test_uploaded_file_is_the_sessions_and_commands_start_in_the_home(
    local: tuple[TestServer, Client, list[LocalSandbox]],
) -> None:
    """An upload is owned by the session's uid and seen by its commands, which start in the home."""
    _, client, made = local
    login = await _session(client)
    async with client.http.put(_url(client, login, "up/load.txt"), data=b"hello", headers=_auth(login)) as r:
        assert r.status == 201
    sandbox = made[0]
    jail = sandbox.jail
    assert jail is not None
    for path in (sandbox.home / "up", sandbox.home / "up/load.txt"):
        assert (path.stat().st_uid, path.stat().st_gid) == (jail.identity.uid, jail.identity.gid)
    async with client.connect(login) as conn:
        out = await _run(conn, 'pwd; echo "$HOME"; cat up/load.txt; echo more >> up/load.txt')
    assert out.split("\n")[:3] == ["/home/user", "/home/user", "hello"]
    async with client.http.get(_url(client, login, "up/load.txt"), headers=_auth(login)) as r:
        assert await r.read() == b"hellomore\n"


async def test_links_planted_by_the_session_are_not_followed(
    local: tuple[TestServer, Client, list[LocalSandbox]], root: Path
) -> None:
    """Links out of the home, a FIFO, or a link swapped in for a folder are 400 and touch nothing outside."""
    _, client, made = local
    login = await _session(client)
    outside = root / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("host file")
    async with client.connect(login) as conn:
        await _run(conn, "ln -s / rootlink; ln -s /etc/passwd pw; mkfifo fifo; mkdir real; ln -s real inside")
    sandbox = made[0]
    # A link straight to a host folder (what a session could aim at with a path it guessed).
    os.symlink(outside, sandbox.home / "out")
    auth = _auth(login)
    for path in ("pw", "rootlink/etc/passwd", "fifo", "out/keep.txt", "inside"):
        async with client.http.get(_url(client, login, path), headers=auth) as r:
            assert r.status == 400, path
    for folder in ("rootlink", "out", "rootlink/etc"):
        async with client.http.get(_url(client, login), params={"path": folder}, headers=auth) as r:
            assert r.status == 400, folder
    for path in ("out/keep.txt", "out/new.txt", "pw", "rootlink/tmp/planted", "é" * 200):
        async with client.http.put(_url(client, login, path), data=b"evil", headers=auth) as r:
            assert r.status == 400, path
    assert (outside / "keep.txt").read_text() == "host file"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert "planted" not in os.listdir("/tmp")
    assert (sandbox.home / "pw").is_symlink()
    async with client.http.get(_url(client, login), headers=auth) as r:
        entries = {e["name"]: e for e in (await r.json())["entries"]}
    assert entries["pw"]["link"] and not entries["pw"]["dir"]
    assert entries["real"]["dir"] and not entries["real"]["link"]


async def test_big_upload_is_streamed_not_held(
    local: tuple[TestServer, Client, list[LocalSandbox]],
) -> None:
    """A 24 MiB upload reaches the disk whole while the server's memory grows by a few MiB at most."""
    _, client, made = local
    login = await _session(client)
    chunk, count = b"z" * 65536, 384

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    tracemalloc.start()
    try:
        async with client.http.put(_url(client, login, "big.bin"), data=body(), headers=_auth(login)) as r:
            assert r.status == 201
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (made[0].home / "big.bin").stat().st_size == len(chunk) * count
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes"


async def test_upload_cut_at_the_limit_leaves_no_file(start_server: StartServer, root: Path) -> None:
    """An upload streamed past --upload-limit is 413 and leaves neither the file nor a partial one."""
    _, client, made = await serve_local(start_server, root, upload_limit=3 * 1024 * 1024)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(80):
            yield b"y" * 65536

    login = await _session(client)
    async with client.http.put(_url(client, login, "d/cut.bin"), data=body(), headers=_auth(login)) as r:
        assert r.status == 413
    assert os.listdir(made[0].home / "d") == []


async def test_a_folder_of_120000_files_lists_its_first_by_name_without_starving_another_session(
    make: Callable[..., LocalSandbox],
) -> None:
    """A huge folder lists its first 10,000 names; a flood of such listings leaves another home served."""
    big, other = make("hoarder"), make("neighbour")
    code, _ = await run(big, "mkdir -p big/sub && cd big && seq -w 120000 | xargs touch", timeout=60)
    assert code == 0
    listing = await big.list_files("big")
    assert listing.truncated and len(listing.entries) == 10_000
    names = [e.name for e in listing.entries]
    # Sorted by name, from the first 100,000 names read (a folder this big costs no more).
    assert names == sorted(names) and all(name.isdigit() for name in names)

    order: list[str] = []

    async def listed(sandbox: LocalSandbox, path: str, name: str) -> None:
        await sandbox.list_files(path)
        order.append(name)

    async with asyncio.timeout(120), asyncio.TaskGroup() as tg:
        for n in range(24):
            tg.create_task(listed(big, "big", f"big-{n}"))
        await asyncio.sleep(0)  # every big listing asked first
        tg.create_task(listed(other, "", "other"))
    assert order.index("other") < 12, order
