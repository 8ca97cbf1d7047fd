"""A delayed retry on real workers: it survives its worker's SIGKILL and runs once.

The batch function (``app:double`` with the tag ``retry:S``) answers each
item's first call with ``Retry(delay=S)``: the items are sent again and the
worker holds the copies, unacknowledged, until their time. The worker is
SIGKILLed while it holds them; a second worker gets them from the broker
(RabbitMQ requeues a dropped consumer's deliveries, a Redis stream's
``BatchReceiver`` claims them once idle) and runs each once, no earlier than
its delay.
"""

import asyncio
import time

import pytest
import redis.asyncio as redis

from tests.workers import (
    RECEIVER,
    REDIS_URL,
    app_env,
    kill,
    new_queue,
    processed,
    producer,
    require_broker,
    start_worker,
    until,
    wait_listening,
    worker_log,
)

pytestmark = pytest.mark.workers

DELAY = 6.0
"""The retry's delay, seconds: longer than the wait before the kill."""

CASES = [
    pytest.param("stream", RECEIVER, id="stream-BatchReceiver"),
    pytest.param("rabbitmq", RECEIVER, id="rabbitmq-BatchReceiver"),
    pytest.param("rabbitmq", (), id="rabbitmq-stock-worker"),
]
# A stock worker on a Redis stream claims a dead consumer's entries only
# after a read that returned new ones (taskiq-redis's listen): on a quiet
# stream they wait for traffic (docs/guarantees.md), so it is not a case here.


async def retried(queue: str) -> dict[int, int]:
    client = redis.from_url(REDIS_URL)
    try:
        raw = await client.hgetall(f"{queue}:retried")
    finally:
        await client.aclose()
    return {int(k): int(v) for k, v in raw.items()}


@pytest.mark.parametrize(("kind", "flags"), CASES)
async def test_a_held_retry_survives_its_workers_sigkill_and_runs_once(
    kind: str, flags: tuple[str, ...]
) -> None:
    require_broker(kind)
    queue = new_queue()
    count = 20
    settings = {
        "BATCHTASK_BROKER": kind,
        "BATCHTASK_BATCH_SIZE": "100",
        "BATCHTASK_BATCH_TIMEOUT": "0.3",
        "BATCHTASK_REDELIVER_AFTER": "5",
    }
    claims = ("--receiver_arg", "idle_timeout=5000") if kind == "stream" else ()
    with app_env(queue, **settings) as env:
        first = start_worker(env, "--workers", "1", *flags)
        second = None
    try:
        await wait_listening(first)
        with app_env(queue, **settings):
            async with producer(queue) as app:
                tasks = await app.double.kiq_many(range(count), f"retry:{DELAY:g}")

                async def all_retried() -> bool:
                    return len(await retried(queue)) >= count

                await until(all_retried, 60, f"{count} items asked to retry")
                asked_at = time.monotonic()
                await asyncio.sleep(1.0)  # the copies arrive and are held
                kill(first)
                assert await processed(queue) == {}, "nothing ran before its delay"
                with app_env(queue, **settings) as env:
                    second = start_worker(env, "--workers", "1", *flags, *claims)
                await wait_listening(second)

                async def all_processed() -> bool:
                    return len(await processed(queue)) >= count

                await until(all_processed, 90, "every retried item processed")
                took = time.monotonic() - asked_at
                await asyncio.sleep(1.0)  # a late duplicate would show now
                counts = await processed(queue)
                asks = await retried(queue)
                results = [await t.wait_result(timeout=60) for t in tasks]
                log = worker_log(second)
    finally:
        kill(first)
        if second is not None:
            kill(second)
    print(
        f"held retry [{kind}{' BatchReceiver' if flags else ''}]: {count} items, "
        f"delay {DELAY:g} s, worker killed 1 s in; all ran {took:.1f} s after "
        f"their Retry, {sum(counts.values())} runs"
    )
    assert counts == dict.fromkeys(range(count), 1), "each ran once"
    assert asks == dict.fromkeys(range(count), 1), "each asked to retry once"
    assert [r.return_value for r in results] == [2 * i for i in range(count)]
    assert took >= DELAY - 0.5, "none ran before its delay"
    assert "is dead" not in log
