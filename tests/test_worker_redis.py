"""Batching, exactly-once on a healthy worker, and the cap warning with real
`taskiq worker` processes on the local Redis (list and stream brokers)."""

import asyncio
import contextlib
import signal
from typing import Any

import pytest
import redis.asyncio as redis
from taskiq.result import TaskiqResult

from tests.workers import (
    REDIS_URL,
    app_env,
    kill,
    new_queue,
    producer,
    recorded_calls,
    require_broker,
    start_worker,
    wait_exit,
    wait_listening,
)

pytestmark = pytest.mark.redis


@pytest.fixture(autouse=True)
def _redis_running() -> None:
    require_broker("list")


@pytest.fixture
def queue() -> str:
    return new_queue()


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
            kill(worker)


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


async def test_a_real_worker_warns_when_max_async_tasks_caps_a_batch(
    queue: str,
) -> None:
    with app_env(queue, BATCHTASK_BATCH_SIZE="500") as env:
        worker = start_worker(env, "--workers", "1")
        try:
            text = await wait_listening(worker)
        finally:
            kill(worker)
    assert "--max-async-tasks=100 counts every buffered item" in text
    assert "app:double (batch_size=500)" in text


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
                code = await wait_exit(worker)
                results = [await t.wait_result(timeout=10) for t in tasks]
                after = (await client.xpending(queue, queue))["pending"]
        finally:
            await client.aclose()
            kill(worker)

    assert pending == 20, "delivered and buffered, none acknowledged yet"
    assert buffered_calls == []
    assert code == 0
    assert [r.return_value for r in results] == [2 * i for i in range(20)]
    assert after == 0, "every message acknowledged once its batch ran"
