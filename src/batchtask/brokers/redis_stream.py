"""taskiq-redis on one Redis server: ``RedisStreamBroker``, ``ListQueueBroker``.

The stream broker gets everything of `batchtask.brokers._redis.StreamFamily`
(its own reader with claims on a timer, one ``XACK`` per stream per batch,
kicks in one pipeline), connecting through the broker's connection pool.
``ListQueueBroker`` (no acks, no redelivery) gets pipelined kicks only.
``RedisAsyncResultBackend`` stores one loop turn's results with one script
call (`script_writer`).

Only these exact classes: a subclass may kick, ack or store differently, and
gets the per-message adapter.
"""

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

from taskiq import AsyncResultBackend, BrokerMessage

from batchtask.brokers._base import PerMessage, ResultWriter, each_error
from batchtask.brokers._redis import StreamFamily, dumped, expiry_of


class RedisStream(StreamFamily):
    """taskiq-redis's ``RedisStreamBroker`` on one server."""

    family: ClassVar[str] = "redis-stream"
    ack_closure: ClassVar[str] = "RedisStreamBroker._ack_generator.<locals>._ack"
    private_names: ClassVar[tuple[str, ...]] = (
        "taskiq_redis.RedisStreamBroker._ack_generator.<locals>._ack: free "
        "variables self, queue_name, id (acks of its own listen(), grouped on a "
        "worker without BatchReceiver)",
        "taskiq_redis.RedisAsyncResultBackend._task_name(task_id): a result's key",
    )

    def client(self) -> AbstractAsyncContextManager[Any]:
        """A client on the broker's connection pool."""
        from redis.asyncio import Redis

        return Redis(connection_pool=self.stream.connection_pool)

    def changes(self) -> list[str]:
        """What the reader, grouped acks and writes need and did not find."""
        from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

        changed = super().changes()
        if not callable(getattr(RedisAsyncResultBackend, "_task_name", None)):
            changed.append("RedisAsyncResultBackend._task_name")
        if getattr(RedisStreamBroker, "_ack_generator", None) is None:
            changed.append("RedisStreamBroker._ack_generator")
        return changed


class RedisList(PerMessage):
    """taskiq-redis's ``ListQueueBroker``: kicks in one pipeline."""

    family: ClassVar[str] = "redis-list"

    async def kick_many(self, messages: Sequence[BrokerMessage]) -> None:
        """Every message's ``LPUSH`` in one pipeline, as the broker's ``kick``."""
        from redis.asyncio import Redis

        broker: Any = self.broker
        async with Redis(connection_pool=broker.connection_pool) as connection:
            pipeline = connection.pipeline(transaction=False)
            for message in messages:
                queue = message.labels.get("queue_name") or broker.queue_name
                pipeline.lpush(queue, message.message)
            await pipeline.execute()


_SET_MANY = """
local unit, amount = ARGV[1], ARGV[2]
for i, key in ipairs(KEYS) do
  if unit == '' then
    redis.call('SET', key, ARGV[i + 2])
  else
    redis.call('SET', key, ARGV[i + 2], unit, amount)
  end
end
return #KEYS
"""
"""Sets each key to its value with the same expiry: one command, one reply."""


def script_writer(backend: AsyncResultBackend[Any]) -> ResultWriter:
    """One script call sets every result of the group.

    Each under the key, with the value and expiry the backend's own
    ``set_result`` uses: one command and one reply instead of one each.
    """
    from redis.asyncio import Redis

    redis_backend: Any = backend
    expiry = expiry_of(redis_backend) or ["", 0]
    script: Any = None

    async def write(requests: list[tuple[str, Any]]) -> list[BaseException | None]:
        nonlocal script
        indexes, names, values, errors = dumped(redis_backend, requests)
        if not names:
            return errors
        async with Redis(connection_pool=redis_backend.redis_pool) as connection:
            if script is None:
                script = connection.register_script(_SET_MANY)
            try:
                await script(keys=names, args=[*expiry, *values], client=connection)
            except Exception as exc:
                for index, error in zip(
                    indexes, each_error(exc, len(indexes)), strict=True
                ):
                    errors[index] = error
        return errors

    return write
