"""The session logger: structlog events that become ``log`` events in the session's journal."""

from __future__ import annotations

import weakref
from collections.abc import MutableMapping
from typing import Any, Final, Protocol

import structlog

from protocol import messages as m


class Emitter(Protocol):
    """What the sink needs of its actor: somewhere to put an event."""

    def emit(self, event: m.Event) -> None: ...


class _JournalSink:
    """The end of the session logger's chain: log events enter the journal.

    It holds its actor weakly: actor -> logger -> sink -> actor would be a
    cycle that only the cyclic GC frees, once per ended session.
    """

    __slots__ = ("_actor",)

    def __init__(self, actor: Emitter) -> None:
        self._actor = weakref.ref(actor)

    def _log(self, event: m.Log) -> None:
        actor = self._actor()
        if actor is not None:
            actor.emit(event)

    debug = info = warning = error = critical = msg = _log


def _to_log_event(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[m.Log], dict[str, Any]]:
    ts = event_dict.pop("ts")
    level = event_dict.pop("level")
    name = event_dict.pop("event")
    return (m.Log(ts=ts, level=level, event=str(name), fields=dict(event_dict)),), {}


_SessionLogger = structlog.make_filtering_bound_logger(0)
_SESSION_PROCESSORS: Final[list[structlog.typing.Processor]] = [
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    _to_log_event,
]


def journal_logger(actor: Emitter) -> Any:
    """A logger whose events go to *actor*'s journal and sockets (held weakly)."""
    return _SessionLogger(_JournalSink(actor), _SESSION_PROCESSORS, {})  # type: ignore[call-arg]
