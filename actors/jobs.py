"""What each job does, given the session's sandbox.

A job is a request that runs one at a time per session (see
:data:`protocol.messages.JOB_TYPES`; ``kill_desktop`` also runs here, put first
in line by the actor). :func:`execute` runs one and returns
its :class:`~protocol.messages.Result`; failures are raised as
:class:`~protocol.errors.GatewayError`.

Every job gets exactly one result, whatever ends it, and it is made here
alone: :func:`run_to_result` turns a failure into the job's result inside its
task, and :func:`outcome` reads the result from how that task ended
(cancelled before or after it started, or cut off by the session's end).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from base64 import b64encode
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs
import structlog

from protocol import messages as m
from protocol.errors import (
    Cancelled,
    CommandTimeout,
    GatewayError,
    NotConfigured,
    ProtocolError,
    SandboxBroken,
    StepFailed,
)
from sandboxes.base import Sandbox, Stream, png_size

if TYPE_CHECKING:
    import aiohttp

    from actors.workflows import Step, Workflow
    from agent import ModelConfig
    from limits import DesktopGate
    from metrics import Metrics

logger = structlog.get_logger("deskhive.jobs")

#: Grace beyond a command's own timeout before the actor gives up on the
#: sandbox enforcing it.
_TIMEOUT_SLACK_S = 10.0


@attrs.frozen(kw_only=True)
class JobConfig:
    """Limits and services every job of a server shares."""

    command_timeout: float = 600.0
    output_limit: int = 10 * 1024 * 1024
    model: ModelConfig | None = None
    workflows: Mapping[str, Workflow] = attrs.field(factory=dict)
    http: aiohttp.ClientSession | None = None
    #: The server's desktop limits (``None``: none), checked before a desktop starts.
    desktops: DesktopGate | None = None
    metrics: Metrics | None = None


async def _nothing() -> None:
    return None


@attrs.define(kw_only=True)
class JobContext:
    """One job's view of its session: sandbox, log, output and phase."""

    request_id: str
    sandbox: Sandbox
    config: JobConfig
    log: Any  # the session's structlog logger
    emit: Callable[[m.Event], None]
    #: Tells the actor a workflow's desktop step started or finished starting
    #: the desktop; the session's state follows.
    set_starting: Callable[[bool], None]
    #: Whose job it is, for the per-username desktop limit.
    session_id: str = ""
    username: str = ""
    #: Awaited once the desktop started or was killed, before the job's result:
    #: the store keeps the sandbox id first.
    desktop_changed: Callable[[], Awaitable[None]] = attrs.field(default=_nothing)
    _output_bytes: int = 0
    _truncated: bool = False

    async def output(self, stream: Stream, data: str) -> None:
        """Forward a chunk of output, within the job's output cap (in UTF-8 bytes)."""
        if self._truncated:
            return
        size = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
        room = self.config.output_limit - self._output_bytes
        self._output_bytes += size
        if size <= room:
            self.emit(m.Output(id=self.request_id, stream=stream, data=data))
            return
        # The cap is reached inside this chunk: what fits goes out, then the notice.
        kept = data.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
        if kept:
            self.emit(m.Output(id=self.request_id, stream=stream, data=kept))
        self._truncated = True
        limit = self.config.output_limit
        self.log.warning("job.output_truncated", id=self.request_id, limit_bytes=limit)
        notice = f"\n[deskhive: output over {limit} bytes; the rest is dropped]\n"
        self.emit(m.Output(id=self.request_id, stream="stderr", data=notice))


def kind_of(job: m.Job | m.KillDesktop) -> str:
    """The protocol's name of *job*'s type (``run_command``): a fixed set, fit for a metric label."""
    return _snake(type(job).__name__)


@functools.lru_cache(maxsize=32)
def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def describe(job: m.Job | m.KillDesktop) -> str:
    """A short line saying what *job* does, for ``current_command``."""
    match job:
        case m.KillDesktop():
            return "kill_desktop"
        case m.RunCommand(cmd=cmd):
            return cmd[:200]
        case m.RunTask(query=query):
            return f"run_task: {query[:180]}"
        case m.RunWorkflow(workflow=name):
            return f"run_workflow: {name or 'default'}"
        case m.SetupEnvironment():
            return "setup_environment"
        case m.StartDesktop():
            return "start_desktop"
        case m.Screenshot():
            return "screenshot"
        case m.Launch(app=app):
            return f"launch: {app[:190]}"


