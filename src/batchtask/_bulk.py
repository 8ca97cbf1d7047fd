"""Sending many messages at once: one Redis pipeline, or concurrent kicks.

`kick_many` is what ``BatchTask.kiq_many`` uses after building one ordinary
message per item. For taskiq-redis's ``ListQueueBroker`` and
``RedisStreamBroker`` (exactly those classes, not subclasses, which may kick
differently) it writes every message in one pipeline, doing what their
``kick`` does per message. Any other broker gets its own ``kick`` for each
message, at most `CONCURRENT_KICKS` at a time.
"""

import asyncio
from collections.abc import Sequence
from typing import Any

from taskiq import AsyncBroker, BrokerMessage

CONCURRENT_KICKS = 100
"""Kicks in flight at once for a broker without a pipelined path."""


async def kick_many(broker: AsyncBroker, messages: Sequence[BrokerMessage]) -> None:
    """Send `messages` through `broker`, pipelined where it is known how."""
    if not messages:
        return
    if await _redis_pipeline(broker, messages):
        return
    for start in range(0, len(messages), CONCURRENT_KICKS):
        chunk = messages[start : start + CONCURRENT_KICKS]
        await asyncio.gather(*(broker.kick(message) for message in chunk))


async def _redis_pipeline(
    broker: AsyncBroker, messages: Sequence[BrokerMessage]
) -> bool:
    """Write `messages` in one pipeline for taskiq-redis list and stream brokers."""
    try:
        from redis.asyncio import Redis
        from taskiq_redis import ListQueueBroker, RedisStreamBroker
    except ImportError:
        return False
    kind = type(broker)
    if kind is not ListQueueBroker and kind is not RedisStreamBroker:
        return False
    redis_broker: Any = broker
    async with Redis(connection_pool=redis_broker.connection_pool) as connection:
        pipeline = connection.pipeline(transaction=False)
        for message in messages:
            queue = message.labels.get("queue_name") or redis_broker.queue_name
            if kind is ListQueueBroker:
                pipeline.lpush(queue, message.message)
            else:
                pipeline.xadd(
                    queue,
                    {b"data": message.message},
                    maxlen=redis_broker.maxlen,
                    approximate=redis_broker.approximate,
                )
        await pipeline.execute()
    return True
