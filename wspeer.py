"""The frame writer between a session and one WebSocket: batched, measured, bounded.

``WsPeer`` frames text messages itself (RFC 6455 §5.2, one shared payload
per broadcast) and collects them until the end of the current event-loop
turn, then writes them with one ``writelines``: a burst of replies costs one
system call, a broadcast never yields halfway, and every socket of a session
gets its frames in ``seq`` order. Error replies take the same path, so
nothing overtakes an event.

Two bounds keep a slow or silent client from costing memory:

- A socket with more than ``MAX_UNSENT_BYTES`` unsent (queued here or in the
  transport, not yet taken by the OS) is closed with 1008; its client resumes
  from its ``last_seq``.
- A socket that is behind (a replay after ``hello``) is not sent the journal
  at once: it reads the next ``REPLAY_CHUNK_BYTES`` from the journal each
  time its transport drains, and follows live events once caught up. Live
  events meanwhile wait in the journal, so order holds and nothing repeats;
  those that leave the journal before the socket reads them become a ``gap``.

The slow paths (the rest of a replay, the close after an overflow) run in
:meth:`WsPeer.run`, a task the socket's handler owns.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Final

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from actors.journal import Journal
from metrics import Metrics
from protocol import codec
from protocol import messages as m
from protocol.closecodes import CloseCode
from protocol.errors import GatewayError

logger = structlog.get_logger("deskhive.wspeer")

#: More unsent than this and the socket is closed with 1008.
MAX_UNSENT_BYTES: Final = 4 * 1024 * 1024
#: How much of a replay is queued before waiting for the transport to drain.
REPLAY_CHUNK_BYTES: Final = 256 * 1024
#: A close handshake gets this long before the connection is cut.
CLOSE_TIMEOUT_S: Final = 5.0
#: A socket behind on its replay that takes no data for this long is dropped;
#: the heartbeat (30 s) normally ends such a socket first.
STALL_TIMEOUT_S: Final = 90.0
#: The longest close reason RFC 6455 allows (125 bytes less the 2-byte code).
_MAX_REASON_BYTES: Final = 123


def ws_header(length: int) -> bytes:
    """The header of an unmasked final text frame of *length* bytes (RFC 6455 §5.2)."""
    if length < 126:
        return struct.pack("!BB", 0x81, length)
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)


def close_reason(reason: str) -> bytes:
    """*reason* as UTF-8 cut to the close frame's limit, never inside a character."""
    return reason.encode()[:_MAX_REASON_BYTES].decode(errors="ignore").encode()


