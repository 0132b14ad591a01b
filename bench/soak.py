"""The soak of ``make bench``: does a server give back the memory of ended sessions?

Against one ``deskhive serve --sandbox null``, rounds of many sessions in a
row. In each round every session logs in, connects, says hello, pings, and
reconnects (hello with its ``last_seq``, then a ping) every few seconds for
the round's duration; then all log out. The server's VmRSS is read once the
last session has ended (``/healthz`` counts none), and the figure is the
ratio of the second round's to the first's: a server that keeps ended
sessions alive grows by a round's worth each time (goal: within 10%).

The load runs as its own process, on its own core:

    python bench/soak.py --url HTTP [--sessions N] [--seconds S] [--reconnect R]

reads ``round K`` lines on stdin and answers each with one JSON line once
every session of that round has logged out; ``quit`` (or the end of stdin)
ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from typing import Any, Final

import aiohttp
import attrs

#: Logins, hellos and logouts at once: a burst of 1,000 would time out on a busy box.
CONCURRENCY: Final = 50
HTTP_TIMEOUT: Final = aiohttp.ClientTimeout(total=30.0)
REPLY_TIMEOUT_S: Final = 10.0
#: After the round's window, every session gets this long to log out.
LOGOUT_TIMEOUT_S: Final = 60.0


@attrs.define
class Tally:
    """What one round did, for its JSON line."""

    logins: int = 0
    connects: int = 0
    pings: int = 0
    logouts: int = 0
    errors: dict[str, int] = attrs.field(factory=dict)

    def error(self, exc: BaseException) -> None:
        key = f"{type(exc).__name__}: {exc}"[:80]
        self.errors[key] = self.errors.get(key, 0) + 1


@attrs.define
class Soak:
    """One round's shared state: the HTTP client, the gate and the tally."""

    http: aiohttp.ClientSession
    base: str
    gate: asyncio.Semaphore
    until: float
    reconnect: float
    tally: Tally = attrs.field(factory=Tally)

    async def login(self, name: str) -> dict[str, Any]:
        async with self.gate, self.http.post(f"{self.base}/api/sessions", json={"username": name}) as resp:
            if resp.status != 201:
                raise ConnectionError(f"login {resp.status}")
            login: dict[str, Any] = await resp.json()
        self.tally.logins += 1
        return login

    async def visit(self, login: dict[str, Any], last_seq: int, hold: float) -> int:
        """One connection: hello, a ping, then idle for *hold* seconds; the last seq seen."""
        async with self.gate:
            ws = await self.http.ws_connect(login["ws_url"], autoclose=False, max_msg_size=0)
        try:
            await ws.send_str(json.dumps({"type": "hello", "token": login["token"], "last_seq": last_seq}))
            last_seq = max(last_seq, int((await reply(ws, "welcome")).get("seq", 0)))
            await ws.send_str('{"type":"ping","id":"p"}')
            await reply(ws, "pong")
            self.tally.connects += 1
            self.tally.pings += 1
            # Idle as a browser tab does, reading whatever the server sends.
            deadline = time.monotonic() + hold
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await ws.receive(timeout=left)
                except TimeoutError:
                    break
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    raise ConnectionError(f"socket ended: {msg.type.name}")
                last_seq = max(last_seq, int(json.loads(msg.data).get("seq", 0)))
        finally:
            await ws.close()
        return last_seq

    async def logout(self, login: dict[str, Any]) -> None:
        url = f"{self.base}/api/sessions/{login['session_id']}"
        headers = {"Authorization": f"Bearer {login['token']}"}
        async with self.gate, self.http.delete(url, headers=headers) as resp:
            if resp.status != 204:
                raise ConnectionError(f"logout {resp.status}")
        self.tally.logouts += 1

    async def session(self, name: str) -> None:
        try:
            login = await self.login(name)
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            self.tally.error(exc)
            return
        try:
            # Random phases spread the reconnects over the whole period.
            hold, last_seq = random.uniform(0, self.reconnect), 0
            while True:
                hold = min(hold, self.until - time.monotonic())
                last_seq = await self.visit(login, last_seq, hold)
                if time.monotonic() >= self.until:
                    break
                hold = self.reconnect
        except (aiohttp.ClientError, ConnectionError, TimeoutError, ValueError) as exc:
            self.tally.error(exc)
        finally:
            try:
                await self.logout(login)
            except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                self.tally.error(exc)


async def reply(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    """The next frame of type *kind* (journal events before it are skipped)."""
    async with asyncio.timeout(REPLY_TIMEOUT_S):
        while True:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"socket ended before {kind}: {msg.type.name}")
            obj: dict[str, Any] = json.loads(msg.data)
            if obj.get("type") == kind:
                return obj


async def run_round(http: aiohttp.ClientSession, ns: argparse.Namespace, k: int) -> dict[str, Any]:
    start = time.monotonic()
    soak = Soak(http, ns.url.rstrip("/"), asyncio.Semaphore(CONCURRENCY), start + ns.seconds, ns.reconnect)
    async with asyncio.timeout(ns.seconds + LOGOUT_TIMEOUT_S):
        await asyncio.gather(*(soak.session(f"soak{k}x{i}") for i in range(ns.sessions)))
    return {"round": k, "seconds": round(time.monotonic() - start, 2), **attrs.asdict(soak.tally)}


async def serve(ns: argparse.Namespace) -> None:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    # Every session holds a socket at once: the pool must not cap them.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=HTTP_TIMEOUT) as http:
        emit({"ready": True})
        for _ in range(100):  # bounded: run.py sends a few rounds
            line = (await reader.readline()).decode().split()
            if len(line) != 2 or line[0] != "round":
                return
            try:
                emit(await run_round(http, ns, int(line[1])))
            except TimeoutError:
                emit({"error": f"round {line[1]} did not end within {ns.seconds + LOGOUT_TIMEOUT_S:g} s"})


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def raise_descriptor_limit() -> None:
    # One socket per session, all open at once.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="deskhive soak load (see bench/run.py)")
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT of deskhive")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each round")
    parser.add_argument("--reconnect", type=float, default=5.0, help="seconds between reconnects")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise_descriptor_limit()
    asyncio.run(serve(parse()))
