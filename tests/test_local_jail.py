"""The local sandbox's long-lived command jail and its spawner, against real bubblewrap."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from protocol.errors import CommandTimeout, SandboxBroken
from sandboxes.local import LocalSandbox, cmdjail
from sandboxes.local.jail import lock_uid, session_pids
from sandboxes.local.procs import REAP_TIMEOUT
from tests.test_local_sandbox import Output, leftovers, run

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

Make = Callable[..., LocalSandbox]


def spawner_pid(sandbox: LocalSandbox) -> int:
    assert sandbox._commands.jail is not None
    (pid,) = sandbox.command_jail_pids() - {sandbox._commands.jail.proc.pid}
    return pid


async def test_commands_share_one_jail_and_its_tmp(make: Make) -> None:
    """Two commands run in the same jail: a file left in /tmp is there for the next one."""
    sandbox = make("ada")
    assert (await run(sandbox, "echo kept > /tmp/note"))[0] == 0
    pids = sandbox.command_jail_pids()
    code, out = await run(sandbox, "cat /tmp/note; echo $$")
    assert (code, out.text().split()[0]) == (0, "kept")
    assert sandbox.command_jail_pids() == pids and len(pids) == 2


async def test_sessions_do_not_share_jails(make: Make) -> None:
    """Another session's jail has its own /tmp and its own process list."""
    a, b = make("ada"), make("bob")
    out_a = Output()
    job = asyncio.create_task(
        a.run("echo a > /tmp/mine; echo up; exec sleep 37", timeout=20, on_output=out_a)
    )
    try:
        async with asyncio.timeout(10):
            await out_a.wait_for("up")
        code, out_b = await run(b, "ps -eo args; cat /tmp/mine")
        assert code != 0 and "sleep 37" not in out_b.text()
        assert not set(a.command_jail_pids()) & set(b.command_jail_pids())
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)


async def test_limits_and_default_signals_reach_commands(make: Make) -> None:
    """Each command gets the configured rlimits (memory as data, not address space) and SIGPIPE's default."""
    code, out = await run(make("ada"), "ulimit -u; ulimit -d; ulimit -v; ulimit -t; yes | head -1")
    assert code == 0
    assert out.text("stdout").split() == ["256", str(2 * 1024**2), "unlimited", "600", "y"]
    assert out.text("stderr") == ""


async def test_a_killed_spawner_is_replaced(make: Make) -> None:
    """The running command reports the broken jail clearly; the next command gets a new jail."""
    sandbox = make("ada")
    out = Output()
    job = asyncio.create_task(sandbox.run("echo up; sleep 30", timeout=20, on_output=out))
    async with asyncio.timeout(10):
        await out.wait_for("up")
    old = sandbox.command_jail_pids()
    os.kill(spawner_pid(sandbox), signal.SIGKILL)
    with pytest.raises(SandboxBroken, match="command jail ended"):
        async with asyncio.timeout(5):
            await job
    code, out = await run(sandbox, "echo again")
    assert (code, out.text()) == (0, "again\n")
    assert not sandbox.command_jail_pids() & old


async def test_a_command_cannot_stop_its_jails_spawner_with_ptrace(make: Make) -> None:
    """PTRACE_ATTACH to the jail's PID 1 is refused, so no command can stall the next ones."""
    sandbox = make("ada")
    attach = (
        "import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
        "print(libc.ptrace(16, 1, 0, 0), ctypes.get_errno())"  # PTRACE_ATTACH; EPERM is 1
    )
    code, out = await run(sandbox, f"python3 -c '{attach}'")
    assert (code, out.text("stdout")) == (0, "-1 1\n")
    code, out = await run(sandbox, "echo still-served", timeout=5)
    assert (code, out.text()) == (0, "still-served\n")


