"""Faults around a `BatchReceiver` worker: what was kicked, processed, lost.

Each test runs a real ``taskiq worker`` process that reaches its broker (and,
on Redis, its result backend) through a `tests.faults.Proxy`, injects one
fault, and counts from the worker's own records (straight to Redis, not
through the proxy): kicked, processed (distinct items the function saw),
duplicated (extra calls of an item) and lost (never processed). Every test
prints one ``fault[...]`` line with those figures; the README's Guarantees
table quotes them.

On a Redis Cluster and behind a Sentinel (the cluster and sentinel kinds) no
proxy can stand in between: the client learns the nodes' and the master's own
addresses from the servers and goes there. Their worker connects directly,
and a dropped connection is a ``CLIENT KILL`` of the worker's own connections
on every server it talks to (`tests.faults.kill_clients`).
"""

import asyncio
import math
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis.asyncio as redis

from batchtask import PoisonItemError
from batchtask._faults import RETRY_DELAYS
from tests.faults import AMQP_BASIC_ACK, OwnRedis, Proxy, free_port, kill_clients
from tests.workers import (
    CLAIM_FLAGS,
    RECEIVER,
    new_queue,
    processed,
    received,
    require_broker,
    serving,
    stream_client,
    until,
    worker_log,
)

pytestmark = pytest.mark.workers
"""Mostly waiting on timers: ./scripts/test runs these in parallel processes."""

PORTS = {"stream": 6379, "rabbitmq": 5672, "nats": 4222}
SCHEMES = {"stream": "redis", "rabbitmq": "amqp", "nats": "nats"}
AUTH = {"rabbitmq": "guest:guest@"}
ACK_BYTES = {"stream": b"XACK", "rabbitmq": AMQP_BASIC_ACK, "nats": b"$JS.ACK"}
KILLED_ON = {"cluster": (7001, 7002, 7003), "sentinel": (6380, 6381, 26379)}
"""The kinds without a proxy (see the module), and the Redis servers where a
dropped connection kills the worker's: every node of the cluster; the master
and the replica (the master is either, after a failover) and the Sentinel."""
REDELIVER_AFTER = 5.0
"""Redis stream ``idle_timeout`` and NATS ``ack_wait`` in these tests, seconds;
the cluster and sentinel kinds' BatchReceiver claims after as long
(``CLAIM_FLAGS``: ``idle_timeout=5000``)."""
COUNT = 300


@dataclass
class Tally:
    kicked: int
    processed: int
    duplicated: int
    lost: int
    results: int
    """Items whose stored result is right."""
    restarts: int = 0
    """Worker processes taskiq's process manager started again."""

    def line(self, scenario: str, broker: str) -> str:
        return (
            f"fault[{scenario}, {broker}]: kicked {self.kicked}, processed "
            f"{self.processed}, duplicated {self.duplicated}, lost {self.lost}, "
            f"results {self.results}, worker restarts {self.restarts}"
        )


@dataclass
class Rig:
    worker: subprocess.Popen[bytes]
    app: ModuleType
    queue: str
    kind: str
    broker_proxy: Proxy | None
    """None for the kinds in `KILLED_ON`, as `results_proxy`."""
    results_proxy: Proxy | None

    async def drop(self) -> dict[str, int]:
        """Drop every connection of the worker to its broker and result backend
        now; how many, per proxy or per server port."""
        if self.broker_proxy is None or self.results_proxy is None:
            killed = await kill_clients(self.worker.pid, KILLED_ON[self.kind])
            return {str(port): count for port, count in killed.items()}
        return {
            "broker": self.broker_proxy.drop(),
            "results": self.results_proxy.drop(),
        }


