"""``make bench``: deskhive's performance figures against their targets.

Every figure is measured on this machine in this run, the ping figures
against a plain aiohttp echo server measured alongside (interleaved rounds,
medians), so the verdicts do not depend on the machine's speed:

- ping round trips through the actor at 100 sockets x 4 in flight:
  throughput >= 0.7 x the echo's, p99 latency <= 2 x the echo's; and the
  cost of metrics: the same against a server with ``--metrics off`` in the
  same rounds, whose ratio to the echo the metered one keeps within 5%;
- 10,000 idle sessions: <= 20 KiB each above the empty server (VmRSS), and
  logged in at >= 2,000 a second;
- one sweep over 10,000 sessions in < 50 ms (in this process);
- memory after a soak: three rounds of 1,000 sessions (log in, connect, ping,
  reconnect every few seconds, log out) against one server; its VmRSS after
  the second round's logouts <= 1.1 x after the first's (``bench/soak.py``);
- restoring 1,000 stored sessions (50 events each) from a SQLite store at
  start-up, until the server serves: < 1 s;
- the local sandbox's figures, from ``bench/local_bench.py`` when present.

Servers are pinned to core 0 and the load generator to core 1 (when there are
two), so that neither starves the other. A table goes to stdout and the
figures to ``bench/results.json``. Every child process is stopped on the way
out, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import importlib
import inspect
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import attrs

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
# Run as a script (``python bench/run.py``): the project is one folder up.
sys.path[:0] = [p for p in (str(ROOT), str(HERE)) if p not in sys.path]

PY: Final = sys.executable
RESULTS: Final = HERE / "results.json"
TOTAL_TIMEOUT_S: Final = 185.0
START_TIMEOUT_S: Final = 20.0
STOP_TIMEOUT_S: Final = 5.0

CONNECTIONS: Final = 100
INFLIGHT: Final = 4
WARMUP_S: Final = 1.5
ROUND_S: Final = 5.0
ROUNDS: Final = 3
IDLE_SESSIONS: Final = 10_000
LOGIN_CONCURRENCY: Final = 50
SWEEP_SESSIONS: Final = 10_000
SWEEP_REPEATS: Final = 5
RESTORE_SESSIONS: Final = 1_000
RESTORE_EVENTS: Final = 50
SOAK_ROUNDS: Final = 3
#: Bound on the wait for the server to count no session after a round.
SOAK_SETTLE_S: Final = 15.0

SERVER_CPU: Final = {0}
LOAD_CPU: Final = {1}
LISTEN_RE: Final = re.compile(rb"listening on (http://127\.0\.0\.1:\d+)")


# ----------------------------------------------------------------------------
# Figures


@attrs.define
class Figure:
    """One measured figure and its verdict (``target`` None: report only)."""

    name: str
    value: float | None
    unit: str
    target: float | None = None
    #: ">=" or "<" or "<=": how ``value`` must compare to ``target``.
    op: str = "<="
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None or math.isnan(self.value):
            return "N/A"
        if self.target is None:
            return "REPORT"
        ok = {">=": self.value >= self.target, "<": self.value < self.target, "<=": self.value <= self.target}
        return "PASS" if ok[self.op] else "MISS"

    @property
    def miss_by(self) -> str:
        if self.verdict != "MISS" or self.value is None or self.target is None:
            return ""
        gap = abs(self.value - self.target)
        word = "short by" if self.op == ">=" else "over by"
        return f"{word} {fmt(gap)} {self.unit} ({100 * gap / self.target:.0f}% of target)"

    def as_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "verdict": self.verdict, "miss_by": self.miss_by}


def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def print_table(figures: list[Figure]) -> None:
    rows = [
        (
            f.name,
            f"{f.op} {fmt(f.target)} {f.unit}" if f.target is not None else "(report)",
            f"{fmt(f.value)} {f.unit}" if f.value is not None else f.note,
            f.verdict,
            f.miss_by,
        )
        for f in figures
    ]
    header = ("figure", "target", "measured", "verdict", "miss")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print("\n" + line.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
    for f in figures:
        if f.note and f.value is not None:
            print(f"  * {f.name}: {f.note}")


# ----------------------------------------------------------------------------
# Child processes


class Child:
    """A child process whose output is drained (a full pipe would stall it)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, cpus: set[int]) -> None:
        self.name = name
        self.proc = proc
        self.tail: deque[bytes] = deque(maxlen=50)
        self.lines: asyncio.Queue[bytes] = asyncio.Queue()
        pin(proc.pid, cpus)
        self._drain = asyncio.create_task(self._read(), name=f"drain:{name}")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.tail.append(line)
            self.lines.put_nowait(line)

    async def line(self, timeout: float) -> bytes:
        """The next line of output, or ``RuntimeError`` once the child is gone."""
        async with asyncio.timeout(timeout):
            while True:
                get = asyncio.ensure_future(self.lines.get())
                try:
                    done, _ = await asyncio.wait({get, self._drain}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    get.cancel()
                if get in done:
                    return get.result()
                if self.lines.empty():
                    raise RuntimeError(f"{self.name} exited: {self.output()}")

    async def json_line(self, timeout: float) -> dict[str, Any]:
        """The next line that is a JSON object (warnings and such are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.line(timeout)).strip()
                if line.startswith(b"{"):
                    obj: dict[str, Any] = json.loads(line)
                    return obj

    def output(self) -> str:
        return b"".join(self.tail).decode(errors="replace")[-2000:]

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the child so far (from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for row in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
        raise RuntimeError(f"no VmRSS for {self.name}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._drain, STOP_TIMEOUT_S)


def pin(pid: int, cpus: set[int]) -> None:
    # Only where both cores exist; elsewhere the OS places them.
    if (
        hasattr(os, "sched_setaffinity")
        and cpus <= os.sched_getaffinity(0)
        and len(os.sched_getaffinity(0)) > 1
    ):
        os.sched_setaffinity(pid, cpus)


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{ROOT}" if path else str(ROOT)}


@contextlib.asynccontextmanager
async def child(name: str, args: list[str], cpus: set[int], *, stdin: bool = False) -> AsyncIterator[Child]:
    proc = await asyncio.create_subprocess_exec(
        PY,
        *args,
        cwd=ROOT,
        env=child_env(),
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    c = Child(name, proc, cpus)
    try:
        yield c
    finally:
        if stdin and proc.stdin is not None:
            proc.stdin.close()
        await c.stop()


async def url_of(c: Child) -> str:
    async with asyncio.timeout(START_TIMEOUT_S):
        while True:
            if m := LISTEN_RE.search(await c.line(START_TIMEOUT_S)):
                return m.group(1).decode()


def deskhive_args(data_dir: str, *extra: str) -> list[str]:
    # Nothing may be reaped while it is measured: idle timeout and sweep a day away.
    return [
        "-m",
        "cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--sandbox",
        "null",
        "--log-level",
        "warning",
        "--log-format",
        "json",
        "--idle-timeout",
        "86400",
        "--sweep-interval",
        "86400",
        "--data-dir",
        data_dir,
        # The actor layer is measured, not the disk (the restore stage measures that).
        "--store",
        "memory",
        *extra,
    ]


# ----------------------------------------------------------------------------
# Ping round trips: deskhive against the echo baseline


async def ping_stage(tmp: str) -> tuple[list[Figure], dict[str, Any]]:
    async with (
        child("echo", [str(HERE / "echo_baseline.py")], SERVER_CPU) as echo,
        child("deskhive", deskhive_args(tmp), SERVER_CPU) as desk,
        child("plain", deskhive_args(f"{tmp}/plain", "--metrics", "off"), SERVER_CPU) as plain,
    ):
        echo_url, desk_url, plain_url = await url_of(echo), await url_of(desk), await url_of(plain)
        load_args = [
            str(HERE / "load.py"),
            "ping",
            "--echo-url",
            echo_url.replace("http", "ws") + "/ws",
            "--deskhive-url",
            desk_url,
            "--plain-url",
            plain_url,
            "--connections",
            str(CONNECTIONS),
            "--inflight",
            str(INFLIGHT),
        ]
        async with child("load", load_args, LOAD_CPU, stdin=True) as load:
            ready = await load.json_line(60.0)
            if "ready" not in ready:
                raise RuntimeError(f"load generator: {ready}")
            servers = {"echo": echo, "deskhive": desk, "plain": plain}
            for target in servers:  # warm-up, not recorded
                await ping_window(load, servers[target], target, WARMUP_S)
            runs: list[dict[str, Any]] = []
            for k in range(ROUNDS):
                # The two deskhive servers swap places each round, so that
                # neither always runs in the other's wake.
                for target in ("echo", "deskhive", "plain") if k % 2 == 0 else ("echo", "plain", "deskhive"):
                    runs.append(await ping_window(load, servers[target], target, ROUND_S))
                    print(
                        f"  {target:9} {runs[-1]['rate']:9,.0f} pings/s  p99 {runs[-1]['p99_ms']:6.1f} ms  "
                        f"server cpu {runs[-1]['server_cpu']:.2f}  client cpu {runs[-1]['client_cpu']:.2f}",
                        flush=True,
                    )
            load.send("quit")
    return ping_figures(runs), {"runs": runs}


async def ping_window(load: Child, server: Child, target: str, seconds: float) -> dict[str, Any]:
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    load.send(f"run {target} {seconds}")
    report = await load.json_line(seconds + 30.0)
    if "error" in report:
        raise RuntimeError(f"load generator: {report['error']}")
    report["server_cpu"] = (server.cpu_seconds() - cpu0) / (time.perf_counter() - t0)
    return report


def ping_figures(runs: list[dict[str, Any]]) -> list[Figure]:
    def median(target: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs if r["target"] == target))

    echo_rate, desk_rate = median("echo", "rate"), median("deskhive", "rate")
    echo_p99, desk_p99 = median("echo", "p99_ms"), median("deskhive", "p99_ms")
    cpu = {t: (median(t, "server_cpu"), median(t, "client_cpu")) for t in ("echo", "deskhive", "plain")}
    where = "; ".join(f"{t} server/client cpu {s:.2f}/{c:.2f}" for t, (s, c) in cpu.items())
    return [
        Figure("ping throughput, echo baseline", echo_rate, "pings/s", note=where),
        Figure("ping throughput, deskhive", desk_rate, "pings/s"),
        Figure("ping throughput vs echo", desk_rate / echo_rate, "x", 0.7, ">="),
        Figure("ping p99, echo baseline", echo_p99, "ms"),
        Figure("ping p99, deskhive", desk_p99, "ms"),
        Figure("ping p99 vs echo", desk_p99 / echo_p99, "x", 2.0, "<="),
        # CPU per round trip does not depend on how busy the machine is.
        Figure("server CPU per ping, echo baseline", 1e6 * cpu["echo"][0] / echo_rate, "us"),
        Figure("server CPU per ping, deskhive", 1e6 * cpu["deskhive"][0] / desk_rate, "us"),
        *metrics_figures(runs, echo_rate, desk_rate, cpu["plain"][0]),
    ]


def metrics_figures(
    runs: list[dict[str, Any]], echo_rate: float, desk_rate: float, plain_cpu: float
) -> list[Figure]:
    """What counting costs: the metered server's ratio to the echo against the unmetered one's."""
    plain_rate = float(statistics.median(r["rate"] for r in runs if r["target"] == "plain"))
    with_metrics, without = desk_rate / echo_rate, plain_rate / echo_rate
    note = f"vs echo: {with_metrics:.3f} with metrics, {without:.3f} without"

    def cpu_per_ping(target: str) -> float:
        # Per round, then the median: CPU per ping hardly depends on how busy the machine is.
        return float(statistics.median(r["server_cpu"] / r["rate"] for r in runs if r["target"] == target))

    return [
        Figure("ping throughput, deskhive --metrics off", plain_rate, "pings/s"),
        Figure("server CPU per ping, deskhive --metrics off", 1e6 * plain_cpu / plain_rate, "us"),
        Figure("ping vs echo, metrics on / off", with_metrics / without, "x", 0.95, ">=", note=note),
        Figure(
            "server CPU per ping, metrics on / off", cpu_per_ping("deskhive") / cpu_per_ping("plain"), "x"
        ),
    ]


# ----------------------------------------------------------------------------
# 10,000 idle sessions: memory and login rate


async def baseline_login_rate() -> dict[str, Any]:
    """The same login load against a plain aiohttp handler, in this run."""
    async with child("echo", [str(HERE / "echo_baseline.py")], SERVER_CPU) as echo:
        url = await url_of(echo)
        args = [str(HERE / "load.py"), "logins", "--deskhive-url", url, "--count", str(IDLE_SESSIONS)]
        async with child("load", [*args, "--concurrency", str(LOGIN_CONCURRENCY)], LOAD_CPU) as load:
            report: dict[str, Any] = await load.json_line(60.0)
    return report


async def idle_stage(tmp: str) -> tuple[list[Figure], dict[str, Any]]:
    baseline = await baseline_login_rate()
    async with child("deskhive", deskhive_args(tmp), SERVER_CPU) as desk:
        url = await url_of(desk)
        await asyncio.sleep(0.5)  # let start-up garbage settle before the baseline
        before = desk.rss_kib()
        cpu0 = desk.cpu_seconds()
        args = [
            str(HERE / "load.py"),
            "logins",
            "--deskhive-url",
            url,
            "--count",
            str(IDLE_SESSIONS),
            "--concurrency",
            str(LOGIN_CONCURRENCY),
        ]
        async with child("load", args, LOAD_CPU) as load:
            report = await load.json_line(60.0)
        server_cpu = (desk.cpu_seconds() - cpu0) / max(report["seconds"], 1e-9)
        after = desk.rss_kib()
    per_session = (after - before) / IDLE_SESSIONS
    detail = {
        "rss_before_kib": before,
        "rss_after_kib": after,
        "logins": report,
        "baseline_logins": baseline,
        "server_cpu": server_cpu,
    }
    bad = report["ok"] != IDLE_SESSIONS
    return [
        Figure(
            "idle session memory",
            per_session,
            "KiB",
            20.0,
            "<=",
            note=f"VmRSS {before:,} -> {after:,} KiB over {report['ok']:,} sessions",
        ),
        Figure(
            "login rate",
            report["rate"],
            "logins/s",
            2000.0,
            ">=",
            note=(
                f"{report['ok']:,} in {report['seconds']:.2f} s, concurrency {LOGIN_CONCURRENCY}; "
                f"server cpu {server_cpu:.2f}, client cpu {report['client_cpu']:.2f}"
                + (f"; statuses {report['statuses']}" if bad else "")
            ),
        ),
        Figure("login rate, plain aiohttp handler", baseline["rate"], "logins/s"),
        Figure("login rate vs plain aiohttp handler", report["rate"] / baseline["rate"], "x"),
        Figure(
            "server CPU per login",
            1e3 * server_cpu * report["seconds"] / max(report["ok"], 1),
            "ms",
            note="1 / this is the login rate one whole core could reach",
        ),
    ], detail


# ----------------------------------------------------------------------------
# A sweep over 10,000 sessions (in this process)


async def sweep_stage(tmp: str) -> tuple[list[Figure], dict[str, Any]]:
    from cli import freeze_startup_heap
    from sandboxes.null import NullSandbox
    from supervisor import Supervisor, SupervisorConfig

    freeze_startup_heap()  # as `deskhive serve` does before it serves
    config = SupervisorConfig(idle_timeout=86_400.0, sweep_interval=86_400.0, data_dir=Path(tmp))
    supervisor = Supervisor(config, NullSandbox)
    task = asyncio.create_task(supervisor.run(), name="bench-supervisor")
    try:
        await supervisor.wait_running()
        spawn0 = time.perf_counter()
        for i in range(SWEEP_SESSIONS):
            await supervisor.spawn(f"s{i}")
        spawned_in = time.perf_counter() - spawn0
        # The full collection that 10,000 new sessions made due is paid here,
        # not inside whichever sweep happens to come first.
        gc.collect()
        idle_ms = [timed_ms(supervisor.sweep) for _ in range(SWEEP_REPEATS)]
        # Every session is now "idle for too long": this sweep asks all to stop.
        supervisor.config = attrs.evolve(config, idle_timeout=1e-9)
        reaped: list[int] = []
        reap_ms = timed_ms(lambda: reaped.append(supervisor.sweep()))
    finally:
        await supervisor.aclose()
        await asyncio.wait_for(task, 60.0)
    idle = statistics.median(idle_ms)
    return [
        Figure(
            "sweep, 10,000 sessions, none idle",
            idle,
            "ms",
            50.0,
            "<",
            note=f"median of {SWEEP_REPEATS}: {', '.join(f'{v:.1f}' for v in idle_ms)} ms",
        ),
        Figure(
            "sweep, 10,000 sessions, all idle",
            reap_ms,
            "ms",
            50.0,
            "<",
            note=f"asked {reaped[0]:,} sessions to stop",
        ),
    ], {"spawn_seconds": spawned_in, "idle_ms": idle_ms, "reap_ms": reap_ms, "reaped": reaped[0]}


async def restore_stage(tmp: str) -> tuple[list[Figure], dict[str, Any]]:
    """Start-up of a server whose SQLite store holds 1,000 sessions: open, load, restore, serve."""
    from sandboxes.null import NullSandbox
    from store import SqliteStore
    from supervisor import Supervisor, SupervisorConfig

    path = Path(tmp) / "restore.db"
    written = await fill_store(path)
    config = SupervisorConfig(idle_timeout=86_400.0, sweep_interval=86_400.0, data_dir=Path(tmp))
    supervisor = Supervisor(config, NullSandbox, store=SqliteStore(path))
    start = time.perf_counter()
    task = asyncio.create_task(supervisor.run(), name="bench-restore")
    try:
        await supervisor.wait_running()
        seconds = time.perf_counter() - start
        restored = len(supervisor)
    finally:
        await supervisor.aclose()
        await asyncio.wait_for(task, 60.0)
    note = f"{restored:,} of {RESTORE_SESSIONS:,} sessions back, {RESTORE_EVENTS} events each"
    return [Figure("restore 1,000 sessions at start-up", seconds, "s", 1.0, "<", note=note)], {
        "restore_seconds": seconds,
        "restored": restored,
        "fill_seconds": written,
    }


async def fill_store(path: Path) -> float:
    """Write the sessions a restore stage brings back, as a server would have; seconds it took."""
    from protocol import codec
    from protocol import messages as m
    from store import SessionRecord, SqliteStore

    start = time.perf_counter()
    store = SqliteStore(path)
    await store.open()
    now = time.time()
    records = [
        SessionRecord(
            session_id=f"r{i}_1700000000_{i:016x}",
            username=f"r{i}",
            token_hash=i.to_bytes(32, "big"),
            created=now,
            last_active=now,
        )
        for i in range(RESTORE_SESSIONS)
    ]
    await asyncio.gather(*(store.create_session(r) for r in records))
    for r in records:
        for seq in range(1, RESTORE_EVENTS + 1):
            frame = codec.encode_event(m.Output(id="c1", stream="stdout", data=f"line {seq}\n"), seq)
            store.append(r.session_id, seq, frame)
    await store.aclose()
    return time.perf_counter() - start


def timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


# ----------------------------------------------------------------------------
# The local sandbox (bench/local_bench.py, when it exists)

#: (figure, unit, target, op, function of bench/local_bench.py, its arguments, scale to the unit)
#: Proportional set size where it is measured (shared pages split), else resident.
MEMORY_FUNCS: Final = ("idle_desktops_pss_bytes", "idle_desktops_rss_bytes")
LocalFigure = tuple[str, str, float | None, str, tuple[str, ...], dict[str, int], float]
LOCAL_FIGURES: Final[tuple[LocalFigure, ...]] = (
    ("desktop start-to-ready median", "s", 1.0, "<", ("desktop_start_seconds",), {}, 1.0),
    ("bwrap `true` vs plain subprocess", "x", 3.0, "<=", ("bwrap_overhead_ratio",), {}, 1.0),
    ("first command of a session (jail start)", "ms", None, "<=", ("jail_start_seconds",), {}, 1000.0),
    ("memory, one idle desktop", "MiB", None, "<=", MEMORY_FUNCS, {"n": 1}, 2.0**-20),
    ("memory, 20 idle desktops", "MiB", None, "<=", MEMORY_FUNCS, {"n": 20}, 2.0**-20),
)
LOCAL_CALL_TIMEOUT_S: Final = 60.0


async def local_stage(tmp: str) -> tuple[list[Figure], dict[str, Any]]:
    try:
        module = importlib.import_module("local_bench")
    except ImportError as exc:
        return local_skipped(f"not measured yet (bench/local_bench.py: {exc})"), {}
    figures = []
    for name, unit, target, op, names, kwargs, scale in LOCAL_FIGURES:
        func = next(
            (getattr(module, n) for n in names if inspect.iscoroutinefunction(getattr(module, n, None))), None
        )
        if func is None:
            figures.append(
                Figure(name, None, unit, target, op, note=f"not measured yet (no {' or '.join(names)})")
            )
            continue
        figures.append(await local_figure(name, unit, target, op, func(**kwargs), scale))
    return figures, {f.name: {"value": f.value, "note": f.note} for f in figures}


async def local_figure(
    name: str, unit: str, target: float | None, op: str, call: Awaitable[Any], scale: float
) -> Figure:
    try:
        value = await asyncio.wait_for(call, LOCAL_CALL_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 (root, packages or a slow box: the rest still runs)
        return Figure(name, None, unit, target, op, note=f"skipped: {type(exc).__name__}: {exc}"[:200])
    if value is None:
        return Figure(name, None, unit, target, op, note="skipped: not available on this machine")
    if isinstance(value, int | float):
        return Figure(name, float(value) * scale, unit, target, op)
    return Figure(name, None, unit, target, op, note=f"unrecognised result {value!r}"[:200])


def local_skipped(why: str) -> list[Figure]:
    return [Figure(name, None, unit, target, op, note=why) for name, unit, target, op, *_ in LOCAL_FIGURES]


# ----------------------------------------------------------------------------
# Memory after a soak (bench/soak.py drives it)


@attrs.frozen
class SoakOptions:
    """``--soak-*``: the soak's size; a round of ~20 s shows a leak as well as a minute does."""

    sessions: int = 1000
    seconds: float = 20.0
    reconnect: float = 5.0

    @property
    def budget(self) -> float:
        return SOAK_ROUNDS * (self.seconds + 45.0)


async def soak_stage(tmp: str, options: SoakOptions) -> tuple[list[Figure], dict[str, Any]]:
    args = [str(HERE / "soak.py"), "--url", "", "--sessions", str(options.sessions)]
    args += ["--seconds", str(options.seconds), "--reconnect", str(options.reconnect)]
    rounds: list[dict[str, Any]] = []
    async with child("deskhive", deskhive_args(tmp), SERVER_CPU) as desk:
        args[2] = await url_of(desk)
        async with child("soak", args, LOAD_CPU, stdin=True) as load:
            if "ready" not in await load.json_line(30.0):
                raise RuntimeError(f"soak load: {load.output()}")
            rounds.append({"round": 0, "rss_kib": desk.rss_kib(), "fds": open_fds(desk)})
            for k in range(1, SOAK_ROUNDS + 1):
                load.send(f"round {k}")
                report = await load.json_line(options.seconds + 90.0)
                if "error" in report:
                    raise RuntimeError(f"soak load: {report['error']}")
                await until_no_sessions(args[2])
                rounds.append({**report, "rss_kib": desk.rss_kib(), "fds": open_fds(desk)})
                print(f"  round {k}: {soak_line(rounds[-1])}", flush=True)
            load.send("quit")
    return soak_figures(rounds, options), {"options": attrs.asdict(options), "rounds": rounds}


def soak_line(r: dict[str, Any]) -> str:
    errors = sum(r["errors"].values())
    return (
        f"{r['logins']:,} logins, {r['connects']:,} connects, {r['logouts']:,} logouts, {errors} errors "
        f"in {r['seconds']:.1f} s; VmRSS {r['rss_kib'] / 1024:.0f} MiB, {r['fds']} descriptors"
    )


def soak_figures(rounds: list[dict[str, Any]], options: SoakOptions) -> list[Figure]:
    rss = [r["rss_kib"] / 1024 for r in rounds]
    what = f"{options.sessions:,} sessions, {options.seconds:g} s, reconnect every {options.reconnect:g} s"
    before = f"{rounds[0]['fds']} descriptors; each round: {what}"
    figures = [Figure("soak: VmRSS before", rss[0], "MiB", note=before)]
    for r in rounds[1:]:
        errors = r["errors"]
        note = f"{r['logouts']:,} logged out, {r['connects']:,} connects, {r['fds']} descriptors"
        note += f"; errors {errors}" if errors else ""
        figures.append(Figure(f"soak: VmRSS after round {r['round']}", r["rss_kib"] / 1024, "MiB", note=note))
    figures += [
        Figure("soak: VmRSS round 2 / round 1", rss[2] / rss[1], "x", 1.10, "<="),
        Figure("soak: VmRSS round 3 / round 1", rss[3] / rss[1], "x"),
    ]
    return figures


async def until_no_sessions(url: str) -> None:
    """Wait until the server counts no session (logouts finish their cleanup after the 204)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(SOAK_SETTLE_S):
        while True:
            async with http.get(f"{url}/healthz") as resp:
                if (await resp.json()).get("sessions") == 0:
                    return
            await asyncio.sleep(0.1)


def open_fds(c: Child) -> int:
    return len(os.listdir(f"/proc/{c.proc.pid}/fd"))


# ----------------------------------------------------------------------------


#: (name, stage, most seconds it may take)
STAGES: Final = (
    ("ping", ping_stage, 95.0),
    ("idle sessions", idle_stage, 45.0),
    ("sweep", sweep_stage, 40.0),
    ("restore", restore_stage, 30.0),
    ("local", local_stage, 60.0),
)


Stage = Callable[[str], Awaitable[tuple[list[Figure], dict[str, Any]]]]
STAGE_NAMES: Final = (*(name for name, _, _ in STAGES), "soak")


def stages(ns: argparse.Namespace) -> list[tuple[str, Stage, float]]:
    """The stages asked for (``--stages``), the soak sized by ``--soak-*``."""
    soak = SoakOptions(ns.soak_sessions, ns.soak_seconds, ns.soak_reconnect)
    every: list[tuple[str, Stage, float]] = [
        *STAGES,
        ("soak", functools.partial(soak_stage, options=soak), soak.budget),
    ]
    wanted = set(ns.stages.split(",")) if ns.stages else {name for name, _, _ in every}
    unknown = wanted - {name for name, _, _ in every}
    if unknown:
        raise SystemExit(f"unknown stages: {', '.join(sorted(unknown))}")
    return [s for s in every if s[0] in wanted]


async def run_all(chosen: list[tuple[str, Stage, float]]) -> tuple[list[Figure], dict[str, Any]]:
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="deskhive-bench-") as tmp:
        soak_budget = sum(budget for name, _, budget in chosen if name == "soak")
        deadline = time.perf_counter() + TOTAL_TIMEOUT_S + soak_budget
        for name, stage, budget in chosen:
            print(f"== {name}", flush=True)
            started = time.perf_counter()
            # A late stage gets what is left: the table is printed either way.
            seconds = max(1.0, min(budget, deadline - started))
            try:
                async with asyncio.timeout(seconds):
                    got, detail = await stage(tmp)
            except TimeoutError:
                took = time.perf_counter() - started
                got, detail = [Figure(name, None, "", note=f"failed: timed out after {took:.0f} s")], {}
            except Exception as exc:  # noqa: BLE001 (one broken stage must not hide the others)
                got, detail = [Figure(name, None, "", note=f"failed: {type(exc).__name__}: {exc}"[:300])], {}
            figures += got
            details[name] = {**detail, "seconds": round(time.perf_counter() - started, 2)}
    return figures, details


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="deskhive's performance figures (make bench ARGS=...)")
    default = SoakOptions()
    parser.add_argument("--stages", default="", help="comma-separated, of: " + ", ".join(STAGE_NAMES))
    parser.add_argument("--soak-sessions", type=int, default=default.sessions, help="sessions per round")
    parser.add_argument("--soak-seconds", type=float, default=default.seconds, help="length of a round")
    parser.add_argument("--soak-reconnect", type=float, default=default.reconnect, help="seconds between")
    return parser.parse_args(argv)


async def main(ns: argparse.Namespace) -> int:
    configure_quiet_logging()
    figures, details = await run_all(stages(ns))
    print_table(figures)
    pressure = cpu_pressure()
    if pressure is not None and pressure > 10:
        print(
            f"\nnote: other work competed for the CPU ({pressure:.0f}% of the last minute, "
            "/proc/pressure/cpu): rates are low and noisy, the CPU-per-operation lines less so"
        )
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": sys.version.split()[0],
                    "cpu_pressure_avg60": pressure,
                },
                "figures": [f.as_json() for f in figures],
                "details": details,
            },
            indent=2,
        )
    )
    print(f"\nwritten {RESULTS.relative_to(ROOT)}")
    # A MISS is a finding, not a crash; a stage that could not run is.
    return 2 if any(f.note.startswith("failed:") for f in figures) else 0


def cpu_pressure() -> float | None:
    """Share of the last minute some task waited for a CPU (Linux PSI), in %."""
    try:
        some = Path("/proc/pressure/cpu").read_text().split("\n")[0]
    except OSError:
        return None
    return float(dict(kv.split("=") for kv in some.split()[1:])["avg60"])


def configure_quiet_logging() -> None:
    # The in-process supervisor logs per session: keep that off the table.
    from cli import configure_logging

    configure_logging("warning", "json")


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
