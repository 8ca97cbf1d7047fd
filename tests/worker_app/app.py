"""Batch tasks served by real `taskiq worker` processes in the broker tests.

Configured by environment variables so each test gets its own queue:

- BATCHTASK_QUEUE: queue / stream / subject name, and the prefix of the Redis
  keys below;
- BATCHTASK_BROKER: "list" (Redis ListQueueBroker), "stream" (Redis
  RedisStreamBroker), "rabbitmq" (taskiq-aio-pika), "nats" (taskiq-nats
  PullBasedJetStreamBroker), "postgres" (taskiq-postgres AsyncpgBroker, its
  table and channel named after the queue with ``_`` for ``-``), "cluster"
  (RedisStreamClusterBroker on the Redis Cluster at 127.0.0.1:7001-7003) or
  "sentinel" (RedisStreamSentinelBroker on the master the Sentinel at
  127.0.0.1:26379 names "batchtask": 6380, or 6381 after a failover);
  scripts/redis-topologies starts both topologies. Neither of these two
  stream brokers redelivers (no ``idle_timeout``), nor takes
  BATCHTASK_REDELIVER_AFTER;
- BATCHTASK_BATCH_SIZE, BATCHTASK_BATCH_TIMEOUT: the batch settings;
- BATCHTASK_QOS: RabbitMQ prefetch (``AioPikaBroker(qos=...)``, default 1000);
- BATCHTASK_REDELIVER_AFTER: seconds after which the broker hands an
  unacknowledged message to another consumer (Redis stream ``idle_timeout``,
  NATS ``ack_wait``); RabbitMQ redelivers when the consumer's connection drops.
- BATCHTASK_BROKER_URL, BATCHTASK_RESULTS_URL: where the broker and the result
  backend connect (a fault test's proxy), instead of the servers themselves;
  the ``<queue>:*`` records below always go to Redis directly. For "cluster",
  BATCHTASK_BROKER_URL replaces the cluster's URL for the broker and its
  results alike (the client only starts there: it then talks to the nodes the
  cluster announces); BATCHTASK_SENTINEL (``host:port``) replaces the
  Sentinel's address for "sentinel" (again only the first hop: the master's
  address comes from the Sentinel). BATCHTASK_RESULTS_URL applies to neither.

Results go to Redis (6379) for every broker except "cluster", whose results
live in the cluster, and "sentinel", whose results live on the master the
Sentinel names. Redis keys written by the worker, on 6379 for every broker:
``<queue>:received`` counts messages the receiver started (a middleware),
``<queue>:calls`` lists every call as ``pid:value,value,...`` and
``<queue>:processed`` counts, per item value, the calls that included it.

The ``app:ack_*`` batch tasks (tests/test_ack_types.py) double their values
like ``double``, each with its own ``ack_type`` label and, for ``manual``, its
own way of acknowledging; each call is listed in ``<queue>:ack_calls:<name>``
as ``pid:value,value,...`` (``BatchContext`` tasks add ``:`` plus one ``1`` or
``0`` per item, ``ctx.acked`` when the call returns, and ``:ordered`` when
``ctx.messages`` carried the values in item order). They use the same batch
settings and count into ``<queue>:received`` like ``double``; they exist
only with BATCHTASK_ACK_TASKS=1.
"""

import asyncio
import ctypes
import os
import resource
import time
from typing import Any

import redis.asyncio as redis
from nats.js.api import ConsumerConfig, StreamConfig
from taskiq import (
    AsyncBroker,
    AsyncResultBackend,
    Context,
    TaskiqDepends,
    TaskiqMessage,
    TaskiqMiddleware,
)
from taskiq_aio_pika import AioPikaBroker, Exchange, Queue
from taskiq_nats import PullBasedJetStreamBroker
from taskiq_redis import (
    ListQueueBroker,
    RedisAsyncClusterResultBackend,
    RedisAsyncResultBackend,
    RedisAsyncSentinelResultBackend,
    RedisStreamBroker,
    RedisStreamClusterBroker,
    RedisStreamSentinelBroker,
)

from batchtask import BatchContext, PartialFailure, Retry, batch_task
from batchtask._lifecycle import buffered_items

