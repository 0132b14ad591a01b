"""A local session's processes bounded as a whole (one cgroup each) and its tmpfs mounts sized."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sandboxes.base import Limits
from sandboxes.local import LocalConfig, LocalSandbox, cgroups, local_factory
from sandboxes.local.jail import session_pids
from tests.conftest import StartServer
from tests.test_local_sandbox import Output, run

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

Make = Callable[..., LocalSandbox]
MiB = 1024**2
#: Per-process limits off, so that only the session's cgroup can be what stops a test.
UNLIMITED = Limits(memory_bytes=0, processes=0, cpu_seconds=0)
#: Allocates and touches *N* MiB of anonymous memory (``bytes * n`` writes every page).
ALLOCATE = 'python3 -c \'import sys; x = b"x" * (int(sys.argv[1]) << 20); print("kept")\''


@pytest.fixture
def host() -> cgroups.CgroupHost:
    """This machine's cgroups; the test is skipped where the server cannot make any."""
    found = cgroups.shared()
    if found is None:
        pytest.skip("no usable cgroups here (cgroup v1 or v2 controllers, as root)")
    return found


def session_cgroup(sandbox: LocalSandbox) -> cgroups.SessionCgroup:
    assert sandbox.jail is not None and sandbox.jail.cgroup is not None
    return sandbox.jail.cgroup


async def test_past_its_memory_bound_a_session_loses_its_own_process_only(
    host: cgroups.CgroupHost, start_server: StartServer, root: Path
) -> None:
    """The allocating command is OOM-killed (137); the server, its session and another session go on."""
    config = LocalConfig(root=root / "sandboxes", limits=UNLIMITED, session_memory_bytes=192 * MiB)
    _, client = await start_server(local_factory(config), sandbox="local")
    hog, calm = await client.login("hog"), await client.login("calm")
    async with client.connect(hog) as h, client.connect(calm) as c:
        greedy = await h.send("run_command", cmd=f"{ALLOCATE} 400")
        quiet = await c.send("run_command", cmd=f"{ALLOCATE} 100")
        assert (await h.result(greedy, timeout=30))["exit_code"] == 137
        assert (await c.result(quiet, timeout=30))["exit_code"] == 0
        again = await h.result(await h.send("run_command", cmd=f"{ALLOCATE} 100"), timeout=30)
        assert again["exit_code"] == 0
    assert (await client.call("GET", "/healthz"))["ok"] is True


async def test_the_sessions_tmpfs_counts_toward_its_memory(host: cgroups.CgroupHost, make: Make) -> None:
    """Files in /tmp use the session's memory: with them an allocation that fits alone is killed."""
    sandbox = make("ada", limits=UNLIMITED, session_memory_bytes=192 * MiB)
    assert (await run(sandbox, "head -c 150M /dev/zero > /tmp/fill"))[0] == 0
    assert (await run(sandbox, f"{ALLOCATE} 100", timeout=30))[0] == 137
    code, out = await run(sandbox, f"rm /tmp/fill && {ALLOCATE} 100", timeout=30)
    assert (code, out.text("stdout")) == (0, "kept\n")


#: Forks children that wait, until fork fails; prints how many it made, then holds them.
FORK_TO_THE_BOUND = r"""python3 -c '
import os, signal, sys, time
kids = []
while True:
    try:
        pid = os.fork()
    except BlockingIOError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
print("made", len(kids), flush=True)
time.sleep(60)
'"""


async def test_a_fork_bomb_stops_at_the_sessions_process_bound(host: cgroups.CgroupHost, make: Make) -> None:
    """Forks fail at the bound (all the session's processes counted); another session runs meanwhile."""
    bomb, other = make("bomb", limits=UNLIMITED, session_processes=40), make("other")
    out = Output()
    job = asyncio.create_task(bomb.run(FORK_TO_THE_BOUND, timeout=60, on_output=out))
    try:
        async with asyncio.timeout(20):
            await out.wait_for("\n")
        made = int(out.text("stdout").split()[1])
        # The jail itself, its shell and python hold a few of the 40.
        assert 30 <= made <= 37
        assert len(session_cgroup(bomb).pids()) <= 40
        assert (await run(other, "echo fine"))[1].text() == "fine\n"
        # Full: the session's next command cannot even start.
        assert (await run(bomb, "true"))[0] != 0
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
    assert (await run(bomb, "echo free again"))[1].text() == "free again\n"


async def test_every_process_of_a_session_is_in_its_cgroup_until_close(
    host: cgroups.CgroupHost, make: Make
) -> None:
    """Commands, background jobs, the desktop and its apps share one bounded cgroup, removed at close."""
    sandbox = make("ada")
    async with asyncio.timeout(15):
        await sandbox.start_desktop()
    await sandbox.launch("xterm")
    await sandbox.launch("chromium --headless about:blank")
    out = Output()
    job = asyncio.create_task(
        sandbox.run("setsid sleep 40 & echo up; exec sleep 41", timeout=60, on_output=out)
    )
    try:
        async with asyncio.timeout(10):
            await out.wait_for("up")
        cgroup = session_cgroup(sandbox)
        assert sandbox.jail is not None
        everyone = set(session_pids(sandbox.jail))
        assert len(everyone) >= 8 and everyone <= cgroup.pids()
        names = ["memory.limit_in_bytes", "pids.max", "cpu.shares"] if host.version == 1 else []
        names = names or ["memory.max", "pids.max", "cpu.weight"]
        values = [(d / n).read_text().strip() for d in cgroup.folders for n in names if (d / n).exists()]
        assert values == [str(4 * 1024**3), "512", "1024" if host.version == 1 else "100"]
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
    async with asyncio.timeout(10):
        await sandbox.close()
    assert not any(folder.exists() for folder in cgroup.folders)


async def test_tmpfs_mounts_have_their_sizes_and_dev_is_read_only(make: Make) -> None:
    """/, /dev/shm and /tmp are sized tmpfs mounts (writes past the size fail); /dev takes no files."""
    sandbox = make("ada", root_bytes=4 * MiB, shm_bytes=8 * MiB, tmp_bytes=16 * MiB)
    code, out = await run(sandbox, "df -B1M --output=size,target / /dev/shm /tmp | tail -n +2")
    assert code == 0
    assert [line.split() for line in out.text("stdout").splitlines()] == [
        ["4", "/"], ["8", "/dev/shm"], ["16", "/tmp"],
    ]  # fmt: skip
    code, out = await run(
        sandbox,
        "head -c 9M /dev/zero > /dev/shm/f; head -c 5M /dev/zero > /f; touch /dev/x; echo > /dev/null",
    )
    assert code == 0
    assert out.text("stderr").count("No space left on device") == 2
    assert "Read-only file system" in out.text("stderr")


def test_a_host_without_usable_cgroups_is_said_at_start_up(tmp_path: Path) -> None:
    """Where neither cgroup v2 nor the v1 controllers can be used, start-up logs one clear warning."""
    unified = Path("/sys/fs/cgroup/unified")
    for root in [tmp_path, *([unified] if (unified / "cgroup.controllers").exists() else [])]:
        with capture_logs() as logs:
            assert cgroups.probe(root) is None
        (warning,) = [entry for entry in logs if entry["event"] == "sandbox.cgroups_unavailable"]
        assert warning["log_level"] == "warning" and "not as a whole" in warning["consequence"]