class WsPeer:
    """A WebSocket as the actor sees it: ``deliver`` and ``notify`` never suspend."""

    __slots__ = (
        "__weakref__",
        "_closing",
        "_journal",
        "_live",
        "_loop",
        "_metrics",
        "_next_seq",
        "_pending",
        "_pending_bytes",
        "_pump",
        "_pump_closing",
        "_transport",
        "_wake",
        "_writer",
        "_ws",
        "max_unsent",
        "remote",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        writer: AbstractStreamWriter,
        *,
        max_unsent: int = MAX_UNSENT_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        if ws.compress:
            # Frames are written here, past aiohttp's compressor.
            raise ValueError("WsPeer needs a WebSocketResponse made with compress=False")
        self._ws = ws
        self._writer = writer
        self._transport = request.transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.max_unsent = max_unsent
        #: Frames written are counted once per batch (``frames_sent``).
        self._metrics = metrics
        self.remote = request.remote
        self._journal: Journal | None = None
        self._next_seq = 1
        self._live = True
        self._wake = asyncio.Event()
        self._closing: tuple[int, str] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._pump_closing = False

    @property
    def unsent_bytes(self) -> int:
        """Bytes queued for this socket that the OS has not accepted yet."""
        transport = self._transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self._pending_bytes + buffered

    @property
    def closing(self) -> bool:
        """Whether the socket is being closed (after an overflow, a stall or a close call)."""
        return self._closing is not None

    @property
    def live(self) -> bool:
        """Whether the socket is caught up and gets events as they happen."""
        return self._live

    def _open(self) -> bool:
        transport = self._transport
        return not (
            self._closing is not None or transport is None or transport.is_closing() or self._ws.closed
        )

    # ------------------------------------------------------------------
    # Called by the session actor (never suspends)

    def deliver(self, frame: bytes) -> bool:
        if not self._open():
            return False
        if self.unsent_bytes > self.max_unsent:
            self._overflow()
            return False
        self._queue(frame)
        return True

    def follow(self, journal: Journal, last_seq: int) -> None:
        self._journal = journal
        self._next_seq = min(last_seq, journal.last_seq) + 1
        self._live = False
        # The first part goes out at once: a short replay is over before
        # anything else can happen, as it always was.
        self._catch_up()

    def notify(self, seq: int, frame: bytes) -> bool:
        if not self._open():
            return False
        if not self._live:
            self._wake.set()  # the pump reads it from the journal in its turn
            return True
        self._next_seq = seq + 1
        return self.deliver(frame)

    def send_error(self, exc: GatewayError) -> None:
        self.deliver(codec.encode(codec.error_for(exc)))

    # ------------------------------------------------------------------
    # Writing

    def _queue(self, frame: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending += (ws_header(len(frame)), frame)
        self._pending_bytes += len(frame)

    def flush(self) -> None:
        """Write what was collected (dropped if the socket closed since)."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        transport = self._transport
        if pending and transport is not None and not transport.is_closing() and not self._ws.closed:
            transport.writelines(pending)
            if self._metrics is not None:
                self._metrics.frames_sent += len(pending) >> 1  # a header and a payload per frame

    def _catch_up(self) -> None:
        """Queue the next part of the replay; go live once nothing is left."""
        journal = self._journal
        assert journal is not None
        batch = journal.read(self._next_seq, max(1, REPLAY_CHUNK_BYTES - self.unsent_bytes))
        if batch.gap is not None:
            self._queue(codec.encode(m.Gap(from_seq=batch.gap[0], to_seq=batch.gap[1])))
        for frame in batch.frames:
            self._queue(frame)
        self._next_seq = batch.next_seq
        self._live = batch.next_seq > journal.last_seq
        if not self._live:
            self._wake.set()

    def _overflow(self) -> None:
        logger.warning("ws.slow_peer_closed", peer=self.remote, unsent_bytes=self.unsent_bytes)
        self._closing = (CloseCode.POLICY_VIOLATION, "too much unsent data: resume from your last seq")
        self._wake.set()

    # ------------------------------------------------------------------
    # The slow paths, in a task the socket's handler owns

    async def run(self) -> None:
        """Send the rest of a replay as the socket drains; close the socket on overflow."""
        self._pump = asyncio.current_task()
        # Waits for news only: the handler cancels this task (stop()) when the
        # socket ends, so the wait is as long as the socket lives.
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._closing is not None:
                break
            if self._live or not self._open():
                continue
            await self._drained()
            if self._open():  # not closed or overflowed while it drained
                self._catch_up()
            await asyncio.sleep(0)  # a fast link never holds the loop for a whole replay
        self._pump_closing = True
        await self.close(*self._closing)

    async def _drained(self) -> None:
        self.flush()
        try:
            async with asyncio.timeout(STALL_TIMEOUT_S):
                await self._writer.drain()
        except TimeoutError:
            logger.warning("ws.stalled_peer_closed", peer=self.remote, unsent_bytes=self.unsent_bytes)
            self._closing = (CloseCode.POLICY_VIOLATION, "the socket took no data for too long")
            self._wake.set()
        except ConnectionError:
            self._wake.set()  # the socket is gone; the handler ends

    def stop(self) -> None:
        """The handler is done with the socket: end the pump, unless it is closing the socket."""
        if self._pump is not None and not self._pump_closing:
            self._pump.cancel("the socket ended")
        self.release()

    def release(self) -> None:
        """Cut the connection later if the client never takes what is still queued."""
        transport = self._transport
        if transport is not None and transport.get_write_buffer_size():
            self._loop.call_later(CLOSE_TIMEOUT_S, transport.abort)

    async def close(self, code: int, reason: str, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Close with *code* after what is queued; cut the connection if that takes over *timeout*."""
        if self._closing is None:
            self._closing = (code, reason)
        self.flush()
        try:
            async with asyncio.timeout(timeout):
                await self._ws.close(code=code, message=close_reason(reason))
        except TimeoutError:
            logger.info("ws.close_timeout", peer=self.remote, code=code)
            self.abort()
        except asyncio.CancelledError:
            self.abort()
            raise
        else:
            self.release()

    def abort(self) -> None:
        """Drop the connection at once, with whatever it still had queued."""
        self._pending, self._pending_bytes = [], 0
        if self._transport is not None:
            self._transport.abort()
