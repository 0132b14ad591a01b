"""The ``e2b`` backend, through the real SDK, against the fake E2B service on loopback."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest

from protocol.errors import CommandTimeout, NotConfigured, ProtocolError, SandboxBroken, SessionClosed
from sandboxes.base import Sandbox, Stream
from sandboxes.e2b import E2BConfig, E2BSandbox, e2b_factory
from tests.e2b_envd import Script
from tests.e2b_service import SPEC, E2BService, e2b_service, make_config, sandbox

__all__ = ["e2b_service", "sandbox"]  # fixtures


class Recorder:
    """An output sink that keeps chunks and signals when one contains a marker."""

    def __init__(self, marker: str = "") -> None:
        self.chunks: list[tuple[Stream, str]] = []
        self.marker = marker
        self.seen = asyncio.Event()

    async def __call__(self, stream: Stream, data: str) -> None:
        self.chunks.append((stream, data))
        if self.marker and self.marker in data:
            self.seen.set()


async def test_satisfies_the_sandbox_protocol(sandbox: E2BSandbox) -> None:
    """An E2BSandbox is usable wherever a Sandbox is expected."""
    box: Sandbox = sandbox
    assert box.kind == "e2b"


async def test_missing_api_key_is_not_configured() -> None:
    """Without an API key the backend refuses to start, saying what to set."""
    with pytest.raises(NotConfigured, match="E2B_API_KEY"):
        E2BSandbox(SPEC, E2BConfig())
    with pytest.raises(NotConfigured, match="E2B_API_KEY"):
        E2BConfig.from_env({})
    with pytest.raises(NotConfigured):
        e2b_factory(E2BConfig())
    assert E2BConfig.from_env({"E2B_API_KEY": "k"}).api_key == "k"


async def test_api_key_is_not_in_the_repr() -> None:
    """The config's repr never shows the API key."""
    assert "e2b_secret" not in repr(E2BConfig(api_key="e2b_secret"))


