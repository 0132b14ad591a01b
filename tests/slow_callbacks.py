"""`make test-dev`'s guard: a callback that holds the event loop too long fails its test.

With ``DESKHIVE_SLOW_CALLBACK`` set (seconds; the Makefile sets 0.1, SPEC's
bound on one call), every loop pytest-asyncio makes runs in asyncio's debug
mode with that ``slow_callback_duration``, and each "Executing <callback>
took N seconds" it logs fails the test during which it ran, naming the
callback. Without the variable (``make test``) nothing here is active.

asyncio times callbacks by the wall clock. On a shared machine a callback
may wait for a CPU through no fault of its own, so the time this thread
spent runnable but not running in that turn of the loop (Linux schedstat)
is taken off: the guard fails code that computes or blocks, not a busy box.
So is the time the cyclic garbage collector ran: after hundreds of tests in
one process, in debug mode (which keeps a stack with every future), a full
collection of the test process's heap takes a few hundred milliseconds,
which says nothing of the code under test (the server itself freezes its
start-up heap and collects rarely, see ``cli.freeze_startup_heap``; its
memory over time is the soak's figure in ``make bench``). And since the
callback named is often just the test's own task, a watchdog thread takes
the stack of a turn still running past the bound: the failure shows where
the loop was held.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Generator
from types import FrameType
from typing import Any

import pytest

SLOW_CALLBACK_VAR = "DESKHIVE_SLOW_CALLBACK"
#: Frames of the held stack shown, innermost last.
STACK_FRAMES = 12


class Collections:
    """Seconds the cyclic garbage collector has run, per thread (``gc.callbacks``)."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self.spent: dict[int, float] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        thread = threading.get_ident()
        if phase == "start":
            self._started[thread] = time.perf_counter()
        elif (began := self._started.pop(thread, None)) is not None:
            self.spent[thread] = self.spent.get(thread, 0.0) + time.perf_counter() - began


COLLECTIONS = Collections()


def cpu_wait() -> float:
    """Seconds this thread has been runnable but not running (Linux schedstat); 0 where unknown."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class TimedSelector:
    """The loop's selector, noting when each turn's callbacks start (``select`` returned)."""

    def __init__(self, inner: Any, loop: SlowCallbackLoop) -> None:
        self._inner, self._loop = inner, weakref.ref(loop)

    def select(self, timeout: float | None = None) -> Any:
        ready = self._inner.select(timeout)
        loop = self._loop()
        if loop is not None:
            loop.busy_since, loop.thread = time.monotonic(), threading.get_ident()
        return ready

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class SlowCallbackLoop(asyncio.SelectorEventLoop):
    """A loop that keeps what the guard needs: CPU wait, busy time, a held stack."""

    def __init__(self) -> None:
        super().__init__()
        self._selector = TimedSelector(self._selector, self)  # type: ignore[has-type]
        self.waited = 0.0
        self.collected = 0.0
        self.busy_since: float | None = None
        self.thread = 0
        self.stack = ""
        LOOPS.add(self)

    def _run_once(self) -> None:
        self.waited, self.stack = cpu_wait(), ""
        self.collected = COLLECTIONS.spent.get(threading.get_ident(), 0.0)
        try:
            super()._run_once()  # type: ignore[misc]
        finally:
            self.busy_since = None


LOOPS: weakref.WeakSet[SlowCallbackLoop] = weakref.WeakSet()


def watch(seconds: float, stop: threading.Event) -> None:
    """Takes the stack of every loop whose turn has run longer than *seconds*."""
    while not stop.wait(seconds / 4):
        now = time.monotonic()
        for loop in list(LOOPS):
            since = loop.busy_since
            if since is not None and now - since > seconds and not loop.stack:
                frame = sys._current_frames().get(loop.thread)
                if frame is not None:
                    loop.stack = held_stack(frame)


def held_stack(frame: FrameType) -> str:
    """The stack inside the running callback (below asyncio's ``Handle._run``)."""
    frames = traceback.extract_stack(frame)
    runs = [i for i, f in enumerate(frames) if f.filename.endswith("asyncio/events.py")]
    inside = frames[runs[-1] + 1 :] if runs else frames
    return "".join(traceback.format_list(inside[-STACK_FRAMES:]))


class SlowCallbacks(logging.Handler):
    """Keeps asyncio's slow-callback warnings until a test's report takes them."""

    def __init__(self, seconds: float) -> None:
        super().__init__(logging.WARNING)
        self.seconds = seconds
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not (isinstance(record.msg, str) and record.msg.startswith("Executing %s took")):
            return
        running = asyncio.get_running_loop()
        loop = running if isinstance(running, SlowCallbackLoop) else None
        waited = cpu_wait() - loop.waited if loop else 0.0
        collected = COLLECTIONS.spent.get(threading.get_ident(), 0.0) - loop.collected if loop else 0.0
        took = record.args[1] if isinstance(record.args, tuple) else None
        if isinstance(took, float) and took - waited - collected < self.seconds:
            return  # the machine was busy, or the test process collected its own heap
        text = (
            f"{record.getMessage()} ({waited:.3f} s of it waiting for a CPU, "
            f"{collected:.3f} s collecting garbage)"
        )
        if loop and loop.stack:
            text += "\nwhere the loop was held:\n" + loop.stack
        self.seen.append(text)


class SlowCallbackPolicy(asyncio.DefaultEventLoopPolicy):
    """Every loop pytest-asyncio makes runs in debug mode with our threshold."""

    _loop_factory = SlowCallbackLoop

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = self.seconds
        return loop


SLOW_CALLBACKS = pytest.StashKey[SlowCallbacks]()
WATCHDOG = pytest.StashKey[tuple[threading.Thread, threading.Event]]()


def pytest_configure(config: pytest.Config) -> None:
    seconds = float(os.environ.get(SLOW_CALLBACK_VAR) or 0)
    if seconds <= 0:
        return
    handler = SlowCallbacks(seconds)
    logging.getLogger("asyncio").addHandler(handler)
    gc.callbacks.append(COLLECTIONS)
    config.stash[SLOW_CALLBACKS] = handler
    asyncio.set_event_loop_policy(SlowCallbackPolicy(seconds))
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(seconds, stop), name="slow-callback-watchdog", daemon=True)
    thread.start()
    config.stash[WATCHDOG] = (thread, stop)


def pytest_unconfigure(config: pytest.Config) -> None:
    thread, stop = config.stash.get(WATCHDOG, (None, None))
    if thread is not None and stop is not None:
        stop.set()
        thread.join(5)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    handler = item.config.stash.get(SLOW_CALLBACKS, None)
    if handler is None or not handler.seen:
        return report
    slow, handler.seen = handler.seen, []
    text = f"slow callbacks on the event loop during {call.when}:\n" + "\n".join(slow)
    if report.failed:
        report.sections.append(("slow callbacks", text))
    else:
        report.outcome, report.longrepr = "failed", text
    return report