REDIS_URL = "redis://127.0.0.1:6379"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
NATS_URL = "nats://127.0.0.1:4222"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
CLUSTER_URL = "redis://127.0.0.1:7001"
"""A node of the Redis Cluster (scripts/redis-topologies)."""
SENTINEL = ("127.0.0.1", 26379)
"""The Sentinel (scripts/redis-topologies), which names the master."""
SENTINEL_MASTER = "batchtask"
"""The name the Sentinel knows the master (6380, or 6381 after a failover) by."""
BROKER_URL = os.environ.get("BATCHTASK_BROKER_URL")
RESULTS_URL = os.environ.get("BATCHTASK_RESULTS_URL", REDIS_URL)
QUEUE = os.environ.get("BATCHTASK_QUEUE", "batchtask-test")
KIND = os.environ.get("BATCHTASK_BROKER", "list")
_sentinel_host, _, _sentinel_port = os.environ.get("BATCHTASK_SENTINEL", "").rpartition(
    ":"
)
SENTINELS = [(_sentinel_host, int(_sentinel_port)) if _sentinel_host else SENTINEL]
"""The sentinel kind's Sentinels: BATCHTASK_SENTINEL (``host:port``) or ours."""
NATS_PULL_TIMEOUT = os.environ.get("BATCHTASK_NATS_PULL_TIMEOUT", "0.5")
"""The nats kind's ``pull_consume_timeout`` (s): 0.5 for prompt tests;
``none`` is taskiq-nats's default (nats-py's 5 s fetch), as ``bench/fleet.py``
measures an idle worker with."""
XREAD_BLOCK = 2000
"""The cluster and sentinel kinds' XREADGROUP BLOCK (ms), RedisStreamBroker's
default. Theirs (10 s) outlasts redis-py 8's 5 s socket timeout: an idle
sentinel-kind worker process would die every 5 s (TimeoutError in
``listen``), and an idle cluster client time out and set itself up again."""
SENTINEL_POOL = {"max_connections": 10_000}
"""The sentinel kind's clients of the Sentinel. Each kick, ack and result
opens its own connection to the master, asking the Sentinel where it is;
redis-py 8's plain pool to the Sentinel refuses a 101st at once
(MasterNotFoundError), and the tests kick up to 500 at once."""
BATCH_SIZE = int(os.environ.get("BATCHTASK_BATCH_SIZE", "50"))
BATCH_TIMEOUT = float(os.environ.get("BATCHTASK_BATCH_TIMEOUT", "1.0"))
POISON = (
    int(os.environ["BATCHTASK_POISON"]) if "BATCHTASK_POISON" in os.environ else None
)
REDELIVER_AFTER = float(os.environ.get("BATCHTASK_REDELIVER_AFTER", "600"))
PG_TABLE = QUEUE.replace("-", "_")
"""The postgres kind's table and channel: the queue name as an identifier."""


def make_broker() -> AsyncBroker:
    backend: AsyncResultBackend[object]
    if KIND == "cluster":
        # The cluster and sentinel kinds keep their results where their
        # messages are: RESULTS_URL (plain Redis) does not apply.
        backend = RedisAsyncClusterResultBackend(
            BROKER_URL or CLUSTER_URL, result_ex_time=900
        )
    elif KIND == "sentinel":
        backend = RedisAsyncSentinelResultBackend(
            SENTINELS,
            SENTINEL_MASTER,
            result_ex_time=900,
            sentinel_kwargs=SENTINEL_POOL,
        )
    else:
        backend = RedisAsyncResultBackend(RESULTS_URL, result_ex_time=900)
    broker: AsyncBroker
    if KIND == "stream":
        broker = RedisStreamBroker(
            BROKER_URL or REDIS_URL,
            queue_name=QUEUE,
            consumer_group_name=QUEUE,
            idle_timeout=int(REDELIVER_AFTER * 1000),
        )
    elif KIND == "rabbitmq":
        broker = AioPikaBroker(
            BROKER_URL or AMQP_URL,
            qos=int(os.environ.get("BATCHTASK_QOS", "1000")),
            exchange=Exchange(name=QUEUE),
            task_queues=[Queue(name=QUEUE)],
        )
    elif KIND == "nats":
        broker = PullBasedJetStreamBroker(
            BROKER_URL or NATS_URL,
            subject=QUEUE,
            stream_name=QUEUE,
            durable=QUEUE,
            stream_config=StreamConfig(name=QUEUE, subjects=[QUEUE]),
            consumer_config=ConsumerConfig(
                durable_name=QUEUE, ack_wait=REDELIVER_AFTER, max_ack_pending=5000
            ),
            pull_consume_batch=100,
            pull_consume_timeout=(
                None if NATS_PULL_TIMEOUT == "none" else float(NATS_PULL_TIMEOUT)
            ),
        )
    elif KIND == "postgres":
        from taskiq_pg.asyncpg import AsyncpgBroker

        broker = AsyncpgBroker(
            dsn=BROKER_URL or PG_URL,
            channel_name=PG_TABLE,
            table_name=PG_TABLE,
            # asyncpg's pool holds 10 connections by default: the fleets of
            # worker processes of the suite's parallel runs would pass the
            # server's 100.
            write_kwargs={"min_size": 1, "max_size": 4},
        )
    elif KIND == "cluster":
        broker = RedisStreamClusterBroker(
            BROKER_URL or CLUSTER_URL,
            queue_name=QUEUE,
            consumer_group_name=QUEUE,
            xread_block=XREAD_BLOCK,
        )
    elif KIND == "sentinel":
        broker = RedisStreamSentinelBroker(
            sentinels=SENTINELS,
            master_name=SENTINEL_MASTER,
            queue_name=QUEUE,
            consumer_group_name=QUEUE,
            xread_block=XREAD_BLOCK,
            sentinel_kwargs=SENTINEL_POOL,  # to BaseSentinelBroker
        )
    else:
        broker = ListQueueBroker(BROKER_URL or REDIS_URL, queue_name=QUEUE)
    return broker.with_result_backend(backend)


