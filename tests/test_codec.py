"""The codec: frames to typed messages, with every field checked."""

from __future__ import annotations

import contextlib
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
        "setup_environment": {"packages": ["cowsay", "pip:numpy==2.0"]},
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


# ----------------------------------------------------------------------------
# Any string in, valid UTF-8 JSON out

LONE = "\ud800"


def _utf8_json(frame: bytes | str) -> object:
    """The frame as a client reads it: strict UTF-8, then JSON."""
    text = frame.decode("utf-8") if isinstance(frame, bytes) else frame
    text.encode("utf-8")  # what a str must survive to go on the wire
    return json.loads(text)


def test_a_lone_surrogate_id_is_echoed_escaped_by_every_encoder() -> None:
    """An id holding a lone surrogate comes back, escaped, in pong, ack, error and every event."""
    ping = codec.decode('{"type": "ping", "id": "a\\ud800"}')
    assert ping == m.Ping(id="a" + LONE)
    rid = "a" + LONE
    replies = [
        codec.encode(m.Pong(id=rid)),
        codec.encode(m.Ack(id=rid)),
        codec.encode(m.Error(code="busy", message=f"x {LONE}", id=rid)),
        codec.encode(
            m.Welcome(session_id="s", username="u", state="idle", stream_url=rid, seq=0, resumed=False)
        ),
        codec.encode_event(m.Result(id=rid, ok=False, error_code="internal", error_message=LONE), 1),
        codec.encode_event(m.Output(id="o", stream="stdout", data=rid), 2),
        codec.encode_event(m.Log(ts="t", level="info", event="e", fields={"id": rid}), 3),
        codec.dumps({"request_id": rid}),
        codec.encode_request(m.Cancel(id=rid, target=rid)),
    ]
    for frame in replies:
        assert rid in _strings(_utf8_json(frame))


def _strings(obj: object) -> list[str]:
    if isinstance(obj, dict):
        return [s for value in obj.values() for s in _strings(value)]
    if isinstance(obj, list):
        return [s for value in obj for s in _strings(value)]
    return [obj] if isinstance(obj, str) else []


def test_plain_frames_stay_unescaped() -> None:
    """Text UTF-8 can carry is sent as it is, not as \\u escapes (frames stay small)."""
    assert codec.encode(m.Ack(id="é")) == '{"type":"ack","id":"é"}'.encode()
    assert codec.dumps({"a": "é"}) == '{"a":"é"}'


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "run_command", "cmd": f"echo {LONE}"},
        {"type": "run_command", "cmd": "echo \x00"},
        {"type": "run_task", "query": f"find {LONE}"},
        {"type": "run_workflow", "query": f"find {LONE}"},
        {"type": "run_workflow", "workflow": f"de{LONE}fault"},
        {"type": "setup_environment", "packages": [f"jq{LONE}"]},
    ],
)
def test_text_the_sandbox_cannot_take_is_bad_message_with_the_id(frame: dict[str, object]) -> None:
    """Sandbox-bound text with a lone surrogate or NUL is refused at decode, its id kept."""
    raw = json.dumps({**frame, "id": f"q{LONE}"})
    with pytest.raises(ProtocolError) as caught:
        codec.decode(raw)
    assert caught.value.code == "bad_message"
    assert caught.value.request_id == f"q{LONE}"


def test_labels_take_any_json_string() -> None:
    """Ids, cancel targets and hello tokens are only echoed or hashed, so NUL and surrogates pass."""
    assert codec.decode(json.dumps({"type": "cancel", "id": "\x00", "target": LONE})) == m.Cancel(
        id="\x00", target=LONE
    )
    assert codec.decode(json.dumps({"type": "hello", "token": f"t{LONE}"})) == m.Hello(token=f"t{LONE}")


