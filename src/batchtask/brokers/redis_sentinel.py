"""taskiq-redis behind Redis Sentinel: ``RedisStreamSentinelBroker``.

Everything of `batchtask.brokers._redis.StreamFamily`, through one client of
the master Sentinel names (``Sentinel.master_for``), kept for the worker's
life: after a failover its next connection goes to the new master (the
reader's dropped connection makes `batchtask.BatchReceiver` listen again).
taskiq-redis's Sentinel broker never claims a dead consumer's entries; under
`batchtask.BatchReceiver` they are claimed after ``--receiver_arg
idle_timeout=MS`` (default 600000). ``RedisAsyncSentinelResultBackend``
stores one loop turn's results in one pipeline.
"""

from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

from taskiq import AsyncBroker, AsyncResultBackend

from batchtask.brokers._base import DEFAULTS, Options, ResultWriter
from batchtask.brokers._redis import StreamFamily, kept, pipelined_sets


class RedisSentinel(StreamFamily):
    """taskiq-redis's ``RedisStreamSentinelBroker``."""

    family: ClassVar[str] = "redis-sentinel"
    ack_closure: ClassVar[str] = (
        "RedisStreamSentinelBroker._ack_generator.<locals>._ack"
    )
    private_names: ClassVar[tuple[str, ...]] = (
        "taskiq_redis.RedisStreamSentinelBroker._ack_generator.<locals>._ack: free "
        "variables self, queue_name, id",
        "taskiq_redis.RedisAsyncSentinelResultBackend._task_name(task_id): a "
        "result's key",
    )

    def __init__(self, broker: AsyncBroker, options: Options = DEFAULTS) -> None:
        """Serve `broker`; its master's client is made on first use."""
        super().__init__(broker, options)
        self._master: Any = None

    def client(self) -> AbstractAsyncContextManager[Any]:
        """The master's client (one for this adapter, kept open)."""
        if self._master is None:
            broker = self.stream
            self._master = broker.sentinel.master_for(broker.master_name)
        return kept(self._master)

    def changes(self) -> list[str]:
        """What the reader and grouped writes need and did not find."""
        from taskiq_redis import RedisAsyncSentinelResultBackend

        changed = super().changes()
        for name in ("sentinel", "master_name"):
            if not hasattr(self.broker, name):
                changed.append(f"RedisStreamSentinelBroker.{name}")
        if not callable(getattr(RedisAsyncSentinelResultBackend, "_task_name", None)):
            changed.append("RedisAsyncSentinelResultBackend._task_name")
        return changed


def sentinel_writer(backend: AsyncResultBackend[Any]) -> ResultWriter:
    """One pipeline of ``SET``s per group, on the master."""
    sentinel: Any = backend
    master: Any = None

    async def write(requests: list[tuple[str, Any]]) -> list[BaseException | None]:
        nonlocal master
        if master is None:
            master = sentinel.sentinel.master_for(sentinel.master_name)
        return await pipelined_sets(master, sentinel, requests)

    return write
