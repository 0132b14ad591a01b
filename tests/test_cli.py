"""``deskhive serve`` as a process: options, banner, and a clean SIGTERM."""

from __future__ import annotations

import asyncio
import io
import os
import re
import resource
import shutil
import signal
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog

import cli
import config
from client import Client
from tests.datadirs import fresh_data_dir, remove_data_dir

ROOT = Path(__file__).resolve().parent.parent


class Served:
    """A ``deskhive serve`` child process, what its banner (stderr) said, and its log (stdout)."""

    def __init__(self, proc: asyncio.subprocess.Process, banner: str) -> None:
        self.proc, self.banner = proc, banner
        url = re.search(r"listening on (http://\S+)", banner)
        admin = re.search(r"admin token: (\S+)$", banner, re.MULTILINE)
        assert url, banner
        # Empty when the token was configured: the banner never prints one then.
        self.url, self.admin = url.group(1), admin.group(1) if admin else ""
        self.port = int(self.url.rsplit(":", 1)[1])
        self.log: list[str] = []
        self._logged = asyncio.Event()
        assert proc.stdout is not None and proc.stderr is not None
        # Both pipes are drained for as long as the process lives, so it never blocks on them.
        self._readers = [
            asyncio.create_task(self._drain(proc.stdout, self.log)),
            asyncio.create_task(self._drain(proc.stderr, [])),
        ]

    async def _drain(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode(errors="replace"))
            self._logged.set()

    async def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The first log line holding *text*, waiting up to *timeout* seconds for it."""
        async with asyncio.timeout(timeout):
            while True:
                self._logged.clear()
                if found := next((line for line in self.log if text in line), None):
                    return found
                await self._logged.wait()

    async def finish(self) -> None:
        """Wait for the pipes to end (after the process did)."""
        async with asyncio.timeout(10):
            await asyncio.gather(*self._readers)


async def start(*args: str, env: dict[str, str] | None = None, limit_files: int | None = None) -> Served:
    """Start ``deskhive serve`` (with at most *limit_files* descriptors, if given) and read its banner."""

    def limit() -> None:
        assert limit_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_files, limit_files))

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=limit if limit_files is not None else None,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(20):
        while not any(line.startswith("admin token:") for line in lines):
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise RuntimeError("server exited: " + "".join(lines))
            lines.append(line)
    return Served(proc, "".join(lines))


async def stop(served: Served, *, signalled: bool = False) -> int:
    if served.proc.returncode is None and not signalled:
        served.proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(20):
            code = await served.proc.wait()
    finally:
        if served.proc.returncode is None:
            os.killpg(served.proc.pid, signal.SIGKILL)
            await served.proc.wait()
    await served.finish()
    return code


@pytest.fixture
async def null_server(tmp_path: Path) -> AsyncIterator[Served]:
    served = await start(
        "--sandbox", "null", "--data-dir", str(tmp_path), env={"DESKHIVE_ADMIN_TOKEN": "from-env"}
    )
    try:
        yield served
    finally:
        await stop(served)


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The session id (field 6) of every descendant is the server's pid.
            if int(stat.rsplit(")", 1)[1].split()[3]) == pid and int(entry.name) != pid:
                found.append(int(entry.name))
    return found


async def test_banner_says_address_sandbox_and_demo_mode_but_not_a_configured_token(
    null_server: Served,
) -> None:
    """The banner names the address, the sandbox and demo mode, and never prints a configured admin token."""
    assert "sandbox: null" in null_server.banner
    assert "demo mode" in null_server.banner
    assert "admin token: as configured" in null_server.banner
    assert "from-env" not in null_server.banner
    async with Client(null_server.url) as client:
        assert "sessions" in await client.call("GET", "/status", token="from-env")
    await stop(null_server)
    assert not any("from-env" in line for line in null_server.log)


async def test_generated_admin_token_goes_to_the_terminal_once_and_never_to_the_log(tmp_path: Path) -> None:
    """A generated admin token is printed in the banner on stderr, works, and is absent from the JSON log."""
    served = await start("--sandbox", "null", "--data-dir", str(tmp_path), "--log-format", "json")
    try:
        assert served.banner.count(served.admin) == 1
        async with Client(served.url) as client:
            assert "sessions" in await client.call("GET", "/status", token=served.admin)
    finally:
        assert await stop(served) == 0
    assert served.log, "the server logs its start and stop"
    assert not any(served.admin in line for line in served.log)


async def test_sigterm_ends_sessions_and_leaves_nothing_behind(null_server: Served) -> None:
    """SIGTERM closes sockets with 1001 and exits 0 with no child left."""
    async with Client(null_server.url) as client:
        login = await client.login("zed")
        async with client.connect(login) as conn:
            await conn.result(await conn.send("run_command", cmd="echo hi"))
            null_server.proc.send_signal(signal.SIGTERM)
            assert conn.ws is not None
            msg = await conn.ws.receive(timeout=10)
            while msg.type is aiohttp.WSMsgType.TEXT:
                msg = await conn.ws.receive(timeout=10)
            assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
    assert await stop(null_server, signalled=True) == 0
    assert _children_of(null_server.proc.pid) == []


def test_options_come_from_flags_then_environment() -> None:
    """A flag wins over DESKHIVE_*, which wins over the default."""
    args = config.parser().parse_args(["serve", "--idle-timeout", "5"])
    settings = config.from_args(args, {"DESKHIVE_IDLE_TIMEOUT": "9", "DESKHIVE_JOURNAL_SIZE": "50"})
    assert (settings.idle_timeout, settings.journal_size, settings.port) == (5.0, 50, 8080)
    with pytest.raises(SystemExit):
        config.from_args(config.parser().parse_args(["serve", "--sandbox", "cloud"]), {})
    with pytest.raises(SystemExit):
        config.parser().parse_args(["serve", "--journal-size", "-1"])


async def test_users_file_requires_the_right_password(tmp_path: Path) -> None:
    """With a users file, login needs the password whose scrypt hash it holds."""
    import auth
    from client import ClientError

    users = tmp_path / "users"
    users.write_text(f"# team\nada:{await asyncio.to_thread(auth.hash_password, 's3cret')}\n")
    served = await start("--sandbox", "null", "--users-file", str(users), "--data-dir", str(tmp_path))
    try:
        assert "demo mode" not in served.banner
        async with Client(served.url) as client:
            for password in (None, "wrong"):
                with pytest.raises(ClientError) as caught:
                    await client.login("ada", **({"password": password} if password else {}))
                assert caught.value.status == 401
            with pytest.raises(ClientError) as malformed:
                await client.call("POST", "/api/sessions", body={"username": "ada", "password": 5})
            assert malformed.value.status == 400
            with pytest.raises(ClientError):
                await client.login("bob", password="s3cret")
            await client.login("ada", password="s3cret")
    finally:
        assert await stop(served) == 0


def _processes_marked(sandbox_id: str) -> list[int]:
    """Live processes whose environment carries the sandbox's marker."""
    needle = f"DESKHIVE_SANDBOX={sandbox_id}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                marked = needle in (entry / "environ").read_bytes()
                zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                continue
            if marked and not zombie:
                found.append(int(entry.name))
    return found


