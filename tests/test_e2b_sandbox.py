"""The ``e2b`` backend against a fake SDK object injected through ``E2BConfig.create``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from protocol.errors import CommandTimeout, NotConfigured, SandboxBroken, SessionClosed
from sandboxes.base import Sandbox, SandboxSpec, Stream
from sandboxes.e2b import E2BConfig, E2BSandbox, e2b_factory
from tests.fakes_e2b import FakeE2B, Script, sdk_failure

SPEC = SandboxSpec(session_id="ada_1700000000_0123456789abcdef", username="ada", data_dir=Path())


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


@pytest.fixture
def fake() -> FakeE2B:
    return FakeE2B()


@pytest.fixture
async def sandbox(fake: FakeE2B) -> AsyncIterator[E2BSandbox]:
    box = E2BSandbox(SPEC, E2BConfig(api_key="e2b_test", create=fake, call_timeout=2))
    yield box
    fake.finish()
    await box.close()


async def test_satisfies_the_sandbox_protocol(sandbox: E2BSandbox) -> None:
    """An E2BSandbox is usable wherever a Sandbox is expected."""
    box: Sandbox = sandbox
    assert box.kind == "e2b"


async def test_missing_api_key_is_not_configured(fake: FakeE2B) -> None:
    """Without an API key the backend refuses to start, saying what to set."""
    with pytest.raises(NotConfigured, match="E2B_API_KEY"):
        E2BSandbox(SPEC, E2BConfig(create=fake))
    with pytest.raises(NotConfigured, match="E2B_API_KEY"):
        E2BConfig.from_env({})
    assert E2BConfig.from_env({"E2B_API_KEY": "k"}).api_key == "k"


async def test_factory_shares_the_config(fake: FakeE2B) -> None:
    """e2b_factory makes one E2BSandbox per spec, and refuses to exist without a key."""
    factory = e2b_factory(E2BConfig(api_key="k", create=fake))
    box = factory(SPEC)
    assert isinstance(box, E2BSandbox)
    await box.close()
    with pytest.raises(NotConfigured):
        e2b_factory(E2BConfig(create=fake))


async def test_api_key_is_not_in_the_repr() -> None:
    """The config's repr never shows the API key."""
    assert "e2b_secret" not in repr(E2BConfig(api_key="e2b_secret"))


