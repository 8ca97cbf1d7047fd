"""taskiq-redis on a Redis Cluster: ``RedisStreamClusterBroker``.

Everything of `batchtask.brokers._redis.StreamFamily`, through the broker's
``RedisCluster`` client: redis-py routes each command to the node of its key,
and a pipeline sends one round trip per node. taskiq-redis's cluster broker
has no ``idle_timeout`` and never claims a dead consumer's entries; under
`batchtask.BatchReceiver` they are claimed after ``--receiver_arg
idle_timeout=MS`` (default 600000). ``RedisAsyncClusterResultBackend``
stores one loop turn's results in one pipeline (a script cannot span nodes).
"""

import contextlib
from collections.abc import AsyncGenerator
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

from taskiq import AsyncResultBackend

from batchtask.brokers._base import ResultWriter
from batchtask.brokers._redis import StreamFamily, kept, pipelined_sets


class RedisCluster(StreamFamily):
    """taskiq-redis's ``RedisStreamClusterBroker``."""

    family: ClassVar[str] = "redis-cluster"
    ack_closure: ClassVar[str] = "RedisStreamClusterBroker._ack_generator.<locals>._ack"
    private_names: ClassVar[tuple[str, ...]] = (
        "taskiq_redis.RedisStreamClusterBroker._ack_generator.<locals>._ack: free "
        "variables self, queue_name, id",
        "taskiq_redis.RedisAsyncClusterResultBackend._task_name(task_id): a "
        "result's key",
    )

    def client(self) -> AbstractAsyncContextManager[Any]:
        """The broker's cluster client (kept open: it is the broker's)."""
        return kept(self.stream.redis)

    def notice_client(self) -> AbstractAsyncContextManager[Any]:
        """A client of one node: a cluster's ``PUBLISH`` reaches every node."""
        return _node_client(self.stream.redis)

    def changes(self) -> list[str]:
        """What the reader and grouped writes need and did not find."""
        from taskiq_redis import RedisAsyncClusterResultBackend

        changed = super().changes()
        if not hasattr(self.broker, "redis"):
            changed.append("RedisStreamClusterBroker.redis")
        if not callable(getattr(RedisAsyncClusterResultBackend, "_task_name", None)):
            changed.append("RedisAsyncClusterResultBackend._task_name")
        return changed


def cluster_writer(backend: AsyncResultBackend[Any]) -> ResultWriter:
    """One pipeline of ``SET``s per group: one round trip per node."""
    cluster: Any = backend

    async def write(requests: list[tuple[str, Any]]) -> list[BaseException | None]:
        return await pipelined_sets(cluster.redis, cluster, requests)

    return write


@contextlib.asynccontextmanager
async def _node_client(cluster: Any) -> AsyncGenerator[Any]:
    """A plain client of `cluster`'s first node, closed after one use."""
    from redis.asyncio import Redis

    await cluster.initialize()
    node = cluster.get_default_node()
    client = Redis(host=node.host, port=node.port)
    try:
        yield client
    finally:
        await client.aclose()
