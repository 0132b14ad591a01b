"""The codec: frames to typed messages, with every field checked."""

from __future__ import annotations

import json

import pytest

from protocol import codec
from protocol import messages as m
from protocol.errors import BadJSON, FrameTooLarge, ProtocolError, UnknownType


def test_decodes_every_request_type() -> None:
    """Each message type of the protocol decodes to its own class."""
    frames = {
        "hello": {"token": "t", "last_seq": 3},
        "start_desktop": {},
        "setup_environment": {"packages": ["cowsay", "numpy==2.0"]},
        "run_command": {"cmd": "ls", "timeout": 5},
        "run_task": {"query": "open a browser"},
        "run_workflow": {"workflow": "default", "query": "q"},
        "cancel": {"target": "r1"},
        "kill_desktop": {},
        "clear_logs": {},
        "get_state": {},
        "screenshot": {},
        "ping": {},
    }
    for kind, fields in frames.items():
        msg = codec.decode(json.dumps({"type": kind, "id": "a", **fields}))
        assert codec.request_to_object(msg)["type"] == kind


def test_run_command_fields_are_typed() -> None:
    """A run_command keeps its command, id and timeout as given."""
    msg = codec.decode('{"type":"run_command","id":"x1","cmd":"echo hi","timeout":2.5}')
    assert msg == m.RunCommand(id="x1", cmd="echo hi", timeout=2.5)


@pytest.mark.parametrize(
    ("frame", "error", "request_id"),
    [
        ("{not json", BadJSON, None),
        ("[1, 2]", ProtocolError, None),
        ('"hello"', ProtocolError, None),
        ('{"id": "a"}', ProtocolError, "a"),
        ('{"type": "fly", "id": "a"}', UnknownType, "a"),
        ('{"type": 7}', ProtocolError, None),
        ('{"type": "run_command", "id": "a"}', ProtocolError, "a"),
        ('{"type": "run_command", "id": "a", "cmd": 42}', ProtocolError, "a"),
        ('{"type": "run_command", "id": "a", "cmd": "ls", "timeout": "soon"}', ProtocolError, "a"),
        ('{"type": "run_command", "id": "a", "cmd": "ls", "timeout": -1}', ProtocolError, "a"),
        ('{"type": "ping", "id": 5}', ProtocolError, None),
        ('{"type": "ping", "id": "' + "x" * 65 + '"}', ProtocolError, None),
        ('{"type": "hello", "token": "t", "last_seq": -1}', ProtocolError, None),
        ('{"type": "hello", "token": "t", "last_seq": true}', ProtocolError, None),
        ('{"type": "setup_environment", "packages": ["rm -rf /"]}', ProtocolError, None),
        ('{"type": "cancel", "id": "c"}', ProtocolError, "c"),
        ('{"type": "run_command", "id": "n", "cmd": "echo a\\u0000b"}', ProtocolError, "n"),
    ],
)
def test_bad_frames_raise_their_error_code(
    frame: str, error: type[Exception], request_id: str | None
) -> None:
    """Every malformed frame raises the protocol error its code names, keeping a valid id."""
    with pytest.raises(error) as caught:
        codec.decode(frame)
    assert isinstance(caught.value, ProtocolError)
    assert caught.value.request_id == request_id


def test_frames_over_64_kib_are_too_large() -> None:
    """A frame over 64 KiB is refused before it is parsed, also when multi-byte text makes it so."""
    with pytest.raises(FrameTooLarge):
        codec.decode(json.dumps({"type": "run_command", "cmd": "x" * 70_000}))
    with pytest.raises(FrameTooLarge):
        codec.decode(json.dumps({"type": "run_command", "cmd": "é" * 33_000}, ensure_ascii=False))


def test_event_encoding_carries_seq_and_error_object() -> None:
    """A failed result is encoded with its seq and an error object of code and message."""
    frame = codec.encode_event(m.Result(id="r", ok=False, error_code="timeout", error_message="late"), 7)
    assert json.loads(frame) == {
        "type": "result",
        "seq": 7,
        "id": "r",
        "ok": False,
        "error": {"code": "timeout", "message": "late"},
    }


def test_log_fields_cannot_override_envelope() -> None:
    """A log field named like an envelope key does not replace the envelope."""
    log = m.Log(ts="t", level="info", event="e", fields={"type": "result", "seq": 99, "x": 1})
    obj = json.loads(codec.encode_event(log, 3))
    assert (obj["type"], obj["seq"], obj["x"]) == ("log", 3, 1)