async def test_sandbox_is_created_lazily_with_session_metadata(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """Nothing is created until a call needs it; then once, tagged with the session."""
    assert fake.created == []
    assert sandbox.sandbox_id is None
    await sandbox.run("true", timeout=5, on_output=Recorder())
    await sandbox.run("true", timeout=5, on_output=Recorder())
    assert len(fake.created) == 1
    kwargs = fake.create_kwargs[0]
    assert kwargs["metadata"] == {
        "app": "deskhive",
        "session_id": SPEC.session_id,
        "username": "ada",
    }
    assert kwargs["api_key"] == "e2b_test"
    assert sandbox.sandbox_id == fake.created[0].sandbox_id


async def test_start_desktop_gives_the_authenticated_stream_url(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """start_desktop starts the stream with auth and exposes the SDK's URL with its key."""
    running = [sandbox.desktop_running]
    await sandbox.start_desktop()
    await sandbox.start_desktop()  # already running: no second stream
    running.append(sandbox.desktop_running)
    assert running == [False, True]
    assert sandbox.stream_url is not None
    assert sandbox.stream_url.endswith("password=s3cret")
    assert [c for c in fake.calls if c[0] == "stream.start"] == [("stream.start", (), {"require_auth": True})]


async def test_output_streams_in_order_while_the_command_runs(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """Chunks reach the sink in order, before the command has finished."""
    script = Script(output=[("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n")])
    script.hang = True
    fake.scripts["work"] = script
    sink = Recorder(marker="three")
    async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
        job = tg.create_task(sandbox.run("work", timeout=5, on_output=sink))
        await sink.seen.wait()
        assert not job.done()
        script.gate.set()
    assert job.result() == 0
    assert sink.chunks == [("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n")]


async def test_exit_code_is_returned(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """A non-zero exit is a result, not an error."""
    fake.scripts["false"] = Script(exit_code=3)
    assert await sandbox.run("false", timeout=5, on_output=Recorder()) == 3


async def test_timeout_kills_the_command(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """A command outliving its timeout is killed and raises CommandTimeout."""
    fake.scripts["sleep"] = Script(hang=True)
    with pytest.raises(CommandTimeout, match=r"0\.2 s"):
        await sandbox.run("sleep", timeout=0.2, on_output=Recorder())
    assert fake.created[0].commands.handles[0].killed.is_set()


async def test_cancel_kills_the_command(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """Cancelling run kills the command in the sandbox before CancelledError propagates."""
    fake.scripts["serve"] = Script(output=[("stdout", "listening\n")], hang=True)
    sink = Recorder(marker="listening")
    async with asyncio.timeout(5):
        job = asyncio.ensure_future(sandbox.run("serve", timeout=60, on_output=sink))
        await sink.seen.wait()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
    assert fake.created[0].commands.handles[0].killed.is_set()


async def test_long_command_extends_the_sandbox_life(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """A command longer than the sandbox timeout first pushes E2B's deadline past it."""
    await sandbox.run("true", timeout=7200, on_output=Recorder())
    (timeout,) = next(args for name, args, _ in fake.calls if name == "set_timeout")
    assert timeout >= 7200


async def test_close_kills_exactly_once(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """close kills the sandbox once, however often it is called, and later calls fail clearly."""
    await sandbox.start_desktop()
    await asyncio.gather(sandbox.close(), sandbox.close())
    await sandbox.close()
    assert fake.created[0].kills == 1
    assert sandbox.stream_url is None
    with pytest.raises(SessionClosed):
        await sandbox.screenshot()


async def test_close_without_sandbox_creates_nothing(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """Closing a backend that never needed a sandbox makes no SDK call."""
    await sandbox.close()
    assert fake.calls == []


async def test_close_never_raises(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """A failing kill is logged, not raised."""
    await sandbox.start_desktop()
    fake.failures["kill"] = sdk_failure("gone")
    with capture_logs() as logs:
        await sandbox.close()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["e2b.kill_failed"]


async def test_close_during_creation_kills_the_new_sandbox(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """A sandbox still being created when the session closes is killed once it arrives."""
    fake.hangs.add("create")
    async with asyncio.timeout(5):
        job = asyncio.ensure_future(sandbox.start_desktop())
        await asyncio.to_thread(fake.hanging.wait)
        await sandbox.close()
        fake.hangs.clear()
        fake.release.set()
        with pytest.raises(SessionClosed):
            await job
        # The worker thread kills it on its own once creation returns.
        assert await asyncio.to_thread(fake.killed.wait, 5)
    assert fake.created[0].kills == 1


async def test_stop_desktop_kills_and_next_use_creates_afresh(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """stop_desktop kills the sandbox; the next start gets a new one."""
    await sandbox.start_desktop()
    await sandbox.stop_desktop()
    assert not sandbox.desktop_running
    assert sandbox.sandbox_id is None
    await sandbox.start_desktop()
    assert [d.kills for d in fake.created] == [1, 0]


@pytest.mark.parametrize("operation", ["create", "stream.start", "screenshot", "commands.run"])
async def test_sdk_errors_become_sandbox_broken(sandbox: E2BSandbox, fake: FakeE2B, operation: str) -> None:
    """Any SDK exception surfaces as SandboxBroken naming the operation."""
    fake.failures[operation] = sdk_failure("the cloud said no")
    with pytest.raises(SandboxBroken, match="the cloud said no") as caught:
        await use_everything(sandbox)
    assert caught.value.message.startswith("e2b ")


async def use_everything(sandbox: E2BSandbox) -> None:
    await sandbox.start_desktop()
    await sandbox.screenshot()
    await sandbox.run("true", timeout=5, on_output=Recorder())


async def test_broken_output_stream_becomes_sandbox_broken(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """A command whose stream breaks mid-way raises SandboxBroken after its output."""
    fake.scripts["flaky"] = Script(output=[("stdout", "a")], error=RuntimeError("lost"))
    sink = Recorder()
    with pytest.raises(SandboxBroken, match="e2b run failed: RuntimeError: lost"):
        await sandbox.run("flaky", timeout=5, on_output=sink)
    assert sink.chunks == [("stdout", "a")]


async def test_hung_sdk_call_times_out_as_sandbox_broken(fake: FakeE2B) -> None:
    """An SDK call that never answers becomes SandboxBroken after the call timeout."""
    box = E2BSandbox(SPEC, E2BConfig(api_key="k", create=fake, call_timeout=0.1))
    await box.start_desktop()
    fake.hangs.add("screenshot")
    with pytest.raises(SandboxBroken, match="e2b screenshot did not finish in time"):
        await box.screenshot()
    fake.finish()
    await box.close()


async def test_desktop_actions_map_to_the_sdk(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """Each desktop action calls the matching SDK method with its arguments."""
    assert (await sandbox.screenshot()).startswith(b"\x89PNG")
    await sandbox.left_click(1, 2)
    await sandbox.double_click(3, 4)
    await sandbox.right_click(5, 6)
    await sandbox.move_mouse(7, 8)
    await sandbox.scroll("up", 2)
    await sandbox.scroll("right", 3)
    await sandbox.write("hi")
    await sandbox.press(["ctrl", "c"])
    await sandbox.open("https://example.com/?a=1&b=2")
    await sandbox.launch("firefox")
    actions = [(n, a) for n, a, _ in fake.calls if n not in {"create", "set_timeout"}]
    assert actions == [
        ("screenshot", ()),
        ("left_click", (1, 2)),
        ("double_click", (3, 4)),
        ("right_click", (5, 6)),
        ("move_mouse", (7, 8)),
        ("scroll", ("up", 2)),
        ("commands.run", ("xdotool click --repeat 3 7",)),
        ("write", ("hi",)),
        ("press", (["ctrl", "c"],)),
        ("open", ("'https://example.com/?a=1&b=2'",)),
        ("launch", ("firefox",)),
    ]


async def test_setup_installs_and_reports_each_step(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """apt packages install as root, pip: packages with pip, and each step is reported."""
    steps: list[tuple[str, dict[str, object]]] = []
    await sandbox.setup(["jq", "pip:requests"], lambda step, **kw: steps.append((step, kw)))
    assert [name for name, _ in steps] == [
        "setup.apt_update",
        "setup.apt_install",
        "setup.pip_install",
        "setup.browser",
        "setup.done",
    ]
    runs = [(a[0], kw.get("user")) for n, a, kw in fake.calls if n == "commands.run"]
    assert runs[0] == ("apt-get -q update", "root")
    assert runs[1][0].endswith("install -y --no-install-recommends jq")
    assert runs[2] == ("python3 -m pip install --user -q requests", None)


async def test_setup_failure_names_the_step(sandbox: E2BSandbox, fake: FakeE2B) -> None:
    """A failing install raises SandboxBroken naming the step and its output."""
    fake.scripts["apt-get -q update"] = Script(output=[("stderr", "no network")], exit_code=100)
    with pytest.raises(SandboxBroken, match="apt-get update exited with 100: no network"):
        await sandbox.setup(["jq"], lambda step, **kw: None)