async def test_sandbox_is_created_lazily_with_its_tags(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """Nothing is created until a call needs it; then once, tagged with instance and session."""
    assert e2b_service.boxes == {}
    assert sandbox.sandbox_id is None
    await sandbox.run("true", timeout=5, on_output=Recorder())
    await sandbox.run("true", timeout=5, on_output=Recorder())
    box = e2b_service.only()
    assert box.metadata == {
        "app": "deskhive",
        "instance": "test-instance",
        "session_id": SPEC.session_id,
        "username": "ada",
    }
    assert box.template == "desktop"
    assert sandbox.sandbox_id == box.sandbox_id
    assert any(cmd.startswith("Xvfb :0 ") for cmd in box.commands())


async def test_start_desktop_gives_the_authenticated_stream_url(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """start_desktop starts a password-protected noVNC once and exposes its URL."""
    running = [sandbox.desktop_running]
    await sandbox.start_desktop()
    await sandbox.start_desktop()  # already running: no second stream
    running.append(sandbox.desktop_running)
    assert running == [False, True]
    box = e2b_service.only()
    assert sandbox.stream_url is not None
    assert sandbox.stream_url.startswith(f"https://6080-{box.sandbox_id}.e2b.test/vnc.html?")
    password = sandbox.stream_url.rsplit("password=", 1)[1]
    (vnc,) = [p for p in box.processes if "x11vnc -storepasswd" in p.cmd]
    assert vnc.envs["VNC_PASSWORD"] == password
    assert password not in vnc.cmd


async def test_output_streams_in_order_while_the_command_runs(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """Chunks reach the sink in order, before the command has finished."""
    script = e2b_service.on(
        "work", Script(output=[("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n")], hang=True)
    )
    sink = Recorder(marker="three")
    async with asyncio.timeout(5):
        job = asyncio.ensure_future(sandbox.run("work", timeout=5, on_output=sink))
        await sink.seen.wait()
        assert not job.done()
        script.release.set()
        assert await job == 0
    assert sink.chunks == [("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n")]


async def test_exit_code_is_returned(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """A non-zero exit is a result, not an error."""
    e2b_service.on("false", Script(exit_code=3))
    assert await sandbox.run("false", timeout=5, on_output=Recorder()) == 3


async def test_large_output_is_not_kept_in_the_server(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """A command printing 8 MiB streams it to the sink without the server keeping it."""
    chunk = "x" * 65536
    e2b_service.on("yes", Script(output=[("stdout", chunk)] * 128))
    total = 0

    async def count(_stream: Stream, data: str) -> None:
        nonlocal total
        total += len(data)

    await sandbox.run("true", timeout=5, on_output=count)  # the sandbox exists before we measure
    tracemalloc.start()
    try:
        assert await sandbox.run("yes", timeout=30, on_output=count) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 128 * 65536
    assert peak < 4 * 1024 * 1024


async def test_timeout_kills_the_command(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """A command outliving its timeout is killed in the sandbox and raises CommandTimeout."""
    e2b_service.on("sleep", Script(hang=True))
    with pytest.raises(CommandTimeout, match=r"0\.3 s"):
        await sandbox.run("sleep 100", timeout=0.3, on_output=Recorder())
    (process,) = [p for p in e2b_service.only().processes if p.cmd == "sleep 100"]
    assert process.killed.is_set()


async def test_cancel_kills_the_command(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """Cancelling run kills the command in the sandbox before CancelledError propagates."""
    e2b_service.on("serve", Script(output=[("stdout", "listening\n")], hang=True))
    sink = Recorder(marker="listening")
    async with asyncio.timeout(5):
        job = asyncio.ensure_future(sandbox.run("serve", timeout=60, on_output=sink))
        await sink.seen.wait()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
    (process,) = [p for p in e2b_service.only().processes if p.cmd == "serve"]
    assert process.killed.is_set()


async def test_failing_sink_kills_the_command_and_raises_its_error(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """When the sink fails (the session closed), the command is killed and that error propagates."""
    e2b_service.on("serve", Script(output=[("stdout", "x\n")], hang=True))

    async def closed(_stream: Stream, _data: str) -> None:
        raise SessionClosed("session ada is closed")

    with pytest.raises(SessionClosed):
        await sandbox.run("serve", timeout=10, on_output=closed)
    (process,) = [p for p in e2b_service.only().processes if p.cmd == "serve"]
    assert process.killed.is_set()


async def test_close_kills_exactly_once(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """close kills the sandbox once, however often it is called, and later calls fail clearly."""
    await sandbox.start_desktop()
    await asyncio.gather(sandbox.close(), sandbox.close())
    await sandbox.close()
    assert e2b_service.only().kills == 1
    assert sandbox.stream_url is None
    with pytest.raises(SessionClosed):
        await sandbox.screenshot()


async def test_close_without_sandbox_creates_nothing(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """Closing a backend that never needed a sandbox makes no request."""
    await sandbox.close()
    assert e2b_service.hits == {}


async def test_stop_desktop_kills_and_next_use_creates_afresh(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """stop_desktop kills the sandbox; the next start gets a new one."""
    await sandbox.start_desktop()
    await sandbox.stop_desktop()
    assert not sandbox.desktop_running
    assert sandbox.sandbox_id is None
    await sandbox.start_desktop()
    assert [b.kills for b in e2b_service.boxes.values()] == [1, 0]


async def test_desktop_actions_send_what_xdotool_needs(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """Each action is one command, and clicks at x=0 or y=0 still move the pointer."""
    assert (await sandbox.screenshot()).startswith(b"\x89PNG")
    box = e2b_service.only()
    booted = len(box.processes)
    await sandbox.left_click(0, 300)
    await sandbox.double_click(3, 0)
    await sandbox.right_click(5, 6)
    await sandbox.move_mouse(0, 0)
    await sandbox.scroll("up", 2)
    await sandbox.scroll("right", 3)
    await sandbox.press(["Return"])
    await sandbox.press(["ctrl", "c"])
    await sandbox.press("alt+Tab")
    await sandbox.open("https://example.com/?a=1&b=2")
    await sandbox.launch("firefox")
    assert box.commands()[booted:] == [
        "xdotool mousemove --sync 0 300 click 1",
        "xdotool mousemove --sync 3 0 click --repeat 2 1",
        "xdotool mousemove --sync 5 6 click 3",
        "xdotool mousemove --sync 0 0",
        "xdotool click --repeat 2 4",
        "xdotool click --repeat 3 7",
        "xdotool key -- Return",
        "xdotool key -- Control_L+c",
        "xdotool key -- Alt_L+Tab",
        "xdg-open 'https://example.com/?a=1&b=2'",
        "gtk-launch firefox",
    ]
    assert [p for p in box.commands() if p.startswith("scrot ")] and not box.files


async def test_long_text_is_typed_in_one_bounded_call(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """A 2,000-character write is one command, with the text intact and a bound that fits it."""
    text = 'It\'s a "long" $HOME `line`\n' * 74 + "end"
    assert len(text) > 2000
    await sandbox.run("true", timeout=5, on_output=Recorder())
    box = e2b_service.only()
    before = len(box.processes)
    async with asyncio.timeout(5):
        await sandbox.write(text)
    (typed,) = box.processes[before:]
    assert typed.cmd == 'xdotool type --delay 12 -- "$DESKHIVE_TEXT"'
    assert typed.envs["DESKHIVE_TEXT"] == text


async def test_unknown_key_is_an_error_not_a_silent_no_op(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """A key xdotool does not know is reported, instead of answering "pressed"."""
    e2b_service.on(
        "xdotool key -- Retrun",
        Script(output=[("stderr", "(symbol) No such key name 'Retrun'. Ignoring it.\n")]),
    )
    with pytest.raises(ProtocolError, match="unknown key name Retrun"):
        await sandbox.press("Retrun")


async def test_failing_desktop_command_is_sandbox_broken(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """A desktop command that exits non-zero raises SandboxBroken with its stderr."""
    e2b_service.on("xdotool mousemove", Script(output=[("stderr", "Can't open display")], exit_code=1))
    with pytest.raises(SandboxBroken, match="left_click exited with 1: Can't open display"):
        await sandbox.left_click(1, 2)


async def test_setup_installs_and_reports_each_step(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """apt packages install as root, pip: packages with pip, and each step is reported."""
    steps: list[str] = []
    await sandbox.setup(["jq", "pip:requests"], lambda step, **kw: steps.append(step))
    assert steps == [
        "setup.apt_update",
        "setup.apt_install",
        "setup.pip_install",
        "setup.browser",
        "setup.done",
    ]
    box = e2b_service.only()
    commands = box.commands()
    assert "apt-get -q update" in commands
    assert any(c.endswith("install -y --no-install-recommends jq") for c in commands)
    assert "python3 -m pip install --user -q requests" in commands


async def test_setup_failure_names_the_step(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """A failing install raises SandboxBroken naming the step and its output."""
    e2b_service.on("apt-get -q update", Script(output=[("stderr", "no network")], exit_code=100))
    with pytest.raises(SandboxBroken, match="apt-get update exited with 100: no network"):
        await sandbox.setup(["jq"], lambda step, **kw: None)


async def test_factory_makes_backends_sharing_the_config(e2b_service: E2BService) -> None:
    """e2b_factory makes one E2BSandbox per spec, all reaching the same service."""
    factory = e2b_factory(make_config(e2b_service))
    box = factory(SPEC)
    assert isinstance(box, E2BSandbox)
    await box.run("true", timeout=5, on_output=Recorder())
    await box.close()
    assert [b.kills for b in e2b_service.boxes.values()] == [1]
