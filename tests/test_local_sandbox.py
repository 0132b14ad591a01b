"""The local sandbox against the real bubblewrap, Xvfb, x11vnc and xdotool."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable

import pytest

from protocol.errors import CommandTimeout, SandboxBroken
from sandboxes.base import Stream
from sandboxes.local import LocalSandbox
from sandboxes.local.jail import UIDS, session_pids
from tests.slow_callbacks import cpu_wait

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

Make = Callable[[str], LocalSandbox]


class Output:
    """Collects a command's output and signals when a text shows up."""

    def __init__(self) -> None:
        self.chunks: list[tuple[Stream, str]] = []
        self.changed = asyncio.Event()

    async def __call__(self, stream: Stream, text: str) -> None:
        self.chunks.append((stream, text))
        self.changed.set()

    def text(self, stream: Stream | None = None) -> str:
        return "".join(t for s, t in self.chunks if stream in (None, s))

    async def wait_for(self, needle: str) -> None:
        while needle not in self.text():
            self.changed.clear()
            await self.changed.wait()


async def run(sandbox: LocalSandbox, cmd: str, timeout: float = 20) -> tuple[int, Output]:
    out = Output()
    code = await sandbox.run(cmd, timeout=timeout, on_output=out)
    return code, out


def leftovers(sandbox: LocalSandbox) -> list[int]:
    """Session processes besides the command jail itself (its bwrap and spawner)."""
    assert sandbox.jail is not None
    own = sandbox.command_jail_pids()
    return [pid for pid in session_pids(sandbox.jail) if pid not in own]


async def test_output_streams_while_the_command_runs(make: Make) -> None:
    """Output reaches the sink before the command has ended."""
    sandbox = make("ada")
    out = Output()
    cmd = "echo first; while [ ! -e go ]; do sleep 0.01; done; echo second"
    job = asyncio.create_task(sandbox.run(cmd, timeout=20, on_output=out))
    async with asyncio.timeout(10):
        await out.wait_for("first")
    assert not job.done()
    (sandbox.home / "go").touch()
    async with asyncio.timeout(10):
        assert await job == 0
    assert out.text() == "first\nsecond\n"


async def test_stdout_and_stderr_stay_apart_and_exit_code_returns(make: Make) -> None:
    """stdout and stderr arrive on their own streams and the exit code comes back."""
    code, out = await run(make("ada"), "echo out; echo err >&2; exit 3")
    assert (code, out.text("stdout"), out.text("stderr")) == (3, "out\n", "err\n")


async def test_a_killed_command_reports_128_plus_the_signal(make: Make) -> None:
    """A command ended by SIGKILL answers 137, as a shell would."""
    code, _ = await run(make("ada"), "kill -9 $$")
    assert code == 137


async def test_one_session_cannot_read_another_sessions_files(make: Make) -> None:
    """Session B finds session A's file by no path: host path, /proc, or walking up."""
    a, b = make("ada"), make("bob")
    assert (await run(a, "echo topsecret-a > secret.txt"))[0] == 0
    host_path = a.home / "secret.txt"
    probes = [
        f"cat {host_path}",
        "cat /proc/*/root/home/user/secret.txt",
        "cat ../../../../home/user/../../secret.txt",
        "grep -rs topsecret-a / --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr --exclude-dir=dev",
        "ls -a /home/user",
    ]
    _, out = await run(b, "; ".join(probes))
    assert "topsecret-a" not in out.text()
    assert not (b.home / "secret.txt").exists()


async def test_a_session_does_not_see_another_sessions_processes(make: Make) -> None:
    """Session B's process list holds nothing of session A's."""
    a, b = make("ada"), make("bob")
    out_a = Output()
    job = asyncio.create_task(a.run("echo up; exec sleep 37", timeout=20, on_output=out_a))
    try:
        async with asyncio.timeout(10):
            await out_a.wait_for("up")
        _, out_b = await run(b, "ps -eo pid,args")
        assert "sleep 37" not in out_b.text()
        assert len(out_b.text().strip().splitlines()) <= 4  # header, bwrap init, bash, ps
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)


async def test_only_loopback_exists_inside(make: Make) -> None:
    """A sandbox without network sees only the loopback interface."""
    _, out = await run(make("ada"), "cat /proc/net/dev")
    names = {line.split(":")[0].strip() for line in out.text().splitlines()[2:]}
    assert names == {"lo"}


@pytest.mark.skipif(os.geteuid() != 0, reason="only meaningful when the server is root")
async def test_commands_do_not_run_as_root(make: Make) -> None:
    """With a root server, a session's commands run as its own unprivileged uid."""
    sandbox = make("ada")
    _, out = await run(sandbox, "id -u; cat /etc/shadow")
    assert sandbox.jail is not None
    assert out.text("stdout").split() == [str(sandbox.jail.identity.uid)]
    assert sandbox.jail.identity.uid != 0


