"""Commands of the ``e2b`` backend that are plain shell: the sink hand-off and ``setup``."""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable, Sequence

from protocol.errors import SandboxBroken
from sandboxes.base import OutputSink, StepReporter, Stream

#: Runs one command as *user* (``None``: the template's user), streaming to a sink; its exit code.
StepRunner = Callable[[str, OutputSink, "str | None"], Awaitable[int]]


async def install(run: StepRunner, packages: Sequence[str], report: StepReporter) -> None:
    """Install *packages* (``pip:NAME`` with pip, others with apt) and check the browser."""
    apt = [p for p in packages if not p.startswith("pip:")]
    pip = [p.removeprefix("pip:") for p in packages if p.startswith("pip:")]
    if apt:
        report("setup.apt_update")
        await _step(run, "apt-get update", "apt-get -q update", user="root")
        report("setup.apt_install", packages=apt)
        await _step(
            run,
            "apt-get install",
            "DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends " + shlex.join(apt),
            user="root",
        )
    if pip:
        report("setup.pip_install", packages=pip)
        await _step(run, "pip install", "python3 -m pip install --user -q " + shlex.join(pip))
    report("setup.browser")
    browser = await _step(
        run,
        "browser check",
        # A template without a browser still works for commands: not fatal.
        "command -v firefox || command -v google-chrome || command -v chromium || true",
    )
    report("setup.done", browser=browser.strip().rsplit("/", 1)[-1] or None)


async def _step(run: StepRunner, name: str, cmd: str, user: str | None = None) -> str:
    """Run one setup command; its output's tail, or ``SandboxBroken`` with it."""
    chunks: list[str] = []

    async def collect(_stream: Stream, data: str) -> None:
        chunks.append(data)
        del chunks[:-64]  # only the tail is ever shown: apt's output is long

    code = await run(cmd, collect, user)
    output = "".join(chunks)
    if code != 0:
        raise SandboxBroken(f"e2b setup: {name} exited with {code}: {output[-500:]}")
    return output


class Sink:
    """Passes the SDK's output callbacks to the session's sink, remembering its own failure."""

    def __init__(self, on_output: OutputSink) -> None:
        self._on_output = on_output
        self.failure: BaseException | None = None

    async def _send(self, stream: Stream, data: str) -> None:
        try:
            await self._on_output(stream, data)
        except Exception as exc:
            self.failure = exc
            raise

    async def stdout(self, data: str) -> None:
        await self._send("stdout", data)

    async def stderr(self, data: str) -> None:
        await self._send("stderr", data)