def test_text_fields_may_use_the_whole_frame() -> None:
    """A 60,000-character command is accepted, and so is a frame of exactly 65,536 bytes."""
    assert codec.decode(json.dumps({"type": "run_command", "cmd": "x" * 60_000})) == m.RunCommand(
        cmd="x" * 60_000
    )
    envelope = len(json.dumps({"type": "run_task", "query": ""}))
    frame = json.dumps({"type": "run_task", "query": "q" * (codec.MAX_FRAME_BYTES - envelope)})
    assert len(frame.encode()) == codec.MAX_FRAME_BYTES
    assert isinstance(codec.decode(frame), m.RunTask)
    with pytest.raises(FrameTooLarge):
        codec.decode(frame[:-2] + 'qq"}')


def test_encode_request_is_what_decode_reads() -> None:
    """Every request a client encodes through the codec decodes to the same message."""
    for msg in [
        m.Hello(token="t", last_seq=4),
        m.SetupEnvironment(id="s", packages=("jq", "pip:numpy==2.0")),
        m.RunCommand(id="r", cmd="ls", timeout=1.5),
        m.RunWorkflow(id="w", workflow="default", query="q"),
        m.Ping(id=LONE),
    ]:
        assert codec.decode(codec.encode_request(msg)) == msg


# ----------------------------------------------------------------------------
# One package grammar: the codec, the workflow loader and the local sandbox

PACKAGES_ACCEPTED = [
    "jq",
    "python3-numpy",
    "g++",
    "libstdc++6",
    "pip:numpy",
    "pip:numpy==2.0",
    "pip:requests[socks]>=2.31,<3",
    "pip:Django~=4.2",
    "pip:zope.interface",
    "pip:pkg===1.0+local.7",
    "pip:x!=1.*",
]
PACKAGES_REFUSED = [
    "numpy==2.0",
    "NumPy",
    "a",
    "-jq",
    "jq; rm -rf /",
    "jq\x00",
    "",
    "x" * 129,
    "pip:",
    "pip:-r",
    "pip:--index-url=http://evil",
    "pip:numpy; os_name=='nt'",
    "pip:pkg @ https://example.com/pkg.whl",
    "pip:numpy==",
    "pip:nu mpy",
    "pip:numpy==2.0\n",
    f"pip:numpy{LONE}",
]


def _codec_takes(package: str) -> bool:
    try:
        codec.decode(json.dumps({"type": "setup_environment", "packages": [package]}))
    except ProtocolError:
        return False
    return True


def _workflow_takes(package: str) -> bool:
    from actors.workflows import WorkflowError, parse_workflow

    data = {"description": "d", "steps": [{"kind": "setup", "packages": [package]}]}
    try:
        parse_workflow("w", data, where="w.toml")
    except WorkflowError:
        return False
    return True


class _RecordingJail:
    """Stands in for a local sandbox at its ``exec`` boundary: records argv, runs nothing."""

    def __init__(self) -> None:
        from sandboxes.local.config import LocalConfig

        # With the network: without it no pip argv is made at all.
        self.config = LocalConfig(network=True)
        self.argvs: list[list[str]] = []

    async def exec(self, argv: list[str], **_: object) -> int:
        self.argvs.append(argv)
        return 0


async def _local_sandbox_takes(package: str) -> bool:
    from protocol.errors import SandboxBroken
    from sandboxes.local import tools

    statuses: list[str] = []

    def report(event: str, **fields: object) -> None:
        if event == "setup.package":
            statuses.append(str(fields["status"]))

    jail = _RecordingJail()
    # A Debian package absent from the host is taken, then found missing.
    with contextlib.suppress(SandboxBroken):
        await tools.setup(jail, [package], report)  # type: ignore[arg-type]
    assert len(statuses) == 1
    if package.startswith("pip:") and statuses != ["invalid"]:
        assert jail.argvs[-1][-2:] == ["--", package.removeprefix("pip:")]
    return statuses != ["invalid"]


@pytest.mark.parametrize("package", PACKAGES_ACCEPTED + PACKAGES_REFUSED)
async def test_codec_workflows_and_local_sandbox_agree_on_packages(package: str) -> None:
    """A package is taken by all three parts that read package names, or by none of them."""
    expected = package in PACKAGES_ACCEPTED
    assert _codec_takes(package) is expected
    assert _workflow_takes(package) is expected
    assert await _local_sandbox_takes(package) is expected