@asynccontextmanager
async def rig(kind: str, **settings: str) -> AsyncIterator[Rig]:
    """A listening BatchReceiver worker behind proxies (none for the kinds in
    `KILLED_ON`), and a direct producer."""
    require_broker(kind)
    queue = new_queue()
    base = {
        "BATCHTASK_BROKER": kind,
        "BATCHTASK_REDELIVER_AFTER": str(REDELIVER_AFTER),
        **settings,
    }
    if kind in KILLED_ON:
        flags = (*RECEIVER, *CLAIM_FLAGS[kind])
        async with serving(queue, *flags, **base) as (worker, app):
            yield Rig(worker, app, queue, kind, None, None)
        return
    async with Proxy(PORTS[kind]) as broker_proxy, Proxy(6379) as results_proxy:
        through = {
            "BATCHTASK_BROKER_URL": broker_proxy.url(SCHEMES[kind], AUTH.get(kind, "")),
            "BATCHTASK_RESULTS_URL": results_proxy.url("redis"),
        }
        async with serving(queue, *RECEIVER, worker_only=through, **base) as (
            worker,
            app,
        ):
            yield Rig(worker, app, queue, kind, broker_proxy, results_proxy)


async def stream_port(kind: str, queue: str) -> int:
    """The port of the server holding `queue`'s stream: its node of the cluster,
    or the master the Sentinel names."""
    if kind == "cluster":
        cluster = stream_client(kind)
        try:
            await cluster.initialize()
            return int(cluster.get_node_from_key(queue).port)
        finally:
            await cluster.aclose()
    sentinel = redis.Redis(port=26379)
    try:
        _, port = await sentinel.sentinel_get_master_addr_by_name("batchtask")
        return int(port)
    finally:
        await sentinel.aclose()


async def _at_least(count: Any, n: int) -> bool:
    return await count >= n


async def settle(
    app: ModuleType,
    queue: str,
    worker: subprocess.Popen[bytes],
    tasks: list[Any],
    *,
    quiet: float,
) -> Tally:
    """Wait until every item was processed, then `quiet` seconds more; count."""

    async def all_processed() -> bool:
        return len(await processed(queue)) >= len(tasks)

    # No nudges: BatchReceiver claims a Redis stream's idle entries on a timer.
    await until(all_processed, 120, "every item processed", every=0.3)
    await asyncio.sleep(quiet)
    counts = await processed(queue)
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
        restarts=worker_log(worker).count("Started process worker-") - 1,
    )


HANDLED = {
    "listened again": "listening again in",
    "retried": "; retry ",
    "ack handed over": "delivered again while held here",
    "acked unrun": "delivered again after its call finished",
}


def _handled(log: str) -> list[str]:
    """What the worker's log says it did about a fault, with counts."""
    return [
        f"{what} x{log.count(text)}" for what, text in HANDLED.items() if text in log
    ]


async def kick(app: ModuleType, tag: str, count: int = COUNT) -> list[Any]:
    return [await app.double.kiq(value, tag) for value in range(count)]


DROPS = [
    pytest.param(moment, kind, id=f"{moment}-{kind}")
    for moment in ("buffered", "running", "acking")
    for kind in ("stream", "rabbitmq", "nats", "cluster", "sentinel")
    # No "acking" on the cluster and sentinel kinds: losing an ack in flight
    # takes a proxy that sees the XACK before the server does. From the
    # server's side a command shows (CLIENT LIST, MONITOR) only once it ran:
    # a CLIENT KILL then loses the reply to an XACK that was applied, not the
    # ack, and these kinds have no proxy (see the module).
    if not (moment == "acking" and kind in KILLED_ON)
]


