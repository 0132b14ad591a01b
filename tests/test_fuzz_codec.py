"""The codec under generated input: any bytes, any JSON, any string, and no surprise."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.workflows import WorkflowError, parse_workflow
from protocol import codec, fields
from protocol import messages as m
from protocol.errors import ProtocolError

FUZZ = settings(max_examples=300, deadline=None, database=None)
#: The codes a frame that does not follow the protocol may get.
FRAME_CODES = {"bad_json", "bad_message", "unknown_type", "too_large"}
#: Strings with what breaks encoders and shells: lone surrogates, NUL, pairs.
NASTY = st.sampled_from(["\ud800", "\udfff", "a\udc80b", "\x00", "\U0001f600", "\u2028", " ", "", "\\"])
TEXT = st.one_of(st.text(max_size=80), NASTY, st.lists(NASTY, max_size=4).map("".join))
JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
FIELD_NAMES = ["id", "token", "last_seq", "cmd", "timeout", "query", "workflow", "target", "packages"]
PACKAGE = st.one_of(
    st.sampled_from(["jq", "g++", "pip:numpy==2.0", "pip:a[b]>=1,<2", "numpy==2.0", "pip:-r"]),
    st.text(alphabet="abcxyzAZ019+-._:=<>!~[],;@ \x00", max_size=20),
    st.text(alphabet="abz09+-.", max_size=12).map(lambda s: "pip:" + s),
)
FRAMES = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(sorted(codec.MESSAGE_TYPES)), JSON)},
    optional={
        name: st.one_of(JSON, TEXT, st.lists(PACKAGE, max_size=3) if name == "packages" else TEXT)
        for name in FIELD_NAMES
    },
)
#: Fields whose text a sandbox, a model or the desktop receives.
SANDBOX_TEXT = ("cmd", "query")


def _decode_or_error(raw: str | bytes) -> m.ClientMessage | ProtocolError:
    try:
        return codec.decode(raw)
    except ProtocolError as exc:
        error = exc
    assert error.code in FRAME_CODES, error
    return error


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_a_protocol_error(raw: bytes) -> None:
    """Arbitrary bytes give a message or a ProtocolError with a documented code, nothing else."""
    _decode_or_error(raw)


@FUZZ
@given(st.text(max_size=200))
def test_any_text_decodes_or_raises_a_protocol_error(raw: str) -> None:
    """Arbitrary text gives a message or a ProtocolError with a documented code, nothing else."""
    _decode_or_error(raw)


@FUZZ
@given(FRAMES, st.booleans())
def test_generated_frames_decode_to_messages_the_codec_reencodes(obj: dict[str, Any], ascii: bool) -> None:
    """A frame of any shape is refused with its id kept, or decodes to a message that round-trips."""
    raw = json.dumps(obj, ensure_ascii=ascii)
    if not ascii:
        try:
            raw.encode()
        except UnicodeEncodeError:
            raw = json.dumps(obj)  # a lone surrogate cannot be a WebSocket text frame unescaped
    got = _decode_or_error(raw)
    # What the server reads: JSON merges a high and a low surrogate into one character.
    rid = json.loads(raw).get("id")
    if isinstance(got, ProtocolError):
        if got.code != "too_large":
            assert got.request_id == (rid if isinstance(rid, str) and len(rid) <= 64 else None)
        return
    assert codec.decode(codec.encode_request(got)) == got
    for name in SANDBOX_TEXT:
        value = getattr(got, name, None)
        assert value is None or fields.text_problem(value) is None
    for package in getattr(got, "packages", ()):
        assert fields.parse_package(package) is not None


@FUZZ
@given(TEXT, TEXT, st.integers(min_value=0, max_value=2**53))
def test_every_encoder_gives_utf8_json_whatever_the_strings(a: str, b: str, seq: int) -> None:
    """Every server frame, built from any strings, is strict UTF-8 JSON that reads back the same."""
    # Strings as a client could have sent them: JSON merges a high and a low surrogate into one.
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    frames: list[tuple[bytes | str, dict[str, Any]]] = [
        (codec.encode(m.Pong(id=a)), {"id": a}),
        (codec.encode(m.Ack(id=a)), {"id": a}),
        (codec.encode(m.Error(code="bad_message", message=b, id=a)), {"id": a, "message": b}),
        (
            codec.encode(
                m.Welcome(session_id=a, username=b, state="idle", stream_url=a, seq=seq, resumed=True)
            ),
            {"session_id": a, "username": b, "stream_url": a, "seq": seq},
        ),
        (codec.encode_event(m.Output(id=a, stream="stderr", data=b), seq), {"id": a, "data": b}),
        (
            codec.encode_event(m.Result(id=a, ok=False, error_code="internal", error_message=b), seq),
            {"id": a, "error": {"code": "internal", "message": b}},
        ),
        (codec.encode_event(m.Log(ts=a, level="info", event=b, fields={b: a}), seq), {"ts": a, "event": b}),
        (codec.dumps({"request_id": a, "error": b}), {"request_id": a, "error": b}),
        (codec.encode_request(m.Cancel(id=a, target=b)), {"id": a, "target": b}),
    ]
    for frame, expected in frames:
        text = frame.decode("utf-8") if isinstance(frame, bytes) else frame
        text.encode("utf-8")
        obj = json.loads(text)
        assert {key: obj[key] for key in expected} == expected


@FUZZ
@given(PACKAGE)
def test_the_codec_and_the_workflow_loader_take_the_same_packages(package: str) -> None:
    """A generated package name is taken by both readers or by neither, and never as an option."""
    try:
        codec.decode(json.dumps({"type": "setup_environment", "packages": [package]}))
        by_codec = True
    except ProtocolError:
        by_codec = False
    try:
        parse_workflow(
            "w", {"description": "d", "steps": [{"kind": "setup", "packages": [package]}]}, where="w"
        )
        by_loader = True
    except WorkflowError:
        by_loader = False
    assert by_codec is by_loader
    parsed = fields.parse_package(package)
    assert (parsed is not None) is by_codec
    if parsed is not None:
        assert not parsed.spec.startswith("-")
        assert not set(parsed.spec) & set(" ;@\x00\n:")