# Waits for a free connection: every message's pre_execute and every call
# write here, hundreds at once (redis-py 8's plain pool refuses a 101st).
_redis = redis.Redis(
    connection_pool=redis.BlockingConnectionPool.from_url(
        REDIS_URL, max_connections=50, timeout=None
    )
)

ACK_TASKS = (
    "app:ack_when_received",
    "app:ack_when_executed",
    "app:ack_when_saved",
    "app:ack_context",
    "app:ack_batch_context",
    "app:ack_even_items",
    "app:ack_none",
)
"""The batch tasks of tests/test_ack_types.py, one per way of acknowledging."""


class CountReceived(TaskiqMiddleware):
    """Counts the messages the receiver started, before their task runs."""

    async def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        if message.task_name == "app:double" or message.task_name in ACK_TASKS:
            await _redis.incr(f"{QUEUE}:received")
        return message


broker = make_broker().with_middlewares(CountReceived())


@batch_task(
    broker,
    batch_size=BATCH_SIZE,
    batch_timeout=BATCH_TIMEOUT,
    results="per_item",
    task_name="app:double",
)
async def double(values: list[int], tag: str) -> list[int]:
    """Doubles each value; ``tag="cancel"`` raises CancelledError inside.

    ``tag="sleep:S"`` sleeps S seconds first. ``tag="retry:S"``: on an
    item's first call, `Retry` after S seconds (each call that gave an item
    a `Retry` adds 1 to its count in ``<queue>:retried``). A call that
    includes the value BATCHTASK_POISON ends its process (``os._exit``; a
    segfault with BATCHTASK_POISON_HOW=segv) before it records anything.
    """
    if tag == "cancel":
        raise asyncio.CancelledError
    if POISON is not None and POISON in values:
        if os.environ.get("BATCHTASK_POISON_HOW") == "segv":
            ctypes.string_at(0)
        os._exit(70)
    if tag.startswith("sleep:"):
        await asyncio.sleep(float(tag.partition(":")[2]))
    first: list[int] = []
    if tag.startswith("retry:"):
        for index, value in enumerate(values):
            if await _redis.hincrby(f"{QUEUE}:tried", str(value), 1) == 1:
                first.append(index)
    done = [value for index, value in enumerate(values) if index not in first]
    async with _redis.pipeline(transaction=False) as pipe:
        if done:
            pipe.rpush(f"{QUEUE}:calls", f"{os.getpid()}:{','.join(map(str, done))}")
        for value in done:
            pipe.hincrby(f"{QUEUE}:processed", str(value), 1)
        for index in first:
            pipe.hincrby(f"{QUEUE}:retried", str(values[index]), 1)
        await pipe.execute()
    if first:
        delay = float(tag.partition(":")[2])
        again = {index: Retry(delay=delay) for index in first}
        raise PartialFailure(again, results=[2 * v for v in values])
    return [2 * v for v in values]


@broker.task(task_name="app:nudge")
async def nudge() -> None:
    """A no-op message: lets a Redis stream consumer run its autoclaim."""


@broker.task(task_name="app:stats")
async def stats() -> dict[str, Any]:
    """This worker process's peak RSS (KiB) and batchtask's buffered items."""
    return {
        "pid": os.getpid(),
        "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "buffered": buffered_items(broker),
    }


