"""``/metrics``: the server's counters in the Prometheus text format.

Counting costs an integer increment on the hot path (``metrics.frames_received
+= 1``), never a label lookup per frame: the plain counters are attributes of
:class:`Metrics`, turned into metric families only when ``/metrics`` is read.
Histograms (job durations, desktop starts) are prometheus-client's own,
observed once per job. Each server has its own registry, so two servers in
one process (tests) never share a count. No label carries a session id, a
username or a secret.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENDED_REASONS = ("logout", "idle", "failed", "shutdown")
_JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, float("inf"))
_START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, float("inf"))


def ended_reason(state: str, reason: str, *, shutting_down: bool) -> str:
    """The ``reason`` label of an ended session: one of ``ENDED_REASONS``, never free text."""
    if state != "failed" and reason in ENDED_REASONS:
        return reason
    return "shutdown" if shutting_down and state != "failed" else "failed"


class Metrics(Collector):
    """A server's counters; *sessions*, *sockets* and *refusals* are read at scrape time.

    Without *sockets*, the gauge reads ``sockets_open``; *refusals* (by limit,
    e.g. ``Limits.refusals``) adds to the counts in ``refusals``.
    """

    def __init__(
        self,
        *,
        sessions: Callable[[], Mapping[str, int]] = dict,
        sockets: Callable[[], int] | None = None,
        refusals: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._sessions, self._refusals = sessions, refusals
        self.sockets_open = 0
        self._sockets = sockets if sockets is not None else lambda: self.sockets_open
        self.logins = 0
        self.frames_received = 0
        self.frames_sent = 0
        self.actor_crashes = 0
        self.actor_restarts = 0
        #: Reasons are seeded so that a scrape shows each one from the start.
        self.sessions_ended: Counter[str] = Counter(dict.fromkeys(ENDED_REASONS, 0))
        self.sandbox_failures: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.job_duration = Histogram(
            "deskhive_job_duration_seconds",
            "Time from a job's start to its result",
            ["kind"],
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.desktop_start = Histogram(
            "deskhive_desktop_start_seconds",
            "Time a desktop took to start",
            buckets=_START_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        sessions = GaugeMetricFamily("deskhive_sessions", "Live sessions by state", labels=["state"])
        for state, count in sorted(self._sessions().items()):
            sessions.add_metric([state], count)
        yield sessions
        yield GaugeMetricFamily("deskhive_sockets", "Open client WebSockets", value=self._sockets())
        for name, text, value in (
            ("deskhive_logins", "Sessions created by login", self.logins),
            ("deskhive_actor_crashes", "Session actors that crashed", self.actor_crashes),
            ("deskhive_actor_restarts", "Session actors restarted after a crash", self.actor_restarts),
            ("deskhive_frames_received", "Client frames received on WebSockets", self.frames_received),
            ("deskhive_frames_sent", "Frames sent to WebSocket clients", self.frames_sent),
        ):
            yield CounterMetricFamily(name, text, value=value)
        refusals = Counter(self.refusals)
        refusals.update(self._refusals())
        for name, text, label, counts in (
            ("deskhive_sessions_ended", "Sessions ended, by reason", "reason", self.sessions_ended),
            ("deskhive_sandbox_failures", "Sandbox failures, by backend", "sandbox", self.sandbox_failures),
            ("deskhive_refusals", "Requests refused by a limit", "limit", refusals),
        ):
            family = CounterMetricFamily(name, text, labels=[label])
            for key, count in sorted(counts.items()):
                family.add_metric([key], count)
            yield family
