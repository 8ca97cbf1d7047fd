"""A batch task served by a real `taskiq worker` process in the Redis tests.

Configured by environment variables so each test gets its own queue:
BATCHTASK_QUEUE, BATCHTASK_BROKER ("list" or "stream"), BATCHTASK_BATCH_SIZE,
BATCHTASK_BATCH_TIMEOUT. Every call is recorded in the Redis list
``<queue>:calls`` as ``pid:value,value,...``.
"""

import os

import redis.asyncio as redis
from taskiq import AsyncBroker
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend, RedisStreamBroker

from batchtask import batch_task

REDIS_URL = "redis://127.0.0.1:6379"
QUEUE = os.environ.get("BATCHTASK_QUEUE", "batchtask-test")
BATCH_SIZE = int(os.environ.get("BATCHTASK_BATCH_SIZE", "50"))
BATCH_TIMEOUT = float(os.environ.get("BATCHTASK_BATCH_TIMEOUT", "1.0"))


def make_broker() -> AsyncBroker:
    kind = os.environ.get("BATCHTASK_BROKER", "list")
    backend: RedisAsyncResultBackend[object] = RedisAsyncResultBackend(
        REDIS_URL, result_ex_time=600
    )
    if kind == "stream":
        return RedisStreamBroker(
            REDIS_URL, queue_name=QUEUE, consumer_group_name=QUEUE
        ).with_result_backend(backend)
    return ListQueueBroker(REDIS_URL, queue_name=QUEUE).with_result_backend(backend)


broker = make_broker()
_redis = redis.from_url(REDIS_URL)


@batch_task(
    broker,
    batch_size=BATCH_SIZE,
    batch_timeout=BATCH_TIMEOUT,
    results="per_item",
    task_name="redis_app:double",
)
async def double(values: list[int], tag: str) -> list[int]:
    record = f"{os.getpid()}:{','.join(map(str, values))}"
    await _redis.rpush(f"{QUEUE}:calls", record)
    return [2 * v for v in values]