if os.environ.get("BATCHTASK_ACK_TASKS") == "1":
    # Only on request: more batch tasks would change the start-up warnings
    # that other tests read (they list every batch task).
    def _ack_task(name: str, ack_type: str) -> Any:
        """The decorator of the ``app:<name>`` batch task with label `ack_type`."""
        return batch_task(
            broker,
            batch_size=BATCH_SIZE,
            batch_timeout=BATCH_TIMEOUT,
            results="per_item",
            task_name=f"app:{name}",
            ack_type=ack_type,
        )

    async def _record_ack_call(
        name: str, values: list[int], ctx: BatchContext | None = None
    ) -> list[int]:
        """List the call in ``<queue>:ack_calls:<name>``; the doubled values."""
        entry = f"{os.getpid()}:{','.join(map(str, values))}"
        if ctx is not None:
            entry += ":" + "".join("1" if acked else "0" for acked in ctx.acked)
            if [message.args[0] for message in ctx.messages] == values:
                entry += ":ordered"
        key = f"{QUEUE}:ack_calls:{name}"
        async with _redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, entry)
            pipe.expire(key, 900)
            await pipe.execute()
        return [2 * v for v in values]

    @_ack_task("ack_when_received", "when_received")
    async def ack_when_received(values: list[int]) -> list[int]:
        return await _record_ack_call("ack_when_received", values)

    @_ack_task("ack_when_executed", "when_executed")
    async def ack_when_executed(values: list[int]) -> list[int]:
        return await _record_ack_call("ack_when_executed", values)

    @_ack_task("ack_when_saved", "when_saved")
    async def ack_when_saved(values: list[int]) -> list[int]:
        return await _record_ack_call("ack_when_saved", values)

    @_ack_task("ack_context", "manual")
    async def ack_context(
        values: list[int], ctx: Context = TaskiqDepends()
    ) -> list[int]:
        """``manual``: taskiq's own ``Context.ack()``, once per call."""
        await ctx.ack()
        return await _record_ack_call("ack_context", values)

    @_ack_task("ack_batch_context", "manual")
    async def ack_batch_context(
        values: list[int], ctx: BatchContext = TaskiqDepends()
    ) -> list[int]:
        """``manual``: ``BatchContext.ack()``, once per call."""
        await ctx.ack()
        return await _record_ack_call("ack_batch_context", values, ctx)

    @_ack_task("ack_even_items", "manual")
    async def ack_even_items(
        values: list[int], ctx: BatchContext = TaskiqDepends()
    ) -> list[int]:
        """``manual``: ``BatchContext.ack_item(i)`` for the even values only."""
        for index, value in enumerate(values):
            if value % 2 == 0:
                await ctx.ack_item(index)
        return await _record_ack_call("ack_even_items", values, ctx)

    @_ack_task("ack_none", "manual")
    async def ack_none(
        values: list[int], ctx: BatchContext = TaskiqDepends()
    ) -> list[int]:
        """``manual`` without any ack: every message stays unacknowledged."""
        return await _record_ack_call("ack_none", values, ctx)


if os.environ.get("BATCHTASK_FLEET_TASKS") == "1":
    # Only on request, as the ack tasks above.
    WRITE_SECONDS = float(os.environ.get("BATCHTASK_WRITE_SECONDS", "0.05"))

    @batch_task(
        broker,
        batch_size=BATCH_SIZE,
        batch_timeout=BATCH_TIMEOUT,
        results="per_item",
        max_concurrent_calls_per_key=1,
        task_name="app:one_writer",
    )
    async def one_writer(values: list[int], key: str) -> list[int]:
        """One writer per `key` (across the fleet, under BatchReceiver): each call
        sleeps BATCHTASK_WRITE_SECONDS (default 0.05) and is listed in
        ``<queue>:spans`` as ``key:start:end:pid:values:how`` (``time.time()``;
        one machine, one clock), ``how`` being ``done`` or ``stopped`` (the
        call was cancelled)."""
        start = time.time()
        how = "stopped"
        try:
            await asyncio.sleep(WRITE_SECONDS)
            how = "done"
        finally:
            end = time.time()
            entry = f"{key}:{start:.6f}:{end:.6f}:{os.getpid()}:"
            entry += ",".join(map(str, values)) + f":{how}"
            async with _redis.pipeline(transaction=False) as pipe:
                pipe.rpush(f"{QUEUE}:spans", entry)
                if how == "done":
                    for value in values:
                        pipe.hincrby(f"{QUEUE}:processed", str(value), 1)
                pipe.expire(f"{QUEUE}:spans", 900)
                await pipe.execute()
        return [2 * v for v in values]

    @batch_task(
        broker,
        batch_size=BATCH_SIZE,
        batch_timeout=BATCH_TIMEOUT,
        results="per_item",
        dedup_key=lambda value: value,
        task_name="app:dedup_writer",
    )
    async def dedup_writer(values: list[int], key: str) -> list[int]:
        """Equal values in one batch are passed once (``dedup_key``); each call
        is listed in ``<queue>:dedup`` as ``pid:values``."""
        entry = f"{os.getpid()}:" + ",".join(map(str, values))
        async with _redis.pipeline(transaction=False) as pipe:
            pipe.rpush(f"{QUEUE}:dedup", entry)
            pipe.expire(f"{QUEUE}:dedup", 900)
            await pipe.execute()
        return [2 * v for v in values]
