"""BatchReceiver's own Redis stream reader: claims without traffic, bad entries.

taskiq-redis's ``listen()`` claims a dead consumer's idle entries only after
a read that returned new ones, and raises ``KeyError`` on an entry without a
``data`` field. Under ``BatchReceiver`` the stream adapter
(`batchtask.brokers._redis`) claims on a timer and acknowledges such an
entry with one log line.
"""

import asyncio
import time

import pytest
import redis.asyncio as redis

from tests.workers import (
    CLAIM_FLAGS,
    RECEIVER,
    app_env,
    kill,
    new_queue,
    processed,
    producer,
    received,
    require_broker,
    serving,
    start_worker,
    stream_client,
    until,
    wait_listening,
    worker_log,
)

pytestmark = pytest.mark.workers

IDLE_S = 5
"""The stream's idle time (``idle_timeout``) in these tests, seconds."""

FAMILIES = ["stream", "cluster", "sentinel"]
"""The Redis stream broker kinds of tests/worker_app/app.py."""


def claims(kind: str) -> tuple[str, ...]:
    """BatchReceiver flags: the idle time, for brokers without one of their own."""
    return (*RECEIVER, *CLAIM_FLAGS.get(kind, ()))


@pytest.mark.parametrize("kind", FAMILIES)
async def test_a_dead_workers_items_on_a_quiet_stream_are_claimed_on_a_timer(
    kind: str,
) -> None:
    """SIGKILL a worker holding 300 items; a second one processes them all, once
    each, with no new message sent (no nudge). The Cluster and Sentinel
    brokers of taskiq-redis never claim on their own."""
    require_broker(kind)
    queue = new_queue()
    count = 300
    first_settings = {
        "BATCHTASK_BROKER": kind,
        "BATCHTASK_BATCH_SIZE": "1000",
        "BATCHTASK_BATCH_TIMEOUT": "600",
        "BATCHTASK_REDELIVER_AFTER": str(IDLE_S),
    }
    with app_env(queue, **first_settings) as env:
        first = start_worker(env, "--workers", "1", *claims(kind))
    try:
        await wait_listening(first)
        with app_env(queue, **first_settings):
            async with producer(queue) as app:
                tasks = await app.double.kiq_many(range(count), "t")

                async def all_held() -> bool:
                    return await received(queue) >= count

                await until(all_held, 60, f"{count} items buffered by the first")
                kill(first)
                killed_at = time.monotonic()
                second_settings = {
                    **first_settings,
                    "BATCHTASK_BATCH_SIZE": "100",
                    "BATCHTASK_BATCH_TIMEOUT": "0.5",
                }
                with app_env(queue, **second_settings) as env:
                    second = start_worker(env, "--workers", "1", *claims(kind))
                try:
                    await wait_listening(second)

                    async def all_processed() -> bool:
                        return len(await processed(queue)) >= count

                    await until(all_processed, 120, "every item processed, no nudge")
                    took = time.monotonic() - killed_at
                    await asyncio.sleep(1.0)  # a late duplicate would show now
                    counts = await processed(queue)
                    results = [await t.wait_result(timeout=60) for t in tasks]
                    log = worker_log(second)
                finally:
                    kill(second)
    finally:
        kill(first)
    print(
        f"quiet stream [{kind}]: {count} held by a killed worker, idle {IDLE_S} s: "
        f"all {len(counts)} processed {took:.1f} s after the kill, no new message"
    )
    assert sorted(counts) == list(range(count))
    assert set(counts.values()) == {1}, "each processed once"
    assert [r.return_value for r in results] == [2 * i for i in range(count)]
    assert "claimed" in log


@pytest.mark.parametrize("kind", FAMILIES)
async def test_an_entry_without_a_data_field_is_acked_and_never_kills_a_worker(
    kind: str,
) -> None:
    """``XADD <stream> * nodata 1``: logged once, acknowledged; the worker lives
    and serves the items kicked after it."""
    require_broker(kind)
    queue = new_queue()
    async with serving(
        queue,
        *claims(kind),
        BATCHTASK_BROKER=kind,
        BATCHTASK_BATCH_SIZE="10",
        BATCHTASK_BATCH_TIMEOUT="0.3",
        BATCHTASK_REDELIVER_AFTER=str(IDLE_S),
    ) as (worker, app):
        client = stream_client(kind)
        try:
            await client.xadd(queue, {"nodata": "1"})
            tasks = await app.double.kiq_many(range(20), "t")
            results = [await t.wait_result(timeout=60) for t in tasks]
            await asyncio.sleep(IDLE_S + 2)  # past the idle time: nothing comes back
            pending = await client.xpending(queue, queue)
        finally:
            await client.aclose()
        log = worker_log(worker)
    assert [r.return_value for r in results] == [2 * i for i in range(20)]
    assert pending["pending"] == 0, "the bad entry was acknowledged"
    assert log.count("has no data field") == 1
    assert "is dead" not in log, "the worker process never died"
    assert "KeyError" not in log


async def test_a_burst_on_redis_cluster_writes_every_result_without_a_failure() -> None:
    """2,000 items at once on a Redis Cluster: results go in one pipeline per
    node per batch, so no write fails and none is retried."""
    require_broker("cluster")
    queue = new_queue()
    async with serving(
        queue,
        *claims("cluster"),
        BATCHTASK_BROKER="cluster",
        BATCHTASK_BATCH_SIZE="100",
        BATCHTASK_BATCH_TIMEOUT="0.5",
    ) as (worker, app):
        tasks = await app.double.kiq_many(range(2000), "t")
        results = [await t.wait_result(timeout=120) for t in tasks]
        log = worker_log(worker)
    failed = log.count("storing results failed")
    print(f"cluster burst: 2000 items, {failed} failed result writes logged")
    assert [r.return_value for r in results] == [2 * i for i in range(2000)]
    assert failed == 0
    assert "Can't set result" not in log


@pytest.mark.moves_sentinel_master
async def test_a_sentinel_failover_with_items_buffered_loses_none() -> None:
    """``SENTINEL FAILOVER`` while a worker holds 300 buffered items: the worker
    listens again on the new master and every item gets its result."""
    require_broker("sentinel")
    queue = new_queue()
    sentinel = redis.Redis(port=26379)
    async with serving(
        queue,
        *claims("sentinel"),
        BATCHTASK_BROKER="sentinel",
        BATCHTASK_BATCH_SIZE="1000",
        BATCHTASK_BATCH_TIMEOUT="8",
    ) as (worker, app):
        tasks = await app.double.kiq_many(range(300), "t")

        async def all_held() -> bool:
            return await received(queue) >= 300

        await until(all_held, 60, "300 items buffered")
        before = await sentinel.execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "batchtask"
        )
        await sentinel.execute_command("SENTINEL", "FAILOVER", "batchtask")

        async def moved() -> bool:
            now = await sentinel.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "batchtask"
            )
            return bool(now != before)

        await until(moved, 60, "the master moved")
        results = [await t.wait_result(timeout=120) for t in tasks]
        await asyncio.sleep(1.0)
        counts = await processed(queue)
        log = worker_log(worker)
    await sentinel.aclose()
    print(f"sentinel failover: 300 buffered, {len(counts)} processed")
    assert [r.return_value for r in results] == [2 * i for i in range(300)]
    assert sorted(counts) == list(range(300))
    assert "is dead" not in log
