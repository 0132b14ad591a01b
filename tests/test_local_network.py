"""A local sandbox's network is its own: outbound only, never the host's loopback or another session."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from protocol.errors import SandboxBroken
from sandboxes.local import LocalSandbox, network
from sandboxes.local.jail import HOME
from sandboxes.local.procs import wait_gone
from tests.conftest import StartServer
from tests.test_local_sandbox import Output, run

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None or shutil.which("slirp4netns") is None,
    reason="bubblewrap or slirp4netns is not installed",
)

Make = Callable[..., LocalSandbox]
#: A client run inside the jail: "open" when it could connect to argv's address, else the error.
PROBE = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
    "    print('open')\n"
    "except OSError as exc:\n"
    "    print('closed', exc)\n"
)


async def probe(sandbox: LocalSandbox, host: str, port: int) -> str:
    """``open`` if a command of *sandbox* can connect to *host*:*port*, else ``closed ...``."""
    code, out = await run(sandbox, f"/usr/bin/python3 -c {_quote(PROBE)} {host} {port}")
    assert code == 0, out.text()
    return out.text("stdout").strip()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def host_address() -> str | None:
    """The host's own IPv4 address on its default route, if it has one that is not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect(("203.0.113.1", 9))  # a documentation address: nothing is sent
        except OSError:
            return None
        address = str(udp.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


class Listener:
    """A TCP server on the host that counts connections and greets each one."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0

    async def _greet(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.write(b"hello from the host\n")
        await writer.drain()
        writer.close()


Listen = Callable[[str], Awaitable[Listener]]


@pytest.fixture
async def listen() -> AsyncIterator[Listen]:
    """Start greeting servers on the host's addresses; all closed after the test."""
    servers: list[asyncio.Server] = []

    async def start(host: str) -> Listener:
        listener = Listener()
        srv = await asyncio.start_server(listener._greet, host, 0)
        servers.append(srv)
        listener.port = srv.sockets[0].getsockname()[1]
        return listener

    yield start
    for srv in servers:
        srv.close()
        await srv.wait_closed()


async def test_without_the_network_only_lo_and_nothing_outside(make: Make, listen: Listen) -> None:
    """A session without --sandbox-network has only lo: not even the host's own address answers."""
    address = host_address()
    sandbox = make("ada")
    _, out = await run(sandbox, "cat /proc/net/dev")
    assert {line.split(":")[0].strip() for line in out.text().splitlines()[2:]} == {"lo"}
    if address is not None:
        listener = await listen(address)
        assert (await probe(sandbox, address, listener.port)).startswith("closed")
        assert listener.accepted == 0


async def test_a_networked_session_has_its_own_interface_route_and_resolver(make: Make) -> None:
    """With the network, the jail has tap0 and slirp4netns's resolver, not the host's eth0 or resolv.conf."""
    sandbox = make("ada", network=True)
    code, out = await run(
        sandbox, "cat /proc/net/dev; echo ==; cat /proc/net/route; echo ==; cat /etc/resolv.conf"
    )
    assert code == 0, out.text()
    links, routes, resolv = out.text("stdout").split("==\n")
    assert {line.split(":")[0].strip() for line in links.splitlines()[2:]} == {"lo", "tap0"}
    default = next(line.split() for line in routes.splitlines()[1:] if line.split()[1] == "00000000")
    assert default[0] == "tap0"
    assert [line.split() for line in resolv.splitlines() if line.startswith("nameserver")] == [
        ["nameserver", network.RESOLVER]
    ]


async def test_a_networked_session_reaches_an_outside_address(make: Make, listen: Listen) -> None:
    """Outbound works: a server on the host's non-loopback address answers a session's command."""
    address = host_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to stand for the outside")
    listener = await listen(address)
    sandbox = make("ada", network=True)
    script = (
        f"import socket; print(socket.create_connection(('{address}', {listener.port}), timeout=5).recv(64))"
    )
    code, out = await run(sandbox, f"/usr/bin/python3 -c {_quote(script)}")
    assert code == 0, out.text()
    assert "hello from the host" in out.text("stdout")
    assert listener.accepted == 1


async def test_a_networked_session_cannot_reach_the_servers_loopback(
    make: Make, start_server: StartServer
) -> None:
    """The deskhive server on the host's 127.0.0.1 is out of reach, directly and through the gateway."""
    test_server, _ = await start_server()
    port = test_server.port
    assert port is not None
    sandbox = make("ada", network=True)
    script = (
        "import urllib.request, sys\n"
        "for host in ('127.0.0.1', sys.argv[1]):\n"
        "    try:\n"
        "        urllib.request.urlopen(f'http://{host}:{sys.argv[2]}/healthz', timeout=3)\n"
        "        print('reached', host)\n"
        "    except OSError as exc:\n"
        "        print('refused', host, exc)\n"
    )
    code, out = await run(sandbox, f"/usr/bin/python3 -c {_quote(script)} {network.GATEWAY} {port}")
    assert code == 0, out.text()
    lines = out.text("stdout").splitlines()
    assert [line.split()[:2] for line in lines] == [["refused", "127.0.0.1"], ["refused", network.GATEWAY]]


async def test_one_session_cannot_reach_anothers_listening_port(make: Make) -> None:
    """Session B reaches nothing of session A's web server, which A itself can use."""
    a, b = make("ada", network=True), make("bob", network=True)
    out_a = Output()
    serve = "cd ~ && echo ada-file > mine.txt && exec /usr/bin/python3 -u -m http.server 8765 --bind 0.0.0.0"
    job = asyncio.create_task(a.run(serve, timeout=60, on_output=out_a))
    try:
        async with asyncio.timeout(10):
            await out_a.wait_for("Serving HTTP")
        assert await probe(a, "127.0.0.1", 8765) == "open"
        for host in ("127.0.0.1", network.GATEWAY, network.GUEST, *filter(None, [host_address()])):
            assert (await probe(b, host, 8765)).startswith("closed"), host
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)


