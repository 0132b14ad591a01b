"""A small Python client for deskhive, on aiohttp.

    async with Client("http://127.0.0.1:8080") as client:
        login = await client.login("ada")
        async with client.connect(login) as conn:
            rid = await conn.send("run_command", cmd="echo hi")
            result = await conn.wait_for(lambda e: e["type"] == "result" and e.get("id") == rid)

``Connection`` remembers the newest ``seq`` it saw and drops any event it has
already seen, so after ``resume()`` (a new socket, ``hello {last_seq}``) the
stream it yields has no duplicate and, unless a ``gap`` says so, no hole.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Self

import aiohttp
import attrs

from protocol import codec
from protocol import messages as m
from protocol.closecodes import CloseCode

Event = dict[str, Any]


class ClientError(Exception):
    """The server answered with an error body or an ``error`` frame."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class SessionEnded(ClientError):
    """The server closed the socket because the session ended (4404)."""


@attrs.frozen
class Login:
    session_id: str
    token: str
    ws_url: str
    stream_url: str | None


class Client:
    """HTTP calls of the protocol; ``connect`` opens a WebSocket."""

    def __init__(self, base_url: str, *, http: aiohttp.ClientSession | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http
        self._own_http = http is None

    async def __aenter__(self) -> Self:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._own_http and self._http is not None:
            await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "use 'async with Client(...)'"
        return self._http

    async def call(self, method: str, path: str, *, token: str | None = None, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = codec.dumps(body).encode()
        async with self.http.request(method, self.base_url + path, data=data, headers=headers) as resp:
            data = await resp.json(content_type=None) if resp.status != 204 else None
            if resp.status >= 400:
                err = (data or {}).get("error", {})
                raise ClientError(resp.status, err.get("code", "?"), err.get("message", ""))
            return data

    async def login(self, username: str, **fields: str) -> Login:
        data = await self.call("POST", "/api/sessions", body={"username": username, **fields})
        return Login(data["session_id"], data["token"], data["ws_url"], data.get("stream_url"))

    async def logout(self, login: Login) -> None:
        await self.call("DELETE", f"/api/sessions/{login.session_id}", token=login.token)

    @asynccontextmanager
    async def connect(self, login: Login, *, last_seq: int | None = None) -> AsyncIterator[Connection]:
        conn = Connection(self.http, login)
        try:
            await conn.open(last_seq)
            yield conn
        finally:
            await conn.close()


class Connection:
    """One session's WebSocket, with resume and de-duplication by ``seq``."""

    def __init__(self, http: aiohttp.ClientSession, login: Login) -> None:
        self._http = http
        self.login = login
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.welcome: Event = {}
        self.last_seq = 0
        # Request ids of one socket, unlike any other's: a new socket replays
        # the session's journal, results of earlier sockets' requests included.
        self._prefix = f"c{secrets.token_hex(3)}-"
        self._ids = itertools.count(1)

    async def open(self, last_seq: int | None = None) -> Event:
        """Connect and say hello; return the ``welcome``."""
        self.ws = await self._http.ws_connect(self.login.ws_url, max_msg_size=0)
        await self.ws.send_str(codec.encode_request(m.Hello(token=self.login.token, last_seq=last_seq)))
        welcome = await self._next_frame(timeout=10)
        if welcome.get("type") != "welcome":
            raise ClientError(0, welcome.get("code", "?"), welcome.get("message", str(welcome)))
        self.welcome = welcome
        return welcome

    async def resume(self) -> Event:
        """Reconnect after a drop, asking for every event after ``last_seq``."""
        await self.close()
        return await self.open(self.last_seq)

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()

    async def send(self, type: str, **fields: Any) -> str:
        """Send a request; return its ``id`` (one is made up when not given).

        The codec checks and encodes it as the server will read it, so a
        malformed request raises ``ProtocolError`` here, before it is sent.
        """
        rid = fields.pop("id", None) or f"{self._prefix}{next(self._ids)}"
        msg = codec.from_object({**fields, "type": type, "id": rid})
        if isinstance(msg, m.Hello):
            raise TypeError("hello is sent by open(); send() takes requests")
        return await self.request(msg)

    async def request(self, msg: m.Request) -> str:
        """Send the typed request *msg*; return its ``id`` (made up when it has none)."""
        assert self.ws is not None
        if msg.id is None:
            msg = attrs.evolve(msg, id=f"{self._prefix}{next(self._ids)}")
        await self.ws.send_str(codec.encode_request(msg))
        assert msg.id is not None
        return msg.id

    async def send_raw(self, data: str | bytes) -> None:
        assert self.ws is not None
        if isinstance(data, bytes):
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data)

    async def recv(self, timeout: float = 10.0) -> Event:
        """The next frame not seen before (events with an old ``seq`` are dropped)."""
        while True:
            event = await self._next_frame(timeout)
            seq = event.get("seq")
            if seq is None:
                return event
            if seq > self.last_seq:
                self.last_seq = seq
                return event

    async def wait_for(self, match: Callable[[Event], bool], timeout: float = 10.0) -> Event:
        """The first new frame that *match* accepts, within *timeout* seconds."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.recv(timeout)
                if match(event):
                    return event

    async def result(self, rid: str, timeout: float = 10.0) -> Event:
        """Wait for the ``result`` of request *rid*; raise on an ``error`` frame for it."""
        event = await self.wait_for(
            lambda e: e.get("id") == rid and e["type"] in {"result", "error"}, timeout
        )
        if event["type"] == "error":
            raise ClientError(0, event["code"], event["message"])
        return event

    async def results(self, *rids: str, timeout: float = 10.0) -> dict[str, Event]:
        """Wait for the ``result`` of every request in *rids*, in whatever order they come."""
        found: dict[str, Event] = {}
        async with asyncio.timeout(timeout):
            while len(found) < len(rids):
                event = await self.recv(timeout)
                if event.get("id") in rids and event["type"] in {"result", "error"}:
                    found[event["id"]] = event
        return found

    async def _next_frame(self, timeout: float) -> Event:
        assert self.ws is not None
        msg = await self.ws.receive(timeout=timeout)
        if msg.type is aiohttp.WSMsgType.TEXT:
            event: Event = json.loads(msg.data)
            return event
        # A CLOSE message carries the server's code; close_code may not yet.
        code = msg.data if msg.type is aiohttp.WSMsgType.CLOSE else (self.ws.close_code or 0)
        if code == CloseCode.NOT_FOUND:
            raise SessionEnded(code, "not_found", str(msg.extra or "session ended"))
        raise ClientError(code, "closed", f"socket closed ({msg.type.name}, {msg.extra!r})")