def cancelled(request_id: str, reason: str) -> m.Result:
    """The result of a job that was stopped, or never started."""
    return m.Result(id=request_id, ok=False, error_code=Cancelled.code, error_message=reason)


def desktop_lost(request_id: str, reason: str) -> m.Result:
    """The result of a job that needed the desktop when it died."""
    message = f"the desktop was lost: {reason}"
    return m.Result(id=request_id, ok=False, error_code=SandboxBroken.code, error_message=message)


#: Workflow steps that work on the desktop.
_DESKTOP_STEPS: Final = frozenset({"desktop", "open", "task"})


def needs_desktop(job: m.Job | m.KillDesktop, workflows: Mapping[str, Workflow]) -> bool:
    """Whether *job* cannot go on once the desktop died (a command can: it runs without one)."""
    match job:
        case m.StartDesktop() | m.Screenshot() | m.Launch() | m.RunTask():
            return True
        case m.RunWorkflow(workflow=name):
            workflow = workflows.get(name or "default")
            return workflow is not None and any(s.kind in _DESKTOP_STEPS for s in workflow.steps)
        case _:
            return False


def failed(request_id: str, kind: str, exc: BaseException) -> m.Result:
    """The result of a job that raised *exc* (logged with its traceback unless it was ours)."""
    if isinstance(exc, GatewayError):
        return m.Result(id=request_id, ok=False, error_code=exc.code, error_message=exc.message)
    logger.error("job.crashed", id=request_id, kind=kind, exc_info=exc)
    return m.Result(id=request_id, ok=False, error_code="internal", error_message=f"{kind} failed: {exc!r}")


async def run_to_result(job: m.Job | m.KillDesktop, ctx: JobContext) -> m.Result:
    """Run *job*; every failure but cancellation becomes its result.

    A job task must not raise anything else: it lives in the incarnation's
    TaskGroup, which would end the whole incarnation for one failed job.
    """
    try:
        return await execute(job, ctx)
    except Exception as exc:  # noqa: BLE001 - the failure is the result; failed() logs the unexpected
        return failed(ctx.request_id, type(job).__name__, exc)


def outcome(
    request_id: str, task: asyncio.Task[m.Result] | None, reason: str, lost: str | None = None
) -> m.Result:
    """The one result of a job, from how its *task* ended.

    ``None`` (it never got a task) and a task that was cancelled or is not
    done (the session's end cut it off) give ``cancelled`` with *reason*, or
    ``sandbox_failed`` when the job was stopped because its desktop was *lost*.
    """
    if task is None or not task.done() or task.cancelled():
        return cancelled(request_id, reason) if lost is None else desktop_lost(request_id, lost)
    exc = task.exception()
    if exc is not None:  # only a BaseException run_to_result let through
        return failed(request_id, "job", exc)
    return task.result()


async def execute(job: m.Job | m.KillDesktop, ctx: JobContext) -> m.Result:
    """Run one job to its result."""
    rid = ctx.request_id
    match job:
        case m.KillDesktop():
            await ctx.sandbox.stop_desktop()
            await ctx.desktop_changed()
            return m.Result(id=rid, ok=True, data={})
        case m.StartDesktop():
            return m.Result(id=rid, ok=True, data={"stream_url": await start_desktop(ctx)})
        case m.SetupEnvironment(packages=packages):
            await setup(ctx, packages)
            return m.Result(id=rid, ok=True, data={})
        case m.RunCommand(cmd=cmd, timeout=timeout):
            code = await run_command(ctx, cmd, timeout)
            return m.Result(id=rid, ok=code == 0, exit_code=code)
        case m.RunTask(query=query):
            return m.Result(id=rid, ok=True, data=await run_task(ctx, query))
        case m.RunWorkflow(workflow=name, query=query):
            steps = await run_workflow(ctx, name or "default", query)
            return m.Result(id=rid, ok=True, data={"workflow": name or "default", "steps": steps})
        case m.Launch(app=app, url=url):
            await launch(ctx, app, url)
            return m.Result(id=rid, ok=True, data={"app": app})
        case m.Screenshot():
            png = await ctx.sandbox.screenshot()
            width, height = png_size(png)
            data = {"png": b64encode(png).decode(), "width": width, "height": height}
            return m.Result(id=rid, ok=True, data=data)


