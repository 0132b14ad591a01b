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

from protocol import fields as f
from protocol import messages as m
from protocol.errors import BadJSON, FrameTooLarge, GatewayError, ProtocolError, UnknownType

MAX_FRAME_BYTES: Final = f.MAX_FRAME_BYTES
MAX_ID_CHARS: Final = f.MAX_LABEL_CHARS
MAX_TOKEN_CHARS: Final = f.MAX_TOKEN_CHARS
MAX_TEXT_CHARS: Final = f.MAX_TEXT_CHARS
MAX_PACKAGES: Final = f.MAX_PACKAGES
MAX_TIMEOUT_S: Final = f.MAX_TIMEOUT_S

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
#: For text holding a lone surrogate: valid JSON that UTF-8 cannot carry
#: unless it is escaped (``\ud800``), which ``ensure_ascii`` does.
_dumps_ascii = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads

# --------------------------------------------------------------------------
# Field readers: each takes the frame object and a key, returns the value.
# What each kind of field may hold is protocol.fields' to say.

Reader = Callable[[Mapping[str, Any], str], Any]


def _bad(key: str, what: str) -> ProtocolError:
    return ProtocolError(f"field {key!r} must be {what}")


def _string(obj: Mapping[str, Any], key: str, max_chars: int, *, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ProtocolError(f"field {key!r} is required")
        return None
    if not isinstance(value, str):
        raise _bad(key, "a string")
    if not value.strip():
        raise _bad(key, "a non-empty string")
    if len(value) > max_chars:
        raise _bad(key, f"at most {max_chars} characters")
    return value


def _label(max_chars: int, *, required: bool = True) -> Reader:
    """Only compared, echoed or hashed (ids, targets, the hello's token): any non-blank string."""

    def read(obj: Mapping[str, Any], key: str) -> str | None:
        return _string(obj, key, max_chars, required=required)

    return read


def _text(*, required: bool = True) -> Reader:
    """Bound for the sandbox, a model or the desktop: what they can take."""

    def read(obj: Mapping[str, Any], key: str) -> str | None:
        value = _string(obj, key, MAX_TEXT_CHARS, required=required)
        problem = None if value is None else f.text_problem(value)
        if problem is not None:
            raise _bad(key, problem)
        return value

    return read


def _name(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not f.is_name(value):
        raise _bad(key, f"a name matching {f.NAME.pattern}")
    return str(value)


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
        raise _bad(key, f"a list of at most {MAX_PACKAGES} packages")
    for name in value:
        if not f.is_package(name):
            raise ProtocolError(f"{key!r} holds {repr(name)[:80]}, which is not {f.DESCRIBE_PACKAGE}")
    return tuple(value)


_id = _label(MAX_ID_CHARS, required=False)

#: type tag -> (class, {field: reader}); unknown fields are ignored.
_SCHEMA: Final[dict[str, tuple[type[m.ClientMessage], dict[str, Reader]]]] = {
    # The token is only hashed and looked up: a malformed one is just wrong (4401).
    "hello": (m.Hello, {"token": _label(MAX_TOKEN_CHARS), "last_seq": _seq}),
    "start_desktop": (m.StartDesktop, {"id": _id}),
    "setup_environment": (m.SetupEnvironment, {"id": _id, "packages": _packages}),
    "run_command": (m.RunCommand, {"id": _id, "cmd": _text(), "timeout": _timeout}),
    "run_task": (m.RunTask, {"id": _id, "query": _text()}),
    "run_workflow": (m.RunWorkflow, {"id": _id, "workflow": _name, "query": _text(required=False)}),
    "cancel": (m.Cancel, {"id": _id, "target": _label(MAX_ID_CHARS)}),
    "kill_desktop": (m.KillDesktop, {"id": _id}),
    "clear_logs": (m.ClearLogs, {"id": _id}),
    "get_state": (m.GetState, {"id": _id}),
    "screenshot": (m.Screenshot, {"id": _id}),
    "launch": (m.Launch, {"id": _id, "app": _text(), "url": _text(required=False)}),
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


def encode_request(msg: m.ClientMessage) -> str:
    """The text frame a client sends for *msg*."""
    return dumps(request_to_object(msg))


# --------------------------------------------------------------------------
# Server to client. Every encoder gives valid UTF-8 JSON whatever text it is
# handed: a client's lone surrogate comes back escaped, never as a crash.


def _utf8(obj: Any) -> bytes:
    try:
        return _dumps(obj).encode()
    except UnicodeEncodeError:
        return _dumps_ascii(obj).encode()


def encode_event(event: m.Event, seq: int) -> bytes:
    """A journal event with its sequence number, as UTF-8 JSON."""
    return _utf8(_event_object(event, seq))


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
                "idle_timeout": event.idle_timeout,
                "idle_seconds": event.idle_seconds,
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
    obj: dict[str, Any]
    match msg:
        case m.Pong(id=rid):
            try:
                return b'{"type":"pong","id":' + _dumps(rid).encode() + b"}"
            except UnicodeEncodeError:
                obj = {"type": "pong", "id": rid}
        case m.Ack(id=rid):
            obj = {"type": "ack", "id": rid}
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
                "role": msg.role,
                "idle_timeout": msg.idle_timeout,
                "idle_seconds": msg.idle_seconds,
            }
    return _utf8(obj)


def error_for(exc: GatewayError) -> m.Error:
    """The ``error`` frame that tells a client about *exc*."""
    return m.Error(code=exc.code, message=exc.message, id=exc.request_id)


def error_body(exc: GatewayError) -> dict[str, Any]:
    """The HTTP error body for *exc*."""
    return {"error": {"code": exc.code, "message": exc.message}}


def dumps(obj: Any) -> str:
    """Compact JSON text that UTF-8 can carry, for HTTP bodies and client frames."""
    text = _dumps(obj)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return _dumps_ascii(obj)
    return text


def loads(raw: str | bytes) -> Any:
    """Parse JSON text, raising ``BadJSON`` when it is not."""
    try:
        return _loads(raw)
    except (ValueError, RecursionError):
        raise BadJSON("body is not valid JSON") from None
