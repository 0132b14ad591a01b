"""The model endpoint's failures, through a real HTTP server: retries, delays, clear errors, no key."""

from __future__ import annotations

import json

import aiohttp
import pytest
from structlog.testing import capture_logs

from agent import ModelConfig, run_agent
from protocol.errors import CommandTimeout, GatewayError, ModelFailed, SandboxBroken
from tests.fakes_agent import Answer, ModelServer, RecordingDesktop, RecordingLog, finish

KEY = "sk-live-0123456789abcdef"


@pytest.fixture
def model(endpoint: ModelServer) -> ModelConfig:
    return ModelConfig(url=endpoint.url, model="m", api_key=KEY, max_steps=3, retry_delay=0.01)


async def _run(model: ModelConfig, http: aiohttp.ClientSession, log: RecordingLog | None = None) -> str:
    async def sink(stream: str, data: str) -> None:
        pass

    result = await run_agent("task", RecordingDesktop(), model, http, log or RecordingLog(), sink)
    return result.answer


def _retries(log: RecordingLog) -> list[dict[str, object]]:
    return [kw for _, event, kw in log.entries if event == "model.retry"]


@pytest.mark.parametrize(
    ("header", "value", "delay"), [("Retry-After", "1", 1.0), ("retry-after-ms", "300", 0.3)]
)
async def test_rate_limit_waits_as_long_as_the_server_asks(
    endpoint: ModelServer,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    header: str,
    value: str,
    delay: float,
) -> None:
    """A 429 is retried after the delay its Retry-After or retry-after-ms names, then the task goes on."""
    endpoint.answer(Answer.json({"error": {"message": "slow down"}}, 429, **{header: value}), finish("ok"))
    log = RecordingLog()
    assert await _run(model, http, log) == "ok"
    first, second = endpoint.requests
    assert second.at - first.at >= delay * 0.95
    assert _retries(log) == [{"attempt": 1, "status": 429, "delay": delay}]


async def test_transient_failures_are_retried_a_bounded_number_of_times(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """503s are retried (twice by default); the third failure ends the task with the endpoint's words."""
    endpoint.answer(*[Answer(status=503, body=b"upstream overloaded") for _ in range(2)], finish("ok"))
    assert await _run(model, http) == "ok"
    assert len(endpoint.requests) == 3
    endpoint.answer(*[Answer(status=503, body=b"upstream overloaded") for _ in range(3)])
    with pytest.raises(ModelFailed, match="HTTP 503: upstream overloaded"):
        await _run(model, http)
    assert len(endpoint.requests) == 6


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_client_errors_are_not_retried(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession, status: int
) -> None:
    """A request the endpoint refuses fails at once, quoting the endpoint's message."""
    endpoint.answer(Answer.json({"error": {"message": "no such model 'm'"}}, status))
    with pytest.raises(ModelFailed, match=rf"HTTP {status}: .*no such model") as caught:
        await _run(model, http)
    assert not isinstance(caught.value, SandboxBroken)
    assert len(endpoint.requests) == 1


async def test_the_server_can_forbid_a_retry(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """x-should-retry: false on a 500 is honoured: one request, then the error."""
    endpoint.answer(Answer(status=500, headers={"x-should-retry": "false"}, body=b"broken for good"))
    with pytest.raises(ModelFailed, match="HTTP 500: broken for good"):
        await _run(model, http)
    assert len(endpoint.requests) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"choices": [{"message": {"content": "caf\xe9"}}]}', "not UTF-8"),
        (b"<html>oops</html>", "invalid JSON"),
        (b'{"error": "overloaded"}', "without a message"),
        (b'{"choices": []}', "without a message"),
    ],
)
async def test_an_answer_that_is_no_completion_is_a_clear_error(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession, body: bytes, message: str
) -> None:
    """Invalid UTF-8, non-JSON or JSON without a message end the task with a clear ModelFailed."""
    endpoint.answer(Answer(body=body, headers={"Content-Type": "application/json"}))
    with pytest.raises(ModelFailed, match=message):
        await _run(model, http)
    assert len(endpoint.requests) == 1


async def test_a_silent_endpoint_times_out_after_its_retries(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """Each request gets the model timeout; after the retries the task fails as a timeout."""
    endpoint.answer(Answer(hold=True), Answer(hold=True))
    slow = ModelConfig(url=endpoint.url, model="m", timeout=0.2, retries=1, retry_delay=0.01)
    with pytest.raises(CommandTimeout, match=r"did not answer within 0\.2 s"):
        await _run(slow, http)
    assert len(endpoint.requests) == 2


async def test_an_unreachable_endpoint_is_retried_then_named(http: aiohttp.ClientSession) -> None:
    """Connection errors are retried, then fail as 'unreachable'."""
    gone = ModelConfig(url="http://127.0.0.1:1/v1", model="m", retries=1, retry_delay=0.01)
    log = RecordingLog()
    with pytest.raises(ModelFailed, match="model endpoint unreachable"):
        await _run(gone, http, log)
    assert len(_retries(log)) == 1


@pytest.mark.parametrize(
    "answers",
    [
        [Answer(status=401, body=f'{{"error": "Incorrect API key provided: {KEY}"}}'.encode())],
        [Answer(status=500, body=f"proxy saw Bearer {KEY}".encode()) for _ in range(3)],
        [Answer(body=f"<html>{KEY}</html>".encode())],
        [Answer(body=json.dumps({"echo": KEY}).encode())],
        [Answer(body=KEY.encode() + b"\xff")],
        [Answer(hold=True), Answer(hold=True), Answer(hold=True)],
    ],
    ids=["401", "500-retried", "not-json", "no-message", "not-utf8", "timeout"],
)
async def test_the_key_never_reaches_an_error_or_a_log(
    endpoint: ModelServer, http: aiohttp.ClientSession, answers: list[Answer]
) -> None:
    """On every model error path the key stays out of the error text and every log line."""
    endpoint.answer(*answers)
    model = ModelConfig(url=endpoint.url, model="m", api_key=KEY, timeout=0.2, retry_delay=0.01)
    log = RecordingLog()
    with capture_logs() as captured, pytest.raises(GatewayError) as caught:
        await _run(model, http, log)
    assert endpoint.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in str(caught.value) and KEY not in caught.value.message
    assert KEY not in json.dumps([log.entries, captured], default=str)
