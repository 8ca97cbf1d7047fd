import asyncio
import fcntl
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from taskiq import InMemoryBroker

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def server_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def run_python(script: str, timeout: float = 120) -> str:
    """Run `script` in a fresh interpreter; its stdout (fails if it failed)."""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def require_server(name: str, port: int) -> None:
    """Skip (on a user's machine) or fail (under CI=true) without the server."""
    if server_answers(port):
        return
    reason = f"{name} is not answering on 127.0.0.1:{port}"
    if IN_CI:
        pytest.fail(f"{reason}; CI must run every server test", pytrace=False)
    pytest.skip(reason)


SENTINEL_LOCK = Path(tempfile.gettempdir()) / "batchtask-tests-sentinel.lock"
"""Held shared by every test on the Sentinel's master, exclusively by a test
that moves it (``@pytest.mark.moves_sentinel_master``)."""


@pytest.fixture(autouse=True)
def one_sentinel_master(request: pytest.FixtureRequest) -> Iterator[None]:
    """Keep a ``SENTINEL FAILOVER`` away from the other tests of that master.

    The workers stage runs in 4 processes; a failover run beside another
    sentinel test would lose that test's writes made in the failover's
    window (Redis replicates asynchronously) and send its connection kills
    to the old master. A file lock (``flock``) orders them across processes.
    """
    node = request.node
    if node.get_closest_marker("moves_sentinel_master") is not None:
        mode = fcntl.LOCK_EX
    elif "sentinel" in node.name:
        mode = fcntl.LOCK_SH
    else:
        yield
        return
    with SENTINEL_LOCK.open("a") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
async def broker() -> AsyncIterator[InMemoryBroker]:
    broker = InMemoryBroker()
    await broker.startup()
    yield broker
    await within(broker.wait_all(), 30)
    await broker.shutdown()


async def within(awaitable, seconds: float = 20):
    """Await with a generous bound that only turns a hang into a failure.

    Not ``asyncio.wait_for``: it waits for the cancellation it sends to be
    honoured, and taskiq's receiver (under ``broker.wait_all()``) swallows it,
    so a hang there would stay a hang.
    """
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        raise AssertionError(f"still waiting after {seconds} s: a hang")
    return task.result()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stress",
        action="store_true",
        default=False,
        help=(
            "run tests/test_stress.py long: ~500 random examples over wider "
            "ranges (same as BATCHTASK_STRESS=1)"
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    # Read by tests/test_stress.py when it is imported, after this hook.
    if config.getoption("--stress", default=False):
        os.environ["BATCHTASK_STRESS"] = "1"


async def results_through(
    receiver: Any, tasks: list[Any], seconds: float = 30
) -> list[Any]:
    """Run `receiver` until every task's result is stored, stop it, return them."""
    finish = asyncio.Event()
    listener = asyncio.create_task(receiver.listen(finish))
    results = [await within(t.wait_result(timeout=seconds), seconds * 2) for t in tasks]
    finish.set()
    await within(listener, seconds * 2)
    return results
