"""Load generator for ``bench/run.py``, run as its own process.

Client and server each get a core of their own this way, and the same client
code drives both the echo baseline and deskhive.

    python bench/load.py ping --echo-url WS --deskhive-url HTTP [--plain-url HTTP]
                              [--connections N] [--inflight K]

opens N sockets to each target (for deskhive: one login per socket, usernames
u0..u(N-1), and a hello before anything is timed), prints ``{"ready": ...}``,
then reads commands on stdin, one a line, and answers each with one JSON line
on stdout:

    run echo 5       N sockets keep K pings in flight each for 5 s
    run deskhive 5
    run plain 5      (with --plain-url: deskhive served with --metrics off)
    quit

    python bench/load.py logins --deskhive-url HTTP --count 10000 [--concurrency 50]

times that many ``POST /api/sessions`` (distinct usernames) over keep-alive
connections and prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import deque
from collections.abc import Awaitable, Iterator
from typing import Any, Final, Literal

import aiohttp

Target = Literal["echo", "deskhive", "plain"]
Report = dict[str, Any]

#: What each target answers a ping with: the echo repeats it, deskhive pongs.
REPLY_TYPE: Final[dict[Target, str]] = {"echo": "ping", "deskhive": "pong", "plain": "pong"}
SETUP_TIMEOUT_S: Final = 60.0
#: After a run's window closes, pings still in flight get this long to land.
DRAIN_TIMEOUT_S: Final = 10.0
HTTP_TIMEOUT: Final = aiohttp.ClientTimeout(total=30.0)


def emit(obj: Report) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[index]


# ----------------------------------------------------------------------------
# Ping round trips


class Conn:
    """One socket and its pings: ``drive`` keeps *inflight* of them outstanding."""

    __slots__ = ("name", "sent", "serial", "ws")

    def __init__(self, name: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.name = name
        self.ws = ws
        self.serial = 0
        #: (id, send time) of pings not answered yet, oldest first.
        self.sent: deque[tuple[str, float]] = deque()

    async def ping(self) -> None:
        self.serial += 1
        rid = f"{self.name}.{self.serial}"
        # The same compact text both targets get; deskhive's codec takes it as is.
        self.sent.append((rid, time.perf_counter()))
        await self.ws.send_str('{"type":"ping","id":"' + rid + '"}')

    async def drive(
        self, reply_type: str, start: float, until: float, inflight: int, lat: list[float]
    ) -> int:
        """Ping until *until*; record latencies in *lat*; return replies in the window."""
        for _ in range(inflight):
            await self.ping()
        replies = 0
        while self.sent:
            msg = await self.ws.receive()
            now = time.perf_counter()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"{self.name}: socket ended ({msg.type.name}, {msg.extra!r})")
            obj = json.loads(msg.data)
            if obj.get("type") != reply_type:
                continue  # not an answer to a ping (a journal event, say)
            rid, sent_at = self.sent.popleft()
            if obj.get("id") != rid:
                raise ConnectionError(f"{self.name}: expected a reply to {rid}, got {msg.data[:80]}")
            if start <= now <= until:
                replies += 1
                lat.append(now - sent_at)
            if now < until:
                await self.ping()
        return replies


async def open_echo(http: aiohttp.ClientSession, url: str, n: int) -> list[Conn]:
    async def one(i: int) -> Conn:
        return Conn(f"e{i}", await http.ws_connect(url, autoclose=False, max_msg_size=0))

    return await asyncio.gather(*(one(i) for i in range(n)))


async def open_deskhive(http: aiohttp.ClientSession, base: str, n: int) -> list[Conn]:
    """One session per socket (usernames u0..u(n-1)), each said hello to."""

    async def one(i: int) -> Conn:
        async with http.post(f"{base}/api/sessions", json={"username": f"u{i}"}) as resp:
            if resp.status != 201:
                raise ConnectionError(f"login u{i}: {resp.status} {await resp.text()}")
            login = await resp.json()
        ws = await http.ws_connect(login["ws_url"], autoclose=False, max_msg_size=0)
        await ws.send_str(json.dumps({"type": "hello", "token": login["token"]}))
        welcome = await ws.receive(timeout=10.0)
        if welcome.type is not aiohttp.WSMsgType.TEXT or json.loads(welcome.data).get("type") != "welcome":
            raise ConnectionError(f"hello u{i}: {welcome.data!r}")
        return Conn(f"d{i}", ws)

    return await asyncio.gather(*(one(i) for i in range(n)))


async def run_window(conns: list[Conn], target: Target, seconds: float, inflight: int) -> Report:
    """Every socket pings for *seconds*; report rate, latency and client CPU."""
    lat: list[float] = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    until = start + seconds
    async with asyncio.timeout(seconds + DRAIN_TIMEOUT_S):
        counts = await asyncio.gather(
            *(c.drive(REPLY_TYPE[target], start, until, inflight, lat) for c in conns)
        )
    cpu = time.process_time() - cpu0
    lat.sort()
    replies = sum(counts)
    return {
        "target": target,
        "seconds": seconds,
        "replies": replies,
        "rate": replies / seconds,
        "p50_ms": percentile(lat, 0.50) * 1e3,
        "p99_ms": percentile(lat, 0.99) * 1e3,
        "max_ms": (lat[-1] if lat else float("nan")) * 1e3,
        # CPU seconds per wall second: near 1.0 means the client was the limit.
        "client_cpu": cpu / (time.perf_counter() - start),
    }


async def stdin_lines() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def ping_main(ns: argparse.Namespace) -> None:
    # Sockets hold their connection for good: the pool must not cap them.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=HTTP_TIMEOUT) as http:
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            conns: dict[Target, list[Conn]] = {
                "echo": await open_echo(http, ns.echo_url, ns.connections),
                "deskhive": await open_deskhive(http, ns.deskhive_url.rstrip("/"), ns.connections),
            }
            if ns.plain_url:
                conns["plain"] = await open_deskhive(http, ns.plain_url.rstrip("/"), ns.connections)
        emit({"ready": {k: len(v) for k, v in conns.items()}})
        await serve_commands(conns, ns.inflight)
        await close_all([c.ws.close() for group in conns.values() for c in group])


async def serve_commands(conns: dict[Target, list[Conn]], inflight: int) -> None:
    reader = await stdin_lines()
    # Bounded: run.py sends a handful of commands; stdin closing ends it too.
    for _ in range(1000):
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            return
        if line[0] == "run" and len(line) == 3 and line[1] in conns:
            target: Target = "echo" if line[1] == "echo" else "plain" if line[1] == "plain" else "deskhive"
            emit(await run_window(conns[target], target, float(line[2]), inflight))
        else:
            emit({"error": f"unknown command {line!r}"})


async def close_all(closing: list[Awaitable[Any]]) -> None:
    try:
        async with asyncio.timeout(5.0):
            await asyncio.gather(*closing, return_exceptions=True)
    except TimeoutError:
        pass  # the servers are about to be stopped anyway


# ----------------------------------------------------------------------------
# Logins


async def logins_main(ns: argparse.Namespace) -> None:
    base = ns.deskhive_url.rstrip("/")
    connector = aiohttp.TCPConnector(limit=ns.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=HTTP_TIMEOUT) as http:
        # Open the keep-alive connections before the clock starts.
        await asyncio.gather(*(get_ok(http, f"{base}/healthz") for _ in range(ns.concurrency)))
        names: Iterator[int] = iter(range(ns.count))
        statuses: dict[int, int] = {}
        cpu0, start = time.process_time(), time.perf_counter()
        async with asyncio.timeout(ns.count / 100 + 30):
            await asyncio.gather(
                *(login_worker(http, base, ns.prefix, names, statuses) for _ in range(ns.concurrency))
            )
        seconds = time.perf_counter() - start
        ok = statuses.get(201, 0)
        emit(
            {
                "count": ns.count,
                "ok": ok,
                "statuses": {str(k): v for k, v in statuses.items()},
                "seconds": seconds,
                "rate": ok / seconds,
                "client_cpu": (time.process_time() - cpu0) / seconds,
            }
        )


async def get_ok(http: aiohttp.ClientSession, url: str) -> None:
    async with http.get(url) as resp:
        await resp.read()


async def login_worker(
    http: aiohttp.ClientSession, base: str, prefix: str, names: Iterator[int], statuses: dict[int, int]
) -> None:
    # One shared iterator: each worker takes the next username when it is free.
    for i in names:
        async with http.post(f"{base}/api/sessions", json={"username": f"{prefix}{i}"}) as resp:
            await resp.read()
            statuses[resp.status] = statuses.get(resp.status, 0) + 1


# ----------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    top = argparse.ArgumentParser(description="deskhive load generator (see bench/run.py)")
    sub = top.add_subparsers(dest="mode", required=True)
    ping = sub.add_parser("ping")
    ping.add_argument("--echo-url", required=True, help="ws://127.0.0.1:PORT/ws of the echo baseline")
    ping.add_argument("--deskhive-url", required=True, help="http://127.0.0.1:PORT of deskhive")
    ping.add_argument("--plain-url", default="", help="http://127.0.0.1:PORT of deskhive with --metrics off")
    ping.add_argument("--connections", type=int, default=100)
    ping.add_argument("--inflight", type=int, default=4)
    logins = sub.add_parser("logins")
    logins.add_argument("--deskhive-url", required=True)
    logins.add_argument("--count", type=int, default=10_000)
    logins.add_argument("--concurrency", type=int, default=50)
    logins.add_argument("--prefix", default="m")
    return top.parse_args(argv)


def main() -> None:
    ns = parse()
    asyncio.run(ping_main(ns) if ns.mode == "ping" else logins_main(ns))


if __name__ == "__main__":
    main()
