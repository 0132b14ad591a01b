"""The boundary with the ``e2b`` SDK: where its calls are made and its errors mapped.

deskhive drives E2B through ``e2b.AsyncSandbox`` alone. Its calls are
coroutines on the event loop, so no call holds a thread: a hundred sessions
running commands cost a hundred streams, not a hundred workers, and a kill
never queues behind them. (``e2b_desktop.Sandbox`` is synchronous only; its
desktop methods are thin ``xdotool`` commands, written over the async
commands in :mod:`sandboxes.e2b_desktop`.)

Everything that creates, finds or kills a sandbox is here, with the one
place SDK exceptions become ``SandboxBroken`` (or ``SandboxLost`` when E2B
says the sandbox is gone), and the metadata that tags every sandbox with the
server instance and the session that own it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Collection, Coroutine, Iterator, Mapping
from typing import Any

import structlog
from e2b import (
    AsyncSandbox,
    CommandExitException,
    RateLimitException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxUnreachableException,
)

from protocol.errors import GatewayError, SandboxBroken
from sandboxes.base import SandboxSpec

log = structlog.get_logger("sandboxes.e2b")

#: Metadata key and value every deskhive sandbox carries.
METADATA_APP = "deskhive"


class SandboxLost(SandboxBroken):
    """E2B says the session's sandbox is gone: it expired or was killed on E2B's side."""


def sandbox_metadata(instance_id: str, spec: SandboxSpec) -> dict[str, str]:
    """The metadata a session's sandbox is created with (query it with ``AsyncSandbox.list``)."""
    return {
        "app": METADATA_APP,
        "instance": instance_id,
        "session_id": spec.session_id,
        "username": spec.username,
    }


def sdk_error(operation: str, exc: Exception, sandbox_id: str | None = None) -> SandboxBroken:
    """The ``SandboxBroken`` that stands for *exc*, raised by the SDK during *operation*."""
    which = f"e2b sandbox {sandbox_id}" if sandbox_id else "e2b"
    if isinstance(exc, SandboxNotRunningException | SandboxNotFoundException):
        # Subclasses of the SDK's TimeoutException, not of Python's: checked
        # first, or they would pass for a slow call and the desktop would
        # seem to run while every call fails.
        return SandboxLost(f"{which} is gone (expired or killed on E2B's side) during {operation}")
    if isinstance(exc, SandboxUnreachableException):
        return SandboxBroken(f"{which} could not be reached during {operation}")
    if isinstance(exc, RateLimitException):
        return SandboxBroken(f"e2b refused {operation}: rate limited, try again later")
    if isinstance(exc, TimeoutError):
        return SandboxBroken(f"e2b {operation} did not finish in time")
    if isinstance(exc, CommandExitException):
        tail = (exc.stderr or exc.stdout or "")[-300:].strip()
        return SandboxBroken(f"e2b {operation} exited with {exc.exit_code}: {tail}")
    detail = f"{type(exc).__name__}: {exc}"[:300]
    return SandboxBroken(f"e2b {operation} failed: {detail}")


@contextlib.contextmanager
def map_sdk_errors(operation: str, sandbox_id: str | None = None) -> Iterator[None]:
    """Turn whatever the SDK raises during *operation* into ``SandboxBroken``."""
    try:
        yield
    except GatewayError:
        raise
    except Exception as exc:
        # The SDK raises its own classes, but also RuntimeError, ValueError and
        # bare Exception; all of them mean the sandbox failed from outside.
        raise sdk_error(operation, exc, sandbox_id) from exc


