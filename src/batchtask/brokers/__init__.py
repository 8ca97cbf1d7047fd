"""Broker adapters: what batchtask knows about each broker family, one module each.

The core (the batch-native path, the receiver, fault handling, checks, bulk
kicks) speaks to a broker only through a `BrokerAdapter`; `adapter_for`
picks one by the broker's class, as kombu's ``TRANSPORT_ALIASES`` picks a
transport, and `writer_for` picks grouped result writes by the result
backend's class. Every broker no family claims gets `PerMessage`, which
does what taskiq does, one message at a time.

=====================  ===========================================  ==========
module                 broker classes (``ADAPTERS``)                subclasses
=====================  ===========================================  ==========
`redis_stream`         taskiq-redis ``RedisStreamBroker``,          no
                       ``ListQueueBroker`` (kicks only)
`redis_cluster`        taskiq-redis ``RedisStreamClusterBroker``    no
`redis_sentinel`       taskiq-redis ``RedisStreamSentinelBroker``   no
`amqp`                 taskiq-aio-pika ``AioPikaBroker``            yes
`nats`                 taskiq-nats ``Pull/PushBasedJetStreamBroker`` yes
`postgres`             taskiq-postgres ``AsyncpgBroker``            yes
`inmemory`             taskiq ``InMemoryBroker``                    yes
=====================  ===========================================  ==========

A family module imports its broker package only inside functions, so
batchtask imports without any of them installed. docs/development.md says
how to add a family.
"""

import importlib
import weakref
from collections.abc import Callable
from typing import Any, Final

from taskiq import AsyncBroker, AsyncResultBackend, TaskiqMessage

from batchtask.brokers._base import (
    DEFAULTS,
    BrokerAdapter,
    LocalPath,
    NewLocalPath,
    Options,
    PerMessage,
    ResultWriter,
    UnackedCap,
)

ADAPTERS: Final[dict[str, tuple[str, bool]]] = {
    "taskiq_redis.redis_broker.RedisStreamBroker": ("redis_stream:RedisStream", False),
    "taskiq_redis.redis_broker.ListQueueBroker": ("redis_stream:RedisList", False),
    "taskiq_redis.redis_cluster_broker.RedisStreamClusterBroker": (
        "redis_cluster:RedisCluster",
        False,
    ),
    "taskiq_redis.redis_sentinel_broker.RedisStreamSentinelBroker": (
        "redis_sentinel:RedisSentinel",
        False,
    ),
    "taskiq_aio_pika.broker.AioPikaBroker": ("amqp:Amqp", True),
    "taskiq_nats.broker.PullBasedJetStreamBroker": ("nats:JetStream", True),
    "taskiq_nats.broker.PushBasedJetStreamBroker": ("nats:JetStream", True),
    "taskiq_pg.asyncpg.broker.AsyncpgBroker": ("postgres:Postgres", True),
    "taskiq.brokers.inmemory_broker.InMemoryBroker": ("inmemory:InMemory", True),
}
"""A broker class (``module.Class``) to its adapter (``module:Class`` here) and
whether the adapter serves the class's subclasses too (a subclass of a Redis
broker may kick, ack or store differently: it gets `PerMessage`)."""

WRITERS: Final[dict[str, str]] = {
    "taskiq_redis.redis_backend.RedisAsyncResultBackend": "redis_stream:script_writer",
    "taskiq_redis.redis_backend.RedisAsyncClusterResultBackend": (
        "redis_cluster:cluster_writer"
    ),
    "taskiq_redis.redis_backend.RedisAsyncSentinelResultBackend": (
        "redis_sentinel:sentinel_writer"
    ),
}
"""A result backend class (exactly it) to the function that groups its writes."""


def adapter_for(broker: AsyncBroker, options: Options = DEFAULTS) -> BrokerAdapter:
    """The adapter of `broker`'s family (`PerMessage` for any other broker)."""
    for depth, kind in enumerate(type(broker).__mro__):
        found = ADAPTERS.get(f"{kind.__module__}.{kind.__qualname__}")
        if found is not None and (depth == 0 or found[1]):
            adapter: BrokerAdapter = _load(found[0])(broker, options)
            return adapter
    return PerMessage(broker, options)


def writer_for(backend: AsyncResultBackend[Any]) -> ResultWriter | None:
    """Grouped writes for `backend`'s class, if a family knows how."""
    kind = type(backend)
    found = WRITERS.get(f"{kind.__module__}.{kind.__qualname__}")
    if found is None:
        return None
    writer: ResultWriter = _load(found)(backend)
    return writer


def families() -> dict[str, type[BrokerAdapter]]:
    """Every adapter class by family name (for checks and the docs)."""
    found: dict[str, type[BrokerAdapter]] = {"any": PerMessage}
    for path, _ in ADAPTERS.values():
        adapter: type[BrokerAdapter] = _load(path)
        found[adapter.family] = adapter
    return found


_local_paths: list[NewLocalPath] = []


def serve_in_process(new_path: NewLocalPath) -> None:
    """Let in-process brokers' adapters hand batch tasks' kicks to `new_path`'s paths.

    The core's batch-native path calls this as it is imported (which
    ``import batchtask`` does); an adapter then makes one with `local_path`.
    """
    _local_paths[:] = [new_path]


def local_path(receiver: Any, adapter: BrokerAdapter) -> LocalPath | None:
    """A batch-native path for `receiver` (None before the core provided one)."""
    if not _local_paths:
        return None
    return _local_paths[0](receiver, adapter)


Sender = Callable[[TaskiqMessage], bool]
"""Hands a message kicked in this process to the batch-native path, as the
receiver would parse it; False: not taken (kick it as usual)."""

_senders: "weakref.WeakKeyDictionary[AsyncBroker, weakref.WeakMethod[Sender]]" = (
    weakref.WeakKeyDictionary()
)
"""Weak both ways: a sender refers to its broker, and must not keep it alive."""


def send_here(broker: AsyncBroker, sender: Sender) -> None:
    """Let batch tasks' kicks on `broker` skip the wire: an in-process family's call.

    `sender` is a bound method of an object the broker keeps alive.
    """
    _senders[broker] = weakref.WeakMethod(sender)


def sender_of(broker: AsyncBroker) -> Sender | None:
    """How a kick on `broker` reaches the native path without the wire, if it can."""
    found = _senders.get(broker)
    return None if found is None else found()


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(f"batchtask.brokers.{module}"), name)


__all__ = [
    "ADAPTERS",
    "WRITERS",
    "BrokerAdapter",
    "LocalPath",
    "NewLocalPath",
    "Options",
    "PerMessage",
    "Sender",
    "UnackedCap",
    "adapter_for",
    "families",
    "local_path",
    "send_here",
    "sender_of",
    "serve_in_process",
    "writer_for",
]