@pytest.mark.parametrize(("moment", "kind"), DROPS)
async def test_a_dropped_broker_connection_loses_nothing_and_reruns_no_finished_call(
    moment: str, kind: str
) -> None:
    """Every connection of the worker to its broker (and its Redis result
    backend) is dropped while items wait in a batch, while the batch's call
    runs, or as its acks are sent. Nothing is lost; no item whose call had
    finished runs again: its results are stored and its acks sent over a new
    connection (or, where the broker took the delivery back, the redelivered
    copy is recognised and acked without a second call). On the cluster and
    sentinel kinds the servers kill the worker's connections, on every node,
    or on the master and the Sentinel."""
    if moment == "buffered":
        settings = {"BATCHTASK_BATCH_SIZE": "1000", "BATCHTASK_BATCH_TIMEOUT": "8"}
        tag = "x"
    else:
        settings = {"BATCHTASK_BATCH_SIZE": str(COUNT), "BATCHTASK_BATCH_TIMEOUT": "60"}
        tag = "sleep:2" if moment == "running" else "x"
    async with rig(kind, **settings) as r:
        if moment == "acking":
            assert r.broker_proxy is not None
            r.broker_proxy.drop_on(ACK_BYTES[kind])
        tasks = await kick(r.app, tag)
        await until(lambda: _at_least(received(r.queue), COUNT), 60, "all received")
        reader_on = await stream_port(kind, r.queue) if kind in KILLED_ON else None
        if moment == "buffered":
            await asyncio.sleep(0.5)
            assert await processed(r.queue) == {}, "still buffered at the fault"
            dropped = await r.drop()
        elif moment == "running":
            await asyncio.sleep(0.5)  # the call sleeps 2 s
            assert await processed(r.queue) == {}, "the call runs at the fault"
            dropped = await r.drop()
        else:
            assert r.broker_proxy is not None
            assert r.results_proxy is not None
            await asyncio.wait_for(r.broker_proxy.pattern_seen.wait(), 60)
            dropped = {"broker": 1, "results": r.results_proxy.drop()}
        tally = await settle(r.app, r.queue, r.worker, tasks, quiet=REDELIVER_AFTER + 4)
        log = worker_log(r.worker)
    print(tally.line(f"broker connection dropped while {moment}", kind))
    print("  connections dropped:", ", ".join(f"{k} x{n}" for k, n in dropped.items()))
    if reader_on is None:
        assert sum(dropped.values()) >= 1
    else:
        # The reader's XREADGROUP connection at least: it is always open.
        assert dropped[str(reader_on)] >= 1, f"none killed on {reader_on}"
    assert tally.lost == 0
    assert tally.results == COUNT
    assert tally.duplicated == 0, log[-4000:]
    assert tally.restarts == 0, "the worker process kept serving"
    print("  what the worker did:", ", ".join(_handled(log)) or "nothing")
    if moment == "acking" or kind == "rabbitmq":
        assert _handled(log), "the fault reached the worker"


@pytest.mark.parametrize("kind", ["stream", "rabbitmq"])
@pytest.mark.parametrize("outage", [3.0, 15.0], ids=["3s", "15s"])
async def test_an_unreachable_result_backend_acks_nothing_without_its_result(
    kind: str, outage: float
) -> None:
    """The result backend refuses every connection from just before a batch's
    call ends until `outage` seconds later. A short outage is bridged by the
    retried write; after a long one each item's write fails, no message is
    acknowledged without its result, and the redelivered messages run again
    and store their results once the backend is back: nothing is lost."""
    settings = {"BATCHTASK_BATCH_SIZE": str(COUNT), "BATCHTASK_BATCH_TIMEOUT": "60"}
    async with rig(kind, **settings) as r:
        tasks = await kick(r.app, "sleep:2")
        await until(lambda: _at_least(received(r.queue), COUNT), 60, "all received")
        await asyncio.sleep(1.0)
        assert await processed(r.queue) == {}, "the call runs at the outage"
        r.results_proxy.refuse(outage)
        await asyncio.sleep(outage)
        if kind == "rabbitmq":
            # RabbitMQ hands a message back only when its consumer goes.
            r.broker_proxy.drop()
        tally = await settle(r.app, r.queue, r.worker, tasks, quiet=REDELIVER_AFTER + 4)
        log = worker_log(r.worker)
    print(tally.line(f"result backend down {outage:.0f} s", kind))
    print("  what the worker did:", ", ".join(_handled(log)) or "nothing")
    assert tally.lost == 0
    assert tally.results == COUNT, "no message was acknowledged without its result"
    assert tally.restarts == 0
    assert "storing results failed" in log
    if outage < sum(RETRY_DELAYS):
        assert tally.duplicated == 0, log[-4000:]
    else:
        assert "given up" in log
        assert tally.duplicated == COUNT, "each ran again, as its result was lost"


