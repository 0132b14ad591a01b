"""A smoke test against the real E2B service: runs only with ``E2B_API_KEY`` set.

It creates one sandbox (billed to that key's account for about a minute),
runs a command with streamed output, takes a screenshot, starts the stream,
kills the sandbox, and checks that ``AsyncSandbox.list`` finds nothing of
this run left.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from sandboxes.base import SandboxSpec, Stream
from sandboxes.e2b import E2BConfig, E2BSandbox
from sandboxes.e2b_sdk import METADATA_APP

pytestmark = pytest.mark.skipif(
    not os.environ.get("E2B_API_KEY"),
    reason="live E2B smoke test: set E2B_API_KEY to run it (it creates and kills one sandbox)",
)


@pytest.mark.timeout(600)
async def test_a_real_sandbox_runs_streams_shows_and_is_gone_after_close() -> None:
    """Against E2B itself: command output streams, the screen and stream work, and close leaves nothing."""
    config = E2BConfig.from_env(instance_id=f"deskhive-smoke-{uuid.uuid4().hex[:12]}", sandbox_timeout=600)
    spec = SandboxSpec(session_id=f"smoke_{uuid.uuid4().hex[:16]}", username="smoke", data_dir=Path())
    box = E2BSandbox(spec, config)
    chunks: list[tuple[Stream, str]] = []

    async def sink(stream: Stream, data: str) -> None:
        chunks.append((stream, data))

    try:
        code = await box.run("echo hello; echo oops >&2; exit 3", timeout=60, on_output=sink)
        assert code == 3
        assert ("stdout", "hello\n") in chunks and ("stderr", "oops\n") in chunks
        assert (await box.screenshot()).startswith(b"\x89PNG")
        await box.start_desktop()
        assert box.stream_url is not None and box.stream_url.startswith("https://")
    finally:
        await box.close()
    left = await config.connect().list_ids({"app": METADATA_APP, "instance": config.instance_id})
    assert left == []