async def start_desktop(ctx: JobContext) -> str | None:
    if not ctx.sandbox.desktop_running:
        gate = ctx.config.desktops
        # Refused (rate_limited) before anything starts, if over a desktop limit.
        with gate.starting(ctx.session_id, ctx.username) if gate else contextlib.nullcontext():
            ctx.set_starting(True)
            started = time.monotonic()
            try:
                await ctx.sandbox.start_desktop()
            finally:
                ctx.set_starting(False)
        if ctx.config.metrics is not None:
            ctx.config.metrics.desktop_start.observe(time.monotonic() - started)
        await ctx.desktop_changed()
    return ctx.sandbox.stream_url


#: ``launch``'s names for the browser (its ``url`` opens in it).
BROWSER_APPS: Final = frozenset({"browser", "chromium", "firefox"})


async def launch(ctx: JobContext, app: str, url: str | None) -> None:
    """Start *app* on the desktop; return once it runs, not when it exits."""
    if not ctx.sandbox.desktop_running:
        raise ProtocolError("launch needs a running desktop: start it first (start_desktop)")
    if url is not None:
        if app not in BROWSER_APPS:
            raise ProtocolError(f"a url opens in the browser: launch 'browser', not {app[:64]!r}")
        await ctx.sandbox.open(url)
    else:
        await ctx.sandbox.launch(app)
    ctx.log.info("desktop.launched", id=ctx.request_id, app=app[:200])


async def setup(ctx: JobContext, packages: tuple[str, ...]) -> None:
    def report(step: str, **fields: Any) -> None:
        ctx.log.info(f"setup.{step}", id=ctx.request_id, **fields)

    await ctx.sandbox.setup(packages, report)


async def run_command(ctx: JobContext, cmd: str, timeout: float | None) -> int:
    seconds = timeout or ctx.config.command_timeout
    try:
        async with asyncio.timeout(seconds + _TIMEOUT_SLACK_S):
            return await ctx.sandbox.run(cmd, timeout=seconds, on_output=ctx.output)
    except TimeoutError as exc:
        if isinstance(exc, CommandTimeout):
            raise
        raise CommandTimeout(f"command ran over its timeout of {seconds:g} s") from None


async def run_task(ctx: JobContext, query: str) -> dict[str, Any]:
    """The agent's run for *query*: the result's data, its ``answer`` and ``steps``."""
    model, http = ctx.config.model, ctx.config.http
    if model is None or http is None:
        raise NotConfigured(
            "run_task needs a model endpoint: start the server with --model-url "
            "(DESKHIVE_MODEL_URL), --model and --model-key"
        )
    from agent import run_agent  # the agent pulls in its model client only when used

    done = await run_agent(query, ctx.sandbox, model, http, ctx.log, ctx.output)
    return {"answer": done.answer, "steps": done.steps}


async def run_workflow(ctx: JobContext, name: str, query: str | None) -> int:
    workflow = ctx.config.workflows.get(name)
    if workflow is None:
        known = ", ".join(sorted(ctx.config.workflows)) or "none"
        raise ProtocolError(f"unknown workflow {name!r} (known: {known})")
    if workflow.needs_query and not (query and query.strip()):
        # Said before any step runs, not after the desktop was started for nothing.
        raise ProtocolError(f"workflow {name!r} needs a 'query'")
    for number, step in enumerate(workflow.steps, 1):
        ctx.log.info("workflow.step", id=ctx.request_id, workflow=name, step=number, kind=step.kind)
        await run_step(ctx, step, query)
    return len(workflow.steps)


async def run_step(ctx: JobContext, step: Step, query: str | None) -> None:
    match step.kind:
        case "desktop":
            await start_desktop(ctx)
        case "setup":
            await setup(ctx, tuple(step.packages))
        case "command":
            code = await run_command(ctx, step.cmd, step.timeout)
            if code != 0:
                raise StepFailed(f"workflow step {step.cmd!r} exited with {code}")
        case "open":
            await ctx.sandbox.open(step.url)
        case "task":
            text = step.query.format(query=query or "") if step.query else query
            if not text:
                raise ProtocolError("this workflow needs a 'query'")
            await run_task(ctx, text)