async def test_a_restarted_redis_keeping_its_data_loses_nothing(tmp_path: Path) -> None:
    """The worker's Redis (stream broker and result backend; a server this test
    starts, keeping its data) stops for 5 s while 300 items wait in a batch,
    then starts again: the worker listens again, the batch runs, every result
    is stored and every message acknowledged once."""
    require_broker("stream")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    settings = {
        "BATCHTASK_BROKER": "stream",
        "BATCHTASK_BATCH_SIZE": "1000",
        "BATCHTASK_BATCH_TIMEOUT": "10",
        "BATCHTASK_REDELIVER_AFTER": "30",
        "BATCHTASK_BROKER_URL": url,
        "BATCHTASK_RESULTS_URL": url,
    }
    queue = new_queue()
    redis_server = OwnRedis(port, tmp_path)
    await redis_server.start()
    try:
        async with serving(queue, *RECEIVER, **settings) as (worker, app):
            tasks = await kick(app, "x")
            await until(lambda: _at_least(received(queue), COUNT), 60, "all received")
            await redis_server.stop()
            down_at = time.monotonic()
            await asyncio.sleep(5.0)
            await redis_server.start()
            up_after = time.monotonic() - down_at
            tally = await settle(app, queue, worker, tasks, quiet=3)
            log = worker_log(worker)
    finally:
        redis_server.kill()
    print(tally.line(f"Redis restarted, down {up_after:.1f} s", "stream"))
    print("  what the worker did:", ", ".join(_handled(log)) or "nothing")
    assert tally.lost == 0
    assert tally.duplicated == 0
    assert tally.results == COUNT
    assert tally.restarts == 0
    assert "listening again in" in log


@pytest.mark.parametrize(
    ("kind", "how"),
    [("stream", "exit"), ("rabbitmq", "exit"), ("nats", "exit"), ("stream", "segv")],
)
async def test_a_batch_that_kills_its_worker_is_narrowed_down_to_the_poison_item(
    kind: str, how: str
) -> None:
    """One item of 100 ends the worker process of every call it is in
    (``os._exit`` or a segfault). taskiq restarts the process; the broker
    hands the items out again; batchtask runs them in ever smaller calls,
    one at a time, until the poison item is alone: it then fails with
    PoisonItemError, and the other 99 complete, each once."""
    poison, count = 37, 100
    settings = {
        "BATCHTASK_BATCH_SIZE": str(count),
        "BATCHTASK_BATCH_TIMEOUT": "1",
        "BATCHTASK_REDELIVER_AFTER": "2",
        "BATCHTASK_POISON": str(poison),
        "BATCHTASK_POISON_HOW": how,
    }
    async with rig(kind, **settings) as r:
        tasks = await kick(r.app, "x", count)

        async def all_done() -> bool:
            return all([await task.is_ready() for task in tasks])

        await until(all_done, 300, "every item's result", every=0.5)
        results = [await task.get_result() for task in tasks]
        counts = await processed(r.queue)
        log = worker_log(r.worker)
    deaths = log.count("is dead. Scheduling reload.")
    bound = math.ceil(math.log2(count)) + 2
    good = [v for v in range(count) if v != poison]
    print(
        f"fault[poison item ({how}) in a batch of {count}, {kind}]: kicked {count}, "
        f"processed {len(counts)}, duplicated {sum(counts.values()) - len(counts)}, "
        f"lost {count - 1 - len(counts)}, worker deaths {deaths} (bound {bound}), "
        f"poison failed: {type(results[poison].error).__name__}"
    )
    assert 1 <= deaths <= bound, log[-4000:]
    assert isinstance(results[poison].error, PoisonItemError)
    assert [results[v].return_value for v in good] == [2 * v for v in good]
    assert counts == dict.fromkeys(good, 1), "the 99 others ran, each once"