class Connection:
    """How to reach E2B: the API key and the SDK's other connection options."""

    def __init__(self, api_key: str, options: Mapping[str, Any]) -> None:
        self._params: dict[str, Any] = {"api_key": api_key, **options}

    def params(self) -> dict[str, Any]:
        return dict(self._params)

    async def create(
        self, *, template: str, timeout: int, metadata: dict[str, str], envs: dict[str, str]
    ) -> AsyncSandbox:
        """A new sandbox; the SDK's retries (429, 5xx) reuse one idempotency key, so make one."""
        return await AsyncSandbox.create(
            template=template,
            timeout=timeout,
            metadata=metadata,
            envs=envs,
            idempotency_key=str(uuid.uuid4()),
            **self._params,
        )

    async def connect(self, sandbox_id: str, *, timeout: int) -> AsyncSandbox:
        """The running sandbox *sandbox_id*; ``SandboxNotFoundException`` when gone."""
        sandbox: AsyncSandbox = await AsyncSandbox.connect(sandbox_id, timeout=timeout, **self._params)
        return sandbox

    async def kill(self, sandbox_id: str) -> bool:
        """Kill *sandbox_id*; False when E2B no longer knows it."""
        killed: bool = await AsyncSandbox.kill(sandbox_id, **self._params)
        return killed

    async def list_ids(self, metadata: dict[str, str]) -> list[str]:
        """The ids of every running or paused sandbox whose metadata includes *metadata*."""
        pages = AsyncSandbox.list(query=SandboxQuery(metadata=metadata), **self._params)
        ids: list[str] = []
        while pages.has_next:
            ids += [info.sandbox_id for info in await pages.next_items()]
        return ids


async def kill_logged(connection: Connection, sandbox_id: str, reason: str) -> bool:
    """Kill *sandbox_id*, logging what happened; False if E2B did not confirm it."""
    try:
        with map_sdk_errors("kill", sandbox_id):
            killed = await connection.kill(sandbox_id)
    except SandboxBroken as exc:
        log.warning("e2b.kill_failed", sandbox_id=sandbox_id, reason=reason, error=exc.message)
        return False
    if killed:
        log.info("e2b.killed", sandbox_id=sandbox_id, reason=reason)
    else:
        log.info("e2b.already_gone", sandbox_id=sandbox_id, reason=reason)
    return True


async def sweep_orphans(
    connection: Connection, instance_id: str, live_ids: Collection[str], *, limit: float = 60.0
) -> list[str]:
    """Kill every sandbox tagged with *instance_id* whose id is not in *live_ids*.

    Called once at start-up: after a crash (SIGKILL, power loss) the old
    process's sandboxes would otherwise run, and bill, until E2B's timeout.
    Returns the ids it killed; failures are logged, never raised.
    """
    try:
        with map_sdk_errors("list"):
            async with asyncio.timeout(limit):
                found = await connection.list_ids({"app": METADATA_APP, "instance": instance_id})
    except SandboxBroken as exc:
        log.warning("e2b.sweep_failed", instance=instance_id, error=exc.message)
        return []
    orphans = [sandbox_id for sandbox_id in found if sandbox_id not in live_ids]
    async with asyncio.timeout(limit):
        results = await asyncio.gather(*(kill_logged(connection, o, "orphan") for o in orphans))
    log.info("e2b.swept", instance=instance_id, found=len(found), killed=sum(results))
    return [o for o, ok in zip(orphans, results, strict=True) if ok]


class Reaper:
    """Runs clean-ups (kills) that must finish even when their caller is cancelled.

    Each clean-up is a task owned here, bounded by *limit*; the caller awaits
    it through ``asyncio.shield``, so cancelling the caller (a supervisor's
    stop timeout) stops the waiting, never the kill.
    """

    def __init__(self, limit: float) -> None:
        self._limit = limit
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, job: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._bounded(job, name), name=f"e2b-reap:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    async def _bounded(self, job: Coroutine[Any, Any, Any], name: str) -> None:
        try:
            async with asyncio.timeout(self._limit):
                await job
        except TimeoutError:
            log.warning("e2b.cleanup_slow", cleanup=name)
        except SandboxLost:
            log.info("e2b.cleanup_moot", cleanup=name)  # what it would end ended with its sandbox
        except Exception as exc:  # noqa: BLE001 - a clean-up logs; nothing awaits its error
            log.warning("e2b.cleanup_failed", cleanup=name, error=repr(exc))

    async def drain(self) -> None:
        """Wait (bounded) for clean-ups still running, e.g. from cancelled callers."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._limit)