async def test_a_server_holding_over_a_thousand_descriptors_still_starts_jails(make: Make) -> None:
    """The spawner's socket keeps the server's number, past select()'s 1024: commands still run."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        code, out = await run(make("ada"), "echo served", timeout=10)
        assert (code, out.text()) == (0, "served\n")
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_background_processes_are_killed_at_close(make: Make) -> None:
    """What a command leaves running, even in its own session, dies when the sandbox closes."""
    sandbox = make("ada")
    code, _ = await run(
        sandbox, "sleep 100 >/dev/null 2>&1 & setsid sleep 101 >/dev/null 2>&1 & echo started"
    )
    assert code == 0
    assert len(leftovers(sandbox)) == 2
    assert sandbox.jail is not None
    jail = sandbox.jail
    await sandbox.close()
    assert session_pids(jail) == []


async def test_a_background_process_holding_the_output_does_not_hold_the_command(make: Make) -> None:
    """The command is over when its shell exits, even if a child it left keeps its pipes open."""
    sandbox = make("ada")
    started = time.monotonic()
    code, out = await run(sandbox, "(sleep 100 &); sleep 101 & echo done; echo err >&2", timeout=10)
    assert (code, out.text("stdout"), out.text("stderr")) == (0, "done\n", "err\n")
    assert time.monotonic() - started < 5
    assert len(leftovers(sandbox)) == 2


async def test_stop_desktop_ends_background_processes_and_a_new_jail_follows(make: Make) -> None:
    """stop_desktop ends the command jail too; the next command starts a fresh one."""
    sandbox = make("ada")
    assert (await run(sandbox, "sleep 100 >/dev/null 2>&1 & true"))[0] == 0
    await sandbox.stop_desktop()
    assert sandbox.jail is not None and session_pids(sandbox.jail) == []
    code, out = await run(sandbox, "ls -A /tmp")
    assert (code, out.text()) == (0, ".X11-unix\n")  # nothing of the old jail


async def test_commands_draw_on_the_desktop_but_cannot_replace_its_socket(make: Make) -> None:
    """The X socket folder is read-only in the command jail, yet xdotool can use the display."""
    sandbox = make("ada")
    assert (await run(sandbox, "true"))[0] == 0  # the jail starts before the desktop
    async with asyncio.timeout(10):
        await sandbox.start_desktop()
    code, out = await run(sandbox, "xdotool getdisplaygeometry; rm -f /tmp/.X11-unix/X* && echo removed")
    assert code != 0 and out.text("stdout") == "1280 800\n"
    assert sandbox.desktop_running


FAKE_PREAMBLE = """
import json, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
"""


def fake_spawner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, body: str) -> None:
    script = tmp_path / "fake_spawner.py"
    script.write_text(FAKE_PREAMBLE + body)
    monkeypatch.setattr(cmdjail, "SPAWNER", script)


async def test_a_malformed_reply_ends_the_jail_without_hanging(
    make: Make, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A reply that does not parse fails the command at once and the jail is stopped."""
    body = 'sock.send(b\'{"ready": true}\')\nsocket.recv_fds(sock, 65536, 2)\nsock.send(b"\\xff{garbage")\n'
    body += "time.sleep(60)\n"
    fake_spawner(monkeypatch, tmp_path, body)
    sandbox = make("ada")
    started = time.monotonic()
    with pytest.raises(SandboxBroken, match="malformed reply"):
        await run(sandbox, "true", timeout=30)
    assert time.monotonic() - started < 5
    assert sandbox.command_jail_pids() == set()


async def test_a_silent_spawner_is_bounded_by_timeouts(
    make: Make, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A spawner that never reports a status: the command times out, the kill is bounded."""
    body = "sock.send(b'{\"ready\": true}')\nwhile True:\n    socket.recv_fds(sock, 65536, 2)\n"
    fake_spawner(monkeypatch, tmp_path, body)
    sandbox = make("ada")
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        await run(sandbox, "true", timeout=0.5)
    assert time.monotonic() - started < 0.5 + REAP_TIMEOUT + 1
    assert sandbox.command_jail_pids() == set()


async def test_a_spawner_that_never_starts_is_reported(
    make: Make, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No ready message within the start timeout: SandboxBroken, nothing left running."""
    fake_spawner(monkeypatch, tmp_path, "time.sleep(60)\n")
    sandbox = make("ada", start_timeout=0.5)
    with pytest.raises(SandboxBroken, match="did not start within"):
        await run(sandbox, "true")
    assert leftovers(sandbox) == []


async def test_a_command_the_spawner_cannot_start_answers_at_once(make: Make) -> None:
    """A command that cannot be started (a NUL in it) ends with 126 at once and the jail keeps working."""
    sandbox = make("nul")
    async with asyncio.timeout(10):
        code, out = await run(sandbox, "echo a\x00b")
        assert code == 126
        assert "cannot run" in out.text()
        assert (await run(sandbox, "echo fine"))[0] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="uids are only handed out by a root server")
async def test_a_uid_another_server_holds_is_never_shared(make: Make) -> None:
    """A uid locked by another server on the host (no process of it running yet) is skipped."""
    base = 260_000 + (os.getpid() % 1000) * 10
    held = lock_uid(base)
    assert held is not None
    try:
        sandbox = make("ada", uid_base=base, uid_count=10)
        assert (await run(sandbox, "true"))[0] == 0
        assert sandbox.jail is not None and sandbox.jail.identity.uid != base
        await sandbox.close()
        again = lock_uid(sandbox.jail.identity.uid)  # given back at close
        assert again is not None
        os.close(again)
    finally:
        os.close(held)
