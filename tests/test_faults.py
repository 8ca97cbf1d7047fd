"""Faults around a `BatchReceiver` worker: what was kicked, processed, lost.

Each test runs a real ``taskiq worker`` process that reaches its broker (and,
on Redis, its result backend) through a `tests.faults.Proxy`, injects one
fault, and counts from the worker's own records (straight to Redis, not
through the proxy): kicked, processed (distinct items the function saw),
duplicated (extra calls of an item) and lost (never processed). Every test
prints one ``fault[...]`` line with those figures; the README's Guarantees
table quotes them.
"""

import asyncio
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from tests.faults import AMQP_BASIC_ACK, Proxy
from tests.workers import (
    RECEIVER,
    app_env,
    kill,
    new_queue,
    processed,
    producer,
    received,
    require_broker,
    start_worker,
    until,
    wait_listening,
    worker_log,
)

PORTS = {"stream": 6379, "rabbitmq": 5672, "nats": 4222}
SCHEMES = {"stream": "redis", "rabbitmq": "amqp", "nats": "nats"}
AUTH = {"rabbitmq": "guest:guest@"}
ACK_BYTES = {"stream": b"XACK", "rabbitmq": AMQP_BASIC_ACK, "nats": b"$JS.ACK"}
REDELIVER_AFTER = 8.0
"""Redis stream ``idle_timeout`` and NATS ``ack_wait`` in these tests, seconds."""
COUNT = 300


@dataclass
class Tally:
    kicked: int
    processed: int
    duplicated: int
    lost: int
    results: int
    """Items whose stored result is right."""

    def line(self, scenario: str, broker: str) -> str:
        return (
            f"fault[{scenario}, {broker}]: kicked {self.kicked}, processed "
            f"{self.processed}, duplicated {self.duplicated}, lost {self.lost}, "
            f"results {self.results}"
        )


@dataclass
class Rig:
    worker: subprocess.Popen[bytes]
    app: ModuleType
    queue: str
    broker_proxy: Proxy
    results_proxy: Proxy


@asynccontextmanager
async def rig(kind: str, **settings: str) -> AsyncIterator[Rig]:
    """A listening BatchReceiver worker behind proxies, and a direct producer."""
    require_broker(kind)
    queue = new_queue()
    base = {
        "BATCHTASK_BROKER": kind,
        "BATCHTASK_REDELIVER_AFTER": str(REDELIVER_AFTER),
        **settings,
    }
    async with Proxy(PORTS[kind]) as broker_proxy, Proxy(6379) as results_proxy:
        worker_settings = {
            **base,
            "BATCHTASK_BROKER_URL": broker_proxy.url(SCHEMES[kind], AUTH.get(kind, "")),
            "BATCHTASK_RESULTS_URL": results_proxy.url("redis"),
        }
        with app_env(queue, **worker_settings) as env:
            worker = start_worker(env, "--workers", "1", *RECEIVER)
        try:
            await wait_listening(worker)
            with app_env(queue, **base):
                async with producer(queue) as app:
                    yield Rig(worker, app, queue, broker_proxy, results_proxy)
        finally:
            kill(worker)


async def _at_least(count: Any, n: int) -> bool:
    return await count >= n


async def settle(rig: Rig, tasks: list[Any], *, quiet: float) -> Tally:
    """Wait until every item was processed, then `quiet` seconds more; count."""

    async def nudge() -> None:
        # A Redis stream consumer claims idle messages only after a read.
        await rig.app.nudge.kiq()

    async def all_processed() -> bool:
        return len(await processed(rig.queue)) >= len(tasks)

    await until(all_processed, 120, "every item processed", every=0.3, meanwhile=nudge)
    for _ in range(int(quiet / 0.5)):
        await nudge()
        await asyncio.sleep(0.5)
    counts = await processed(rig.queue)
    right = 0
    for value, task in enumerate(tasks):
        result = await task.wait_result(timeout=60)
        right += not result.is_err and result.return_value == 2 * value
    return Tally(
        kicked=len(tasks),
        processed=len(counts),
        duplicated=sum(counts.values()) - len(counts),
        lost=len(tasks) - len(counts),
        results=right,
    )


async def kick(rig: Rig, tag: str, count: int = COUNT) -> list[Any]:
    return [await rig.app.double.kiq(value, tag) for value in range(count)]


@pytest.mark.parametrize("kind", ["stream", "rabbitmq", "nats"])
@pytest.mark.parametrize("moment", ["buffered", "running", "acking"])
async def test_a_dropped_broker_connection_loses_nothing_and_reruns_no_finished_call(
    kind: str, moment: str
) -> None:
    """Every connection of the worker to its broker (and its Redis result
    backend) is dropped while items wait in a batch, while the batch's call
    runs, or as its acks are sent. Nothing is lost; no item whose call had
    finished runs again: its results are stored and its acks sent over a new
    connection (or, where the broker took the delivery back, the redelivered
    copy is recognised and acked without a second call)."""
    if moment == "buffered":
        settings = {"BATCHTASK_BATCH_SIZE": "1000", "BATCHTASK_BATCH_TIMEOUT": "4"}
        tag = "x"
    else:
        settings = {"BATCHTASK_BATCH_SIZE": str(COUNT), "BATCHTASK_BATCH_TIMEOUT": "60"}
        tag = "sleep:2" if moment == "running" else "x"
    async with rig(kind, **settings) as r:
        if moment == "acking":
            r.broker_proxy.drop_on(ACK_BYTES[kind])
        tasks = await kick(r, tag)
        await until(lambda: _at_least(received(r.queue), COUNT), 60, "all received")
        if moment == "buffered":
            await asyncio.sleep(0.5)
            assert await processed(r.queue) == {}, "still buffered at the fault"
            dropped = r.broker_proxy.drop() + r.results_proxy.drop()
        elif moment == "running":
            await asyncio.sleep(0.5)  # the call sleeps 2 s
            assert await processed(r.queue) == {}, "the call runs at the fault"
            dropped = r.broker_proxy.drop() + r.results_proxy.drop()
        else:
            await asyncio.wait_for(r.broker_proxy.pattern_seen.wait(), 60)
            dropped = 1 + r.results_proxy.drop()
        tally = await settle(r, tasks, quiet=REDELIVER_AFTER + 4)
        log = worker_log(r.worker)
        alive = r.worker.poll() is None
    print(tally.line(f"broker connection dropped while {moment}", kind))
    assert dropped >= 1
    assert tally.lost == 0
    assert tally.results == COUNT
    assert tally.duplicated == 0, log[-4000:]
    assert alive, log[-4000:]
