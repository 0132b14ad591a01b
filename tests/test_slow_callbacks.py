"""`make test-dev` fails a test whose callback blocks the event loop; `make test` does not."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.slow_callbacks import SLOW_CALLBACK_VAR

ROOT = Path(__file__).resolve().parents[1]
INNER = """
import asyncio
import time


async def test_blocks_the_loop():
    time.sleep(0.3)  # the blocking call under test, on the loop


async def test_yields():
    await asyncio.sleep(0)
"""
CONFTEST = 'pytest_plugins = ("tests.slow_callbacks",)\n'


async def run_inner(tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "conftest.py").write_text(CONFTEST)
    # The guard is on only where this test asks, even when the suite runs under it.
    base = {k: v for k, v in os.environ.items() if k != SLOW_CALLBACK_VAR}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--asyncio-mode=auto",
        "-o", "asyncio_default_fixture_loop_scope=function", *args, "test_inner.py",
        cwd=tmp_path, env={**base, "PYTHONPATH": str(ROOT), **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(50):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_a_slow_callback_fails_its_test_naming_it(tmp_path: Path) -> None:
    """Under the guard, the test that blocked the loop fails, naming the callback; the other passes."""
    code, out = await run_inner(tmp_path, "--asyncio-debug", **{SLOW_CALLBACK_VAR: "0.1"})
    assert code == 1, out
    assert "1 failed, 1 passed" in out, out
    assert "FAILED test_inner.py::test_blocks_the_loop" in out, out
    assert "slow callbacks on the event loop during call" in out and "test_blocks_the_loop()" in out, out
    # Where the loop was held, from the watchdog's look at the stack.
    assert "where the loop was held:" in out and "time.sleep(0.3)" in out, out


async def test_without_the_guard_slow_callbacks_pass(tmp_path: Path) -> None:
    """Without DESKHIVE_SLOW_CALLBACK (as in `make test`) a slow callback fails nothing, debug mode or not."""
    code, out = await run_inner(tmp_path, "--asyncio-debug")
    assert code == 0 and "2 passed" in out, out
