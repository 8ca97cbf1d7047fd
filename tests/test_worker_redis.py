"""Points 3, 7 and 9 with real `taskiq worker` processes on the local Redis."""

import asyncio
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from taskiq.result import TaskiqResult

from tests.conftest import require_server

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379"


@pytest.fixture(autouse=True)
def _redis_running() -> None:
    require_server("Redis", 6379)


@pytest.fixture
def queue() -> str:
    return f"batchtask-test-{uuid.uuid4().hex[:8]}"


@contextmanager
def app_env(queue: str, **settings: str) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env.update({"BATCHTASK_QUEUE": queue, **settings})
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield env
    finally:
        os.environ.clear()
        os.environ.update(saved)


_logs: dict[int, str] = {}


def worker_log(worker: subprocess.Popen[bytes]) -> str:
    return Path(_logs[worker.pid]).read_text(errors="replace")


def start_worker(env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    # The log goes to a file: an unread pipe would fill up and stall the worker.
    log = tempfile.NamedTemporaryFile(
        prefix="batchtask-worker-", suffix=".log", delete=False
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "taskiq",
            "worker",
            "tests.worker_app.redis_app:broker",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _logs[worker.pid] = log.name
    return worker


def stop(worker: subprocess.Popen[bytes]) -> None:
    """Kill the worker and its worker processes, whatever state they are in."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)


@asynccontextmanager
async def producer(queue: str) -> AsyncIterator[object]:
    # Imported afresh after the environment names this test's queue.
    sys.modules.pop("tests.worker_app.redis_app", None)
    redis_app = importlib.import_module("tests.worker_app.redis_app")

    await redis_app.broker.startup()
    try:
        yield redis_app
    finally:
        await redis_app.broker.shutdown()
        client = redis.from_url(REDIS_URL)
        await client.delete(queue, f"{queue}:calls")
        await client.aclose()
        sys.modules.pop("tests.worker_app.redis_app", None)


async def recorded_calls(queue: str) -> list[tuple[int, list[int]]]:
    client = redis.from_url(REDIS_URL)
    raw = await client.lrange(f"{queue}:calls", 0, -1)
    await client.aclose()
    calls = []
    for entry in raw:
        pid, values = entry.decode().split(":")
        calls.append((int(pid), [int(v) for v in values.split(",")]))
    return calls


async def run_items(
    queue: str, count: int, *, workers: int, **settings: str
) -> tuple[list[TaskiqResult[Any]], list[tuple[int, list[int]]]]:
    """Kick items 0..count-1 to fresh worker processes; return results and calls."""
    with app_env(queue, **settings) as env:
        worker = start_worker(env, "--workers", str(workers))
        try:
            async with producer(queue) as app:
                tasks = await asyncio.gather(
                    *(app.double.kiq(i, "t") for i in range(count))  # type: ignore[attr-defined]
                )
                results = [await t.wait_result(timeout=60) for t in tasks]
                return results, await recorded_calls(queue)
        finally:
            stop(worker)


@pytest.mark.parametrize("kind", ["list", "stream"])
async def test_a_real_worker_batches_items_and_stores_each_result(
    queue: str, kind: str
) -> None:
    results, calls = await run_items(
        queue,
        250,
        workers=1,
        BATCHTASK_BROKER=kind,
        BATCHTASK_BATCH_SIZE="50",
        BATCHTASK_BATCH_TIMEOUT="1",
    )

    assert [r.return_value for r in results] == [2 * i for i in range(250)]
    values = sorted(v for _, call in calls for v in call)
    assert values == list(range(250)), "every item ran exactly once"
    assert all(len(call) <= 50 for _, call in calls)
    assert len(calls) < 250 / 5, f"items were batched, got {len(calls)} calls"


async def test_two_worker_processes_each_batch_their_share_exactly_once(
    queue: str,
) -> None:
    results, calls = await run_items(
        queue, 600, workers=2, BATCHTASK_BATCH_SIZE="40", BATCHTASK_BATCH_TIMEOUT="0.5"
    )

    assert [r.return_value for r in results] == [2 * i for i in range(600)]
    assert sorted(v for _, call in calls for v in call) == list(range(600))
    assert all(len(call) <= 40 for _, call in calls)
    per_process = {pid: sum(p == pid for p, _ in calls) for pid, _ in calls}
    print(f"calls per worker process: {per_process}")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
async def test_graceful_shutdown_runs_partial_batches_at_once_and_exits_cleanly(
    queue: str, how: signal.Signals
) -> None:
    loop = asyncio.get_running_loop()
    with app_env(
        queue, BATCHTASK_BATCH_SIZE="100", BATCHTASK_BATCH_TIMEOUT="600"
    ) as env:
        worker = start_worker(env, "--workers", "1")
        try:
            async with producer(queue) as app:
                tasks = [await app.double.kiq(i, "t") for i in range(30)]  # type: ignore[attr-defined]
                client = redis.from_url(REDIS_URL)
                while await client.llen(queue):  # the worker took them all
                    await asyncio.sleep(0.1)
                await client.aclose()
                await asyncio.sleep(0.5)
                assert await recorded_calls(queue) == [], "buffered, not yet called"
                signalled = loop.time()
                worker.send_signal(how)
                code = await asyncio.wait_for(
                    asyncio.to_thread(worker.wait), timeout=60
                )
                stopped = loop.time() - signalled
                results = [await t.wait_result(timeout=10) for t in tasks]
                calls = await recorded_calls(queue)
        finally:
            stop(worker)

    assert code == 0, f"worker exited with {code}"
    assert stopped < 600 / 10, "the buffer ran at once, not after batch_timeout"
    assert [r.return_value for r in results] == [2 * i for i in range(30)]
    assert [call for _, call in calls] == [list(range(30))]


async def test_a_real_worker_warns_when_max_async_tasks_caps_a_batch(
    queue: str,
) -> None:
    with app_env(queue, BATCHTASK_BATCH_SIZE="500") as env:
        worker = start_worker(env, "--workers", "1")
        try:
            for _ in range(300):
                text = worker_log(worker)
                if "Listening started" in text:
                    break
                await asyncio.sleep(0.1)
        finally:
            stop(worker)
    assert "--max-async-tasks=100 counts every buffered item" in text
    assert "redis_app:double (batch_size=500)" in text


async def test_stream_messages_are_acked_only_after_their_batch_ran(queue: str) -> None:
    with app_env(
        queue,
        BATCHTASK_BROKER="stream",
        BATCHTASK_BATCH_SIZE="100",
        BATCHTASK_BATCH_TIMEOUT="600",
    ) as env:
        worker = start_worker(env, "--workers", "1")
        client = redis.from_url(REDIS_URL)
        try:
            async with producer(queue) as app:
                tasks = [await app.double.kiq(i, "t") for i in range(20)]  # type: ignore[attr-defined]
                pending = 0
                for _ in range(300):
                    with contextlib.suppress(redis.ResponseError):
                        pending = (await client.xpending(queue, queue))["pending"]
                    if pending == 20:
                        break
                    await asyncio.sleep(0.1)
                buffered_calls = await recorded_calls(queue)
                worker.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(
                    asyncio.to_thread(worker.wait), timeout=60
                )
                results = [await t.wait_result(timeout=10) for t in tasks]
                after = (await client.xpending(queue, queue))["pending"]
        finally:
            await client.aclose()
            stop(worker)

    assert pending == 20, "delivered and buffered, none acknowledged yet"
    assert buffered_calls == []
    assert code == 0
    assert [r.return_value for r in results] == [2 * i for i in range(20)]
    assert after == 0, "every message acknowledged once its batch ran"