async def test_setup_never_runs_a_planted_python3(make: Make) -> None:
    """A python3 the session put first on its PATH is not what setup's pip step runs."""
    sandbox = make("ada", network=True)
    planted = Path(sandbox.home) / ".local" / "bin" / "python3"
    code, _ = await run(
        sandbox,
        f"mkdir -p {HOME}/.local/bin && cd {HOME}/.local/bin"
        f' && printf "#!/bin/sh\\ntouch {HOME}/planted-ran\\n" > python3 && chmod +x python3',
    )
    assert code == 0 and planted.exists()
    steps: list[dict[str, object]] = []
    with pytest.raises(SandboxBroken, match="pip:deskhive-no-such-package"):
        await sandbox.setup(
            ["pip:deskhive-no-such-package"], lambda event, **f: steps.append({"e": event, **f})
        )
    assert not (Path(sandbox.home) / "planted-ran").exists()
    (pip,) = [s for s in steps if s.get("manager") == "pip"]
    assert pip["status"] == "failed" and pip["exit_code"] != 0


async def test_pip_without_the_network_fails_saying_why(make: Make) -> None:
    """Without --sandbox-network a pip package fails at once, saying the server gives sandboxes no network."""
    sandbox = make("ada")
    steps: list[dict[str, object]] = []
    with pytest.raises(SandboxBroken, match="gives its sandboxes none") as caught:
        await sandbox.setup(["pip:cowsay"], lambda event, **f: steps.append({"e": event, **f}))
    assert "pip:cowsay" in str(caught.value)
    (pip,) = [s for s in steps if s.get("manager") == "pip"]
    assert pip["status"] == "failed" and "--sandbox-network" in str(pip["reason"])


def slirps() -> list[int]:
    """Pids of the slirp4netns processes this server started."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, _, rest = stat.partition(" (")[2].rpartition(") ")
        if comm == "slirp4netns" and rest.split()[1] == me and rest.split()[0] not in "ZX":
            found.append(int(entry.name))
    return found


async def test_the_network_ends_with_its_jail(make: Make) -> None:
    """A jail's slirp4netns runs in the session's cgroup while the jail does, and is gone once it closes."""
    before = set(slirps())
    sandbox = make("ada", network=True)
    assert (await run(sandbox, "true"))[0] == 0
    mine = set(slirps()) - before
    assert len(mine) == 1
    assert sandbox.jail is not None
    if sandbox.jail.cgroup is not None:  # its work for the session counts toward the session's bounds
        assert mine <= sandbox.jail.cgroup.pids()
    await sandbox.close()
    await wait_gone(list(mine), 5)
    assert not mine & set(slirps())
