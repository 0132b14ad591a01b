"""``Metrics`` renders the spec's names in the Prometheus text format, each count seen to move."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_render_with_the_spec_names_and_move() -> None:
    """Each counter and gauge of the spec's table is there, parsed by prometheus-client's own parser."""
    metrics = Metrics(sessions=lambda: {"idle": 2, "busy": 1}, sockets=lambda: 3)
    before = samples(metrics)
    assert before[("deskhive_logins_total", ())] == 0
    assert before[("deskhive_sessions_ended_total", (("reason", "idle"),))] == 0
    metrics.logins += 2
    metrics.frames_received += 5
    metrics.frames_sent += 6
    metrics.actor_crashes += 1
    metrics.actor_restarts += 1
    metrics.sessions_ended["logout"] += 1
    metrics.sandbox_failures["local"] += 1
    metrics.refusals["max_sessions"] += 1
    metrics.job_duration.labels("run_command").observe(0.2)
    metrics.desktop_start.observe(0.3)
    after = samples(metrics)
    assert after[("deskhive_sessions", (("state", "idle"),))] == 2
    assert after[("deskhive_sockets", ())] == 3
    assert after[("deskhive_logins_total", ())] == 2
    assert after[("deskhive_frames_received_total", ())] == 5
    assert after[("deskhive_frames_sent_total", ())] == 6
    assert after[("deskhive_actor_crashes_total", ())] == 1
    assert after[("deskhive_actor_restarts_total", ())] == 1
    assert after[("deskhive_sessions_ended_total", (("reason", "logout"),))] == 1
    assert after[("deskhive_sandbox_failures_total", (("sandbox", "local"),))] == 1
    assert after[("deskhive_refusals_total", (("limit", "max_sessions"),))] == 1
    assert after[("deskhive_job_duration_seconds_count", (("kind", "run_command"),))] == 1
    assert after[("deskhive_desktop_start_seconds_count", ())] == 1


def test_two_servers_never_share_a_count() -> None:
    """Each Metrics has its own registry: counting in one leaves the other at zero."""
    first, second = Metrics(), Metrics()
    first.logins += 1
    first.job_duration.labels("ping").observe(1)
    assert samples(second)[("deskhive_logins_total", ())] == 0
    assert ("deskhive_job_duration_seconds_count", (("kind", "ping"),)) not in samples(second)
