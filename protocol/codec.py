"""The one place JSON is touched: frames to typed messages and back.

Every field of every client message is validated here and nowhere else.
A frame that is not valid raises a :class:`~protocol.errors.ProtocolError`
subclass whose ``code`` is the protocol's error code and whose
``request_id`` is the frame's ``id`` when that much could be read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

from protocol import messages as m
from protocol.errors import BadJSON, FrameTooLarge, GatewayError, ProtocolError, UnknownType

MAX_FRAME_BYTES: Final = 64 * 1024
MAX_ID_CHARS: Final = 64
MAX_TOKEN_CHARS: Final = 512
MAX_TEXT_CHARS: Final = 32 * 1024
MAX_PACKAGES: Final = 64
MAX_TIMEOUT_S: Final = 86_400.0

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads

# --------------------------------------------------------------------------
# Field readers: each takes the frame object and a key, returns the value.

Reader = Callable[[Mapping[str, Any], str], Any]


def _bad(key: str, what: str) -> ProtocolError:
    return ProtocolError(f"field {key!r} must be {what}")


def _text(max_chars: int, *, required: bool = True, nonempty: bool = True) -> Reader:
    def read(obj: Mapping[str, Any], key: str) -> str | None:
        value = obj.get(key)
        if value is None:
            if required:
                raise ProtocolError(f"field {key!r} is required")
            return None
        if not isinstance(value, str):
            raise _bad(key, "a string")
        if nonempty and not value.strip():
            raise _bad(key, "a non-empty string")
        if "\x00" in value:
            # Text ends up in argv, a shell or a model prompt: none takes NUL.
            raise _bad(key, "text without NUL characters")
        if len(value) > max_chars:
            raise _bad(key, f"at most {max_chars} characters")
        return value

    return read


def _seq(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(key, "an integer >= 0")
    return value


def _timeout(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(key, "a number of seconds")
    if not 0 < value <= MAX_TIMEOUT_S:
        raise _bad(key, f"between 0 and {MAX_TIMEOUT_S:g} seconds")
    return float(value)


def _packages(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_PACKAGES:
        raise _bad(key, f"a list of at most {MAX_PACKAGES} package names")
    for name in value:
        if not isinstance(name, str) or not _is_package_name(name):
            raise _bad(key, "a list of package names ([A-Za-z0-9._+-], 1-128 characters)")
    return tuple(value)


def _is_package_name(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-=<>")
    return 0 < len(name) <= 128 and name[0].isalnum() and set(name) <= allowed


_id = _text(MAX_ID_CHARS, required=False)

#: type tag -> (class, {field: reader}); unknown fields are ignored.
_SCHEMA: Final[dict[str, tuple[type[m.ClientMessage], dict[str, Reader]]]] = {
    "hello": (m.Hello, {"token": _text(MAX_TOKEN_CHARS), "last_seq": _seq}),
    "start_desktop": (m.StartDesktop, {"id": _id}),
    "setup_environment": (m.SetupEnvironment, {"id": _id, "packages": _packages}),
    "run_command": (
        m.RunCommand,
        {"id": _id, "cmd": _text(MAX_TEXT_CHARS), "timeout": _timeout},
    ),
    "run_task": (m.RunTask, {"id": _id, "query": _text(MAX_TEXT_CHARS)}),
    "run_workflow": (
        m.RunWorkflow,
        {
            "id": _id,
            "workflow": _text(MAX_ID_CHARS, required=False),
            "query": _text(MAX_TEXT_CHARS, required=False),
        },
    ),
    "cancel": (m.Cancel, {"id": _id, "target": _text(MAX_ID_CHARS)}),
    "kill_desktop": (m.KillDesktop, {"id": _id}),
    "clear_logs": (m.ClearLogs, {"id": _id}),
    "get_state": (m.GetState, {"id": _id}),
    "screenshot": (m.Screenshot, {"id": _id}),
    "ping": (m.Ping, {"id": _id}),
}

MESSAGE_TYPES: Final = frozenset(_SCHEMA)


def check_size(raw: str | bytes) -> None:
    """Raise ``FrameTooLarge`` for a frame over 64 KiB of UTF-8."""
    # A str of n characters is at most 4n bytes: only measure when it matters.
    if len(raw) > MAX_FRAME_BYTES or (
        isinstance(raw, str) and 4 * len(raw) > MAX_FRAME_BYTES and len(raw.encode()) > MAX_FRAME_BYTES
    ):
        raise FrameTooLarge(f"frame is over {MAX_FRAME_BYTES} bytes")


def decode(raw: str | bytes) -> m.ClientMessage:
    """Turn one text frame into a typed client message."""
    check_size(raw)
    try:
        obj = _loads(raw)
    except (ValueError, RecursionError):
        raise BadJSON("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame must be a JSON object")
    if obj.get("type") == "ping":
        # The hot path (heartbeats, benchmarks): a valid ping skips the schema walk.
        rid = obj.get("id")
        if rid is None or (type(rid) is str and 0 < len(rid) <= MAX_ID_CHARS and not rid.isspace()):
            return m.Ping(id=rid)
    return from_object(obj)


def from_object(obj: Mapping[str, Any]) -> m.ClientMessage:
    """Build a typed client message from an already parsed JSON object."""
    request_id = obj.get("id")
    request_id = request_id if isinstance(request_id, str) and len(request_id) <= MAX_ID_CHARS else None
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("frame needs a string field 'type'", request_id=request_id)
    try:
        cls, fields = _SCHEMA[kind]
    except KeyError:
        raise UnknownType(f"unknown message type {kind[:64]!r}", request_id=request_id) from None
    try:
        return cls(**{key: read(obj, key) for key, read in fields.items()})
    except ProtocolError as exc:
        exc.request_id = request_id
        raise


def request_to_object(msg: m.ClientMessage) -> dict[str, Any]:
    """The JSON object of a client message (what clients send)."""
    kind = next(tag for tag, (cls, _) in _SCHEMA.items() if isinstance(msg, cls))
    obj: dict[str, Any] = {"type": kind}
    for key in _SCHEMA[kind][1]:
        value = getattr(msg, key)
        if value is not None and value != ():
            obj[key] = list(value) if isinstance(value, tuple) else value
    return obj


# --------------------------------------------------------------------------
# Server to client


def encode_event(event: m.Event, seq: int) -> bytes:
    """A journal event with its sequence number, as UTF-8 JSON."""
    return _dumps(_event_object(event, seq)).encode()


def _event_object(event: m.Event, seq: int) -> dict[str, Any]:
    obj: dict[str, Any]
    match event:
        case m.Log(ts=ts, level=level, event=name, fields=fields):
            obj = {"type": "log", "seq": seq, "ts": ts, "level": level, "event": name}
            for key, value in fields.items():
                obj.setdefault(key, value)
            return obj
        case m.Output(id=rid, stream=stream, data=data):
            return {"type": "output", "seq": seq, "id": rid, "stream": stream, "data": data}
        case m.State():
            obj = {
                "type": "state",
                "seq": seq,
                "state": event.state,
                "stream_url": event.stream_url,
                "current_command": event.current_command,
                "running_id": event.running_id,
            }
            if event.id is not None:
                obj["id"] = event.id
            return obj
        case m.Result():
            return _result_object(event, seq)


def _result_object(event: m.Result, seq: int) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": "result", "seq": seq, "id": event.id, "ok": event.ok}
    if event.exit_code is not None:
        obj["exit_code"] = event.exit_code
    if event.data is not None:
        obj["data"] = event.data
    if event.error_code is not None:
        obj["error"] = {"code": event.error_code, "message": event.error_message or ""}
    return obj


def encode(msg: m.ServerMessage) -> bytes:
    """A reply that is not journaled (welcome, ack, pong, gap, error)."""
    match msg:
        case m.Pong(id=rid):
            return b'{"type":"pong","id":' + _dumps(rid).encode() + b"}"
        case m.Ack(id=rid):
            obj: dict[str, Any] = {"type": "ack", "id": rid}
        case m.Gap(from_seq=lo, to_seq=hi):
            obj = {"type": "gap", "from_seq": lo, "to_seq": hi}
        case m.Error(code=code, message=message, id=rid):
            obj = {"type": "error", "code": code, "message": message}
            if rid is not None:
                obj["id"] = rid
        case m.Welcome():
            obj = {
                "type": "welcome",
                "session_id": msg.session_id,
                "username": msg.username,
                "state": msg.state,
                "stream_url": msg.stream_url,
                "seq": msg.seq,
                "resumed": msg.resumed,
            }
    return _dumps(obj).encode()


def error_for(exc: GatewayError) -> m.Error:
    """The ``error`` frame that tells a client about *exc*."""
    return m.Error(code=exc.code, message=exc.message, id=exc.request_id)


def error_body(exc: GatewayError) -> dict[str, Any]:
    """The HTTP error body for *exc*."""
    return {"error": {"code": exc.code, "message": exc.message}}


def dumps(obj: Any) -> str:
    """Compact JSON text, for HTTP bodies."""
    return _dumps(obj)


def loads(raw: str | bytes) -> Any:
    """Parse JSON text, raising ``BadJSON`` when it is not."""
    try:
        return _loads(raw)
    except (ValueError, RecursionError):
        raise BadJSON("body is not valid JSON") from None
