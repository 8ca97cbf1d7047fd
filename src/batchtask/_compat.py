"""Every private name of taskiq (and taskiq-redis) batchtask relies on, checked here.

taskiq's receiver internals change between releases. `BatchReceiver` reads
them only through what this module lists; `receiver_changes` tells which
changed, and the receiver then runs every message on taskiq's own path (with
a warning) instead of failing. ``tests/test_compat.py`` fails naming the name
that changed on the installed versions.
"""

import dataclasses
import inspect
from typing import Any

from taskiq.receiver import Receiver

RECEIVER_ATTRIBUTES = (
    "sem",
    "sem_prefetch",
    "ack_time",
    "validate_params",
    "task_signatures",
    "task_hints",
    "dependency_graphs",
    "propagate_exceptions",
    "wait_tasks_timeout",
)
"""Attributes of a taskiq ``Receiver`` the batch-native path reads (undocumented)."""

PRIVATE_NAMES = (
    "taskiq.receiver.Receiver.runner(queue): takes the prefetched deliveries",
    "taskiq.receiver.receiver._PrefetchedMessage: fields data, owns_delivery_slot",
    "taskiq.receiver.receiver._QueueSignal.DONE: the end of deliveries, no data",
    "taskiq_redis.RedisAsyncResultBackend._task_name(task_id): a result's key",
    "taskiq_redis.RedisStreamBroker._ack_generator.<locals>._ack: free variables "
    "self, queue_name, id",
)
"""What batchtask uses that taskiq does not document, for the record."""


def receiver_changes(receiver: Any) -> list[str]:
    """What the batch-native path needs from taskiq's receiver and did not find."""
    from taskiq.receiver import receiver as module

    changed: list[str] = []
    params = list(inspect.signature(Receiver.runner).parameters)
    if params != ["self", "queue"]:
        changed.append(f"Receiver.runner{tuple(params)}")
    delivery = getattr(module, "_PrefetchedMessage", None)
    fields = (
        {field.name for field in dataclasses.fields(delivery)}
        if dataclasses.is_dataclass(delivery)
        else set[str]()
    )
    if not {"data", "owns_delivery_slot"} <= fields:
        changed.append("_PrefetchedMessage(data, owns_delivery_slot)")
    signal = getattr(module, "_QueueSignal", None)
    done = getattr(signal, "DONE", None)
    if done is None or hasattr(done, "data"):
        changed.append("_QueueSignal.DONE")
    changed.extend(
        f"Receiver.{name}"
        for name in RECEIVER_ATTRIBUTES
        if not hasattr(receiver, name)
    )
    return changed


def redis_changes() -> list[str]:
    """What the grouped Redis writes need from taskiq-redis and did not find."""
    try:
        from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker
    except ImportError:
        return []
    changed: list[str] = []
    if not callable(getattr(RedisAsyncResultBackend, "_task_name", None)):
        changed.append("RedisAsyncResultBackend._task_name")
    generator = getattr(RedisStreamBroker, "_ack_generator", None)
    if generator is None:
        changed.append("RedisStreamBroker._ack_generator")
    return changed