async def test_cancel_kills_the_whole_tree_at_once(make: Make) -> None:
    """Cancelling a command ends it and its children in well under a second."""
    sandbox = make("ada")
    out = Output()
    job = asyncio.create_task(sandbox.run("sleep 60 & echo up; sleep 61", timeout=90, on_output=out))
    async with asyncio.timeout(10):
        await out.wait_for("up")
    started, waited = time.monotonic(), cpu_wait()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    # Time the loop spent waiting for a CPU is the machine's, not the kill's.
    assert time.monotonic() - started - (cpu_wait() - waited) < 0.5
    assert leftovers(sandbox) == []


async def test_timeout_raises_and_leaves_nothing(make: Make) -> None:
    """A command past its timeout raises CommandTimeout and is gone."""
    sandbox = make("ada")
    with pytest.raises(CommandTimeout):
        await run(sandbox, "sleep 30", timeout=0.3)
    assert leftovers(sandbox) == []


async def test_setup_prepares_home_and_names_missing_packages(make: Make) -> None:
    """setup writes the home's files, reports each package, and fails naming the missing one."""
    sandbox = make("ada")
    steps: list[tuple[str, dict[str, object]]] = []
    with pytest.raises(SandboxBroken, match="no-such-package-x"):
        await sandbox.setup(["bash", "no-such-package-x"], lambda step, **kw: steps.append((step, kw)))
    assert (sandbox.home / ".bashrc").is_file() and (sandbox.home / ".config/chromium").is_dir()
    packages = {kw["package"]: kw["status"] for step, kw in steps if step == "setup.package"}
    assert packages == {"bash": "present", "no-such-package-x": "missing"}


async def screenshot_when_stable(sandbox: LocalSandbox) -> bytes:
    """A screenshot once two in a row are the same (the screen stopped changing)."""
    last = await sandbox.screenshot()
    while (shot := await sandbox.screenshot()) != last:
        last = shot
    return shot


async def test_desktop_screenshot_changes_after_typing(make: Make) -> None:
    """The desktop starts, takes PNG screenshots, and shows text typed into an xterm."""
    sandbox = make("ada")
    async with asyncio.timeout(10):
        await sandbox.start_desktop()
    assert sandbox.desktop_running and sandbox.vnc_endpoint is not None
    await sandbox.launch("xterm")
    async with asyncio.timeout(15):
        # Focus the xterm first: typed keys go to the focused window only.
        await sandbox.xdotool("search", "--sync", "--onlyvisible", "--class", "xterm", "windowfocus")
        before = await screenshot_when_stable(sandbox)
        assert before.startswith(b"\x89PNG\r\n\x1a\n")
        await sandbox.write("echo hello from the sandbox")
        await sandbox.press("enter")
        while (await sandbox.screenshot()) == before:
            pass


async def test_stop_and_close_leave_no_process_and_no_home(make: Make) -> None:
    """stop_desktop ends every session process, even one ignoring SIGTERM; close removes the home."""
    sandbox = make("ada")
    async with asyncio.timeout(10):
        await sandbox.start_desktop()
    await sandbox.launch("xterm")
    await sandbox.launch("sh -c 'trap \"\" TERM; echo stubborn; while :; do sleep 1; done'")
    out = Output()
    job = asyncio.create_task(sandbox.run("trap '' TERM; echo up; sleep 50", timeout=60, on_output=out))
    async with asyncio.timeout(10):
        await out.wait_for("up")
    assert len(leftovers(sandbox)) >= 6
    async with asyncio.timeout(5):
        await sandbox.stop_desktop()
        assert await job == 137
    assert not sandbox.desktop_running and sandbox.vnc_endpoint is None
    assert leftovers(sandbox) == []
    assert sandbox.jail is not None
    uid, home = sandbox.jail.identity.uid, sandbox.home
    await sandbox.close()
    assert not home.exists()
    if sandbox.jail.identity.dropped:
        assert uid not in UIDS._taken


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
async def test_chromium_renders_a_local_page_under_the_default_limits(make: Make) -> None:
    """`chromium --headless --dump-dom` of a file in the home prints its DOM under the 2 GiB memory limit."""
    sandbox = make("web")
    page = '<p id="x">rendered by chromium</p>'
    assert (await run(sandbox, f"echo '{page}' > page.html"))[0] == 0
    code, out = await run(sandbox, "chromium --headless --dump-dom file://$HOME/page.html", timeout=60)
    assert code == 0, out.text("stderr")[-2000:]
    assert '<p id="x">rendered by chromium</p>' in out.text("stdout")


async def test_opening_a_web_page_without_a_network_fails_saying_why(make: Make) -> None:
    """Without --sandbox-network, opening an outside URL fails naming the cause, not a browser error page."""
    sandbox = make("ada")
    async with asyncio.timeout(10):
        await sandbox.start_desktop()
    with pytest.raises(SandboxBroken, match="no network"):
        await sandbox.open("https://example.com/")