@pytest.mark.local
@pytest.mark.skipif(shutil.which("bwrap") is None or os.geteuid() != 0, reason="needs root and bubblewrap")
async def test_sigterm_kills_every_local_sandbox_process() -> None:
    """SIGTERM with live local desktops and background commands leaves no sandbox process behind."""
    data_dir = fresh_data_dir()
    served = await start("--sandbox", "local", "--data-dir", str(data_dir))
    try:
        async with Client(served.url) as client:
            login = await client.login("sig")
            async with client.connect(login) as conn:
                assert (await conn.result(await conn.send("start_desktop"), timeout=30))["ok"]
                started = await conn.result(await conn.send("run_command", cmd="(sleep 1000 &) ; echo $$"))
                assert started["exit_code"] == 0
            status = await client.call("GET", "/status", token=served.admin)
            sandbox_id = status["sessions"][0]["sandbox_id"]
            assert _processes_marked(sandbox_id), "the test must see the session's processes"
    finally:
        assert await stop(served) == 0
        remove_data_dir(data_dir)
    assert _processes_marked(sandbox_id) == []


def test_a_log_line_to_a_closed_stream_is_dropped_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """With stdout gone (a log collector's pipe closed), logging goes on without raising into the caller."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    cli.configure_logging("info", "json", cache=False)
    stream.close()
    structlog.get_logger("deskhive.test").error("actor.crashed", session_id="s")  # must not raise


def test_a_port_outside_0_to_65535_is_refused_at_parse_time(capsys: pytest.CaptureFixture[str]) -> None:
    """``--port 99999`` stops with a clear message (exit 2), not a traceback."""
    with pytest.raises(SystemExit) as stopped:
        config.parser().parse_args(["serve", "--port", "99999"])
    assert stopped.value.code == 2
    assert "port number from 0 to 65535" in capsys.readouterr().err


async def test_hash_password_refuses_an_empty_password() -> None:
    """An empty password is refused with a message: a hash of none could never log in."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "hash-password", cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(b"\n"), 20)
    assert proc.returncode != 0 and not out
    assert b"empty" in err


def test_every_top_level_module_is_installed_with_the_package() -> None:
    """The installed `deskhive` command can import every module of the tree, not only a checkout can."""
    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"])
    assert {path.stem for path in root.glob("*.py")} == listed
