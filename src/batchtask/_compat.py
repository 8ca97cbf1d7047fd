"""Every private name of taskiq batchtask relies on, checked here.

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
    "max_tasks_to_execute",
    "sem",
    "sem_prefetch",
    "ack_time",
    "validate_params",
    "task_signatures",
    "task_hints",
    "dependency_graphs",
    "propagate_exceptions",
    "wait_tasks_timeout",
    "known_tasks",
    "_prepare_task",
)
"""Attributes of a taskiq ``Receiver`` the batch-native path reads (undocumented)."""

PRIVATE_NAMES = (
    "taskiq.receiver.Receiver.prefetcher(queue, finish_event): reads the broker "
    "and puts each delivery on the runner's queue",
    "taskiq.receiver.receiver._PrefetchedMessage(data, owns_delivery_slot): "
    "a delivery on that queue",
    "taskiq.receiver.receiver._QueueSignal.DONE: the end of deliveries",
    "taskiq.receiver.Receiver._prepare_task(name, handler) and known_tasks: a "
    "task's signature, hints and dependency graph, made before its first run",
)
"""What batchtask uses that taskiq does not document, for the record. What it
uses of each broker package is its adapter's ``private_names``
(`batchtask.brokers`), checked by its ``changes()``."""


def receiver_changes(receiver: Any) -> list[str]:
    """What the batch-native path needs from taskiq's receiver and did not find."""
    from taskiq.receiver import receiver as module

    changed: list[str] = []
    params = list(inspect.signature(Receiver.prefetcher).parameters)
    if params != ["self", "queue", "finish_event"]:
        changed.append(f"Receiver.prefetcher{tuple(params)}")
    delivery = getattr(module, "_PrefetchedMessage", None)
    fields = (
        {field.name for field in dataclasses.fields(delivery)}
        if isinstance(delivery, type) and dataclasses.is_dataclass(delivery)
        else set[str]()
    )
    if fields != {"data", "owns_delivery_slot"}:
        changed.append("_PrefetchedMessage(data, owns_delivery_slot)")
    if getattr(getattr(module, "_QueueSignal", None), "DONE", None) is None:
        changed.append("_QueueSignal.DONE")
    changed.extend(
        f"Receiver.{name}"
        for name in RECEIVER_ATTRIBUTES
        if not hasattr(receiver, name)
    )
    return changed


def delivery(data: Any, *, owns_delivery_slot: bool) -> Any:
    """A delivery for taskiq's runner queue, as taskiq's prefetcher makes it."""
    from taskiq.receiver import receiver as module

    made: Any = module._PrefetchedMessage(  # pyright: ignore[reportPrivateUsage]
        data=data, owns_delivery_slot=owns_delivery_slot
    )
    return made


def prepare_task(receiver: Any, name: str, handler: Any) -> None:
    """Make `receiver` know task `name` as taskiq's receiver does before its first run.

    A receiver learns the broker's tasks when it is made; a task registered
    later (any task of an in-process broker, whose receiver is made with the
    broker) is prepared on its first message.
    """
    if name not in receiver.known_tasks:
        receiver._prepare_task(name, handler)


def _end_of_deliveries() -> Any:
    from taskiq.receiver import receiver as module

    return getattr(getattr(module, "_QueueSignal", None), "DONE", None)


END_OF_DELIVERIES: Any = _end_of_deliveries()
"""What taskiq's prefetcher puts on the runner's queue after the last delivery."""
