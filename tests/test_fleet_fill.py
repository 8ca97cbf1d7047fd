"""Batches that fill across a fleet as in one worker process.

The traffic of the fleets issue: ``app:one_writer`` (``batch_size=50``,
``batch_timeout=1.0``, ``max_concurrent_calls_per_key=1``, 50 ms calls), 40
keys of 50 items interleaved at about 500 items a second for 4 s, on one
Redis stream under `BatchReceiver`. One worker process makes batches of about
12.5 (each key brings 12.5 items a batch window); a fleet of two ``taskiq
worker --workers 2`` commands (two machines) made batches 0.29x as large
before, each process filling its own from a quarter of the traffic. Now
each delivery goes to the process that owns its key (`batchtask._fleet.Router`).
"""

import asyncio
import time

import pytest
import redis.asyncio as redis

from tests.test_fleet_limits import listed, overlaps, spans
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
)

pytestmark = pytest.mark.workers

KEYS = 40
PER_KEY = 50
SETTINGS = {
    "BATCHTASK_BROKER": "stream",
    "BATCHTASK_BATCH_SIZE": "50",
    "BATCHTASK_BATCH_TIMEOUT": "1.0",
    "BATCHTASK_REDELIVER_AFTER": "5",
    "BATCHTASK_FLEET_TASKS": "1",
}


async def members(queue: str) -> int:
    """How many worker processes are live members of `queue`'s fleet."""
    client = redis.from_url(REDIS_URL)
    try:
        now_ms = int(time.time() * 1000)
        key = f"{{{queue}}}:batchtask:members:{queue}"
        return int(await client.zcount(key, now_ms, "+inf"))
    finally:
        await client.aclose()


async def traffic(app: object, rounds: int, *, every: float = 0.08) -> list[object]:
    """`rounds` rounds of one item per key, one round each `every` seconds by
    the clock (500 items/s), however busy the machine is."""
    tasks = []
    kiq = app.one_writer.kiq  # type: ignore[attr-defined]
    start = time.monotonic()
    for round_ in range(rounds):
        for key in range(KEYS):
            tasks.append(await kiq(round_ * KEYS + key, f"k{key}"))
        await asyncio.sleep(max(0.0, start + (round_ + 1) * every - time.monotonic()))
    took = time.monotonic() - start
    print(f"traffic: {rounds * KEYS} items in {took:.2f} s")
    return tasks


async def run(
    machines: int, per_machine: int, *flags: str, settings: dict[str, str] = SETTINGS
) -> dict[str, object]:
    """`machines` ``taskiq worker --workers per_machine`` commands; the traffic."""
    queue = new_queue()
    with app_env(queue, **settings) as env:
        workers = [
            start_worker(env, "--workers", str(per_machine), *RECEIVER, *flags)
            for _ in range(machines)
        ]
    try:
        for worker in workers:
            await wait_listening(worker)
        if "fleet=false" not in flags:

            async def all_joined() -> bool:
                return await members(queue) == machines * per_machine

            await until(all_joined, 60, "every worker process in the fleet")
            await asyncio.sleep(1.5)  # every process has seen every other one
        with app_env(queue, **settings):
            async with producer(queue) as app:
                tasks = await traffic(app, PER_KEY)

                async def all_processed() -> bool:
                    return len(await processed(queue)) >= KEYS * PER_KEY

                await until(all_processed, 120, "every item processed")
                await asyncio.sleep(0.5)
                calls = await spans(queue)
                pids = {pid for _, _, _, pid, _, _ in await listed(queue)}
                counts = await processed(queue)
                results = [await t.wait_result(timeout=60) for t in tasks]  # type: ignore[attr-defined]
    finally:
        for worker in workers:
            kill(worker)
    sizes = [len(values.split(",")) for _, _, _, values in calls]
    return {
        "calls": calls,
        "counts": counts,
        "results": results,
        "mean": sum(sizes) / len(sizes),
        "pids": pids,
    }


async def test_a_fleet_of_four_fills_batches_as_one_process() -> None:
    """Goal 1 of the fleets issue, in one run: fleet / one process >= 0.9."""
    require_broker("stream")
    one = await run(1, 1)
    fleet = await run(2, 2)
    apart = await run(2, 2, "--receiver_arg", "fleet=false")
    ratio = float(fleet["mean"]) / float(one["mean"])  # type: ignore[arg-type]
    apart_ratio = float(apart["mean"]) / float(one["mean"])  # type: ignore[arg-type]
    for name, found in (("one process", one), ("fleet", fleet), ("apart", apart)):
        calls = found["calls"]
        assert isinstance(calls, list)
        print(
            f"{name}: {len(calls)} calls, mean batch {found['mean']:.2f}, "
            f"{overlaps(calls)} overlapping, {len(found['pids'])} process(es) called"  # type: ignore[arg-type]
        )
    print(
        f"fill, 2 machines x 2 processes against one process: {ratio:.2f}x "
        f"(fleet=false: {apart_ratio:.2f}x)"
    )
    for found in (one, fleet):
        assert found["counts"] == dict.fromkeys(range(KEYS * PER_KEY), 1)
        results = found["results"]
        assert isinstance(results, list)
        assert [r.return_value for r in results] == [
            2 * v for v in range(KEYS * PER_KEY)
        ]
    assert overlaps(fleet["calls"]) == 0  # type: ignore[arg-type]
    assert len(fleet["pids"]) == 4, "every process batches its share of keys"  # type: ignore[arg-type]
    assert ratio >= 0.9
    assert ratio > apart_ratio
