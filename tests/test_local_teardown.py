"""Ending local sessions through the server: huge or hostile homes, stray processes, old folders."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client, Connection
from sandboxes.local import LocalConfig, local_factory
from sandboxes.local.folders import remove_tree
from tests.conftest import MakeLocal, StartServer
from tests.slow_callbacks import cpu_wait

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(
        shutil.which("bwrap") is None or os.geteuid() != 0, reason="needs root and bubblewrap"
    ),
]

# What `for i in $(seq 1500); do mkdir d && cd d; done` makes, without 1500 process starts.
DEEP = (
    "cd ~ && python3 -c \"import os\nfor _ in range(1500): os.mkdir('d'); os.chdir('d')\n"
    "os.symlink('{canary}', 'up'); os.symlink('/', 'root')\""
)
MANY = (
    "python3 -c \"import os; [os.close(os.open(f'f{i}', os.O_CREAT | os.O_WRONLY)) for i in range(200_000)]\""
)


@pytest.fixture
def root() -> Iterator[Path]:
    """A sandbox root on a tmpfs where the host has one: deep trees on a busy disk take minutes to make."""
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="deskhive-test-", dir=shm if os.access(shm, os.W_OK) else None))
    folder.chmod(0o711)
    yield folder
    remove_tree(folder)


async def start_local(start_server: StartServer, root: Path) -> Client:
    _, client = await start_server(sandbox_factory=None, sandbox="local", data_dir=root)
    return client


async def command(conn: Connection, cmd: str, timeout: float = 60) -> int:
    result = await conn.result(await conn.send("run_command", cmd=cmd, timeout=timeout), timeout=timeout + 10)
    assert result["ok"], result
    code: int = result["exit_code"]
    return code


def exists(path: Path) -> bool:
    """One lstat: cheap enough for the loop."""
    return os.path.lexists(path)


async def gone(folder: Path, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while exists(folder):  # noqa: ASYNC110 - removal runs in a thread that signals nothing
            await asyncio.sleep(0.05)


async def test_a_1500_deep_home_is_removed_at_logout_and_everyone_else_goes_on(
    start_server: StartServer, root: Path
) -> None:
    """A home 1500 folders deep, with links out of it, is removed at logout; others and new logins work."""
    client = await start_local(start_server, root)
    deep, other = await client.login("deep"), await client.login("other")
    canary = root / "canary"
    os.mkdir(canary)
    os.close(os.open(canary / "keep", os.O_CREAT | os.O_WRONLY))
    async with client.connect(deep) as conn:
        assert await command(conn, DEEP.format(canary=canary)) == 0
    folder = root / "sandboxes" / deep.session_id
    assert exists(folder / "home" / "d" / "d")
    await client.logout(deep)
    await gone(folder, 30)
    assert exists(canary / "keep")  # the links were removed, not followed
    async with client.connect(other) as conn:
        assert await command(conn, "echo still here") == 0
    late = await client.login("late")
    async with client.connect(late) as conn:
        assert await command(conn, "true") == 0
    status = await client.call("GET", "/status", token="admin-secret")
    assert deep.session_id not in {s["session_id"] for s in status["sessions"]}


async def ping_times(conn: Connection, stop: asyncio.Event) -> list[float]:
    """Round trips of pings sent one after another until *stop* is set.

    The time this thread (the server's loop and the client's) waited for a
    CPU meanwhile is taken off: what is measured is the loop being held, not
    a machine busy with other work.
    """
    times = []
    n = 0
    while not stop.is_set():
        n += 1
        started, waited = time.monotonic(), cpu_wait()
        await conn.send("ping", id=f"p{n}")
        await conn.wait_for(lambda e, rid=f"p{n}": e["type"] == "pong" and e.get("id") == rid, 5)
        times.append(time.monotonic() - started - (cpu_wait() - waited))
    return times


async def test_a_home_of_200000_files_is_removed_while_other_pings_answer_fast(
    start_server: StartServer, root: Path
) -> None:
    """Logging out a session with 200,000 files in its home never holds another session's ping 100 ms."""
    client = await start_local(start_server, root)
    big, other = await client.login("big"), await client.login("pinger")
    async with client.connect(big) as conn:
        assert await command(conn, MANY, timeout=120) == 0
    folder = root / "sandboxes" / big.session_id
    async with client.connect(other) as conn:
        stop = asyncio.Event()
        pinger = asyncio.create_task(ping_times(conn, stop))
        try:
            await client.logout(big)
            await gone(folder, 90)
        finally:
            stop.set()
            times = await pinger
    print(f"pings during removal: {len(times)}, slowest {max(times) * 1000:.1f} ms")
    assert len(times) > 10
    assert max(times) < 0.1, f"slowest ping {max(times) * 1000:.0f} ms of {len(times)}"


async def test_close_kills_a_process_of_the_session_outside_its_jails(make: MakeLocal) -> None:
    """A process running as the session's uid that no jail holds is killed when the session closes."""
    sandbox = make("stray")
    assert await sandbox.run("true", timeout=10, on_output=_ignore) == 0
    assert sandbox.jail is not None
    uid = sandbox.jail.identity.uid
    stray = await asyncio.create_subprocess_exec("sleep", "300", user=uid, group=uid, extra_groups=[])
    try:
        await sandbox.close()
        async with asyncio.timeout(5):
            assert await stray.wait() == -9
    finally:
        if stray.returncode is None:
            stray.kill()
            await stray.wait()


async def _ignore(_stream: str, _text: str) -> None:
    return None


def test_remove_tree_goes_deeper_than_recursion_and_never_follows_links(tmp_path: Path) -> None:
    """1500 nested folders (past the recursion limit) and links out are removed; their targets stay."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("kept")
    top = tmp_path / "home"
    # Made by descriptor: paths this deep pass PATH_MAX.
    folder = os.open(tmp_path, os.O_RDONLY)
    try:
        os.mkdir("home", dir_fd=folder)
        fd = os.open("home", os.O_RDONLY, dir_fd=folder)
        for _ in range(1500):
            os.mkdir("d", dir_fd=fd)
            os.symlink(outside, "out", dir_fd=fd)
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(fd)
    finally:
        os.close(folder)
    done = remove_tree(top)
    assert (done.failed, top.exists()) == (0, False)
    assert (outside / "keep").read_text() == "kept"


async def test_start_up_removes_session_folders_left_by_a_killed_server(root: Path) -> None:
    """The start-up sweep removes session folders no live session owns; live ones and other entries stay."""
    sandboxes = root / "sandboxes"
    left = sandboxes / "ada_1700000000_00000000000000aa"
    (left / "home" / "deep").mkdir(parents=True)
    (left / "home" / "deep" / "file").write_text("x")
    kept = sandboxes / "ada_1700000000_00000000000000bb"
    kept.mkdir()
    (sandboxes / "README").write_text("not a session")
    await local_factory(LocalConfig(root=sandboxes)).sweep_orphans({kept.name: None})
    assert sorted(p.name for p in sandboxes.iterdir()) == ["README", kept.name]


async def test_a_server_starting_removes_what_a_killed_one_left(
    start_server: StartServer, root: Path
) -> None:
    """Session folders (homes included) left under the data folder are gone once the server serves."""
    left = root / "sandboxes" / "ada_1700000000_0123456789abcdef"
    os.makedirs(left / "home" / "work")
    os.symlink(root, left / "home" / "work" / "loop")
    client = await start_local(start_server, root)
    assert not exists(left) and exists(root)
    login = await client.login("ada")
    async with client.connect(login) as conn:
        assert await command(conn, "true") == 0
