"""One transaction's streaming writes, gathered and written in a few statements.

The writer thread shares the GIL with the event loop, and every SQLite call
gives the GIL up and waits to get it back, up to a switch interval (5 ms)
while the loop is busy. Written one statement per operation, a burst of
3,000 events took 1.7 s to commit under a busy loop; written here as one
multi-row statement per table (the last write per key winning, where writes
replace each other), a batch costs a handful of calls whatever its size.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

import attrs

#: Rows per multi-row statement (3 parameters each, well under SQLite's 32,766).
_ROWS: Final = 5_000


@attrs.define
class Writes:
    """The streaming operations of one batch, by kind, waiting to be written."""

    events: list[tuple[str, int, bytes]] = attrs.Factory(list)
    #: (session, request) -> added (True) or removed (False): the last one counts.
    pending: dict[tuple[str, Any], bool] = attrs.Factory(dict)
    touched: dict[str, float] = attrs.Factory(dict)
    reserved: dict[str, int] = attrs.Factory(dict)
    #: Newest seq used per session (appended or said by ``sent_seq``).
    used: dict[str, int] = attrs.Factory(dict)

    def add(self, op: tuple[Any, ...]) -> bool:
        """Take a streaming operation; ``False`` if *op* is not one (it must run in order)."""
        kind = op[0]
        if kind == "append":
            self.events.append(op[1:])
            self.used[op[1]] = max(self.used.get(op[1], 0), op[2])
        elif kind == "pending+":
            self.pending[op[1], op[2]] = True
        elif kind == "pending-":
            self.pending[op[1], op[2]] = False
        elif kind == "touch":
            self.touched[op[1]] = op[2]
        elif kind == "reserve":
            self.reserved[op[1]] = max(self.reserved.get(op[1], 0), op[2])
        elif kind == "sent":
            self.used[op[1]] = max(self.used.get(op[1], 0), op[2])
        else:
            return False
        return True

    def flush(self, conn: sqlite3.Connection) -> dict[str, int]:
        """Write everything gathered; return how many events each session got."""
        appended: dict[str, int] = {}
        for sid, _, _ in self.events:
            appended[sid] = appended.get(sid, 0) + 1
        _many(conn, "INSERT OR REPLACE INTO events (session_id, seq, frame) VALUES ", "(?,?,?)", self.events)
        added = [key for key, on in self.pending.items() if on]
        removed = [key for key, on in self.pending.items() if not on]
        _many(conn, "INSERT OR IGNORE INTO pending (session_id, request_id) VALUES ", "(?,?)", added)
        _many(conn, "DELETE FROM pending WHERE (session_id, request_id) IN (VALUES ", "(?,?)", removed, ")")
        _update(conn, "last_active = v.column2", self.touched)
        _update(conn, "seq_reserved = max(seq_reserved, v.column2)", self.reserved)
        _update(conn, "last_seq = max(last_seq, v.column2)", self.used)
        self.events, self.pending = [], {}
        self.touched, self.reserved, self.used = {}, {}, {}
        return appended


def _many(conn: sqlite3.Connection, head: str, row: str, rows: list[Any], tail: str = "") -> None:
    for start in range(0, len(rows), _ROWS):
        chunk = rows[start : start + _ROWS]
        conn.execute(head + ",".join([row] * len(chunk)) + tail, [v for r in chunk for v in r])


def _update(conn: sqlite3.Connection, assignment: str, values: dict[str, Any]) -> None:
    rows = list(values.items())
    for start in range(0, len(rows), _ROWS):
        chunk = rows[start : start + _ROWS]
        conn.execute(
            f"UPDATE sessions SET {assignment} FROM (VALUES {','.join(['(?,?)'] * len(chunk))}) AS v"
            " WHERE sessions.session_id = v.column1",
            [v for r in chunk for v in r],
        )
