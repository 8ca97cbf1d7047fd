"""`BatchReceiver`: taskiq's receiver, without the limits batching does not need.

Start a worker with it::

    taskiq worker --receiver batchtask:BatchReceiver app:broker

Batching works without it; with it, a worker also:

- lifts the cap on batch size. The stock receiver counts every buffered item
  as a running task, so ``--max-async-tasks`` (default 100) and the prefetch
  limit bound how many items a batch can collect. Here a batch item that
  entered its batch gives its slot back, so a ``batch_size`` of 500 fills on
  a default worker. At most `max_buffered` items per worker process wait
  like this (``--receiver_arg max_buffered=N``, default
  `DEFAULT_MAX_BUFFERED`); beyond that, items keep their slots as with the
  stock receiver, so memory stays bounded.
- stores results and acks messages together (``--receiver_arg
  group_writes=false`` turns it off). The items of a batch finish in the same
  event-loop turn; their results go to a taskiq-redis
  ``RedisAsyncResultBackend`` in one pipeline, and their
  ``RedisStreamBroker`` acks in one ``XACK`` per stream (see
  `batchtask._grouping`).

Everything per message stays taskiq's own: parsing, middlewares, each item's
result under its own task id, and each item acked only after its batch ran,
after its result is stored (``when_saved``, the default), exactly when the
stock receiver would ack it.
"""

import asyncio
import logging
from concurrent.futures import Executor
from typing import Any

from taskiq import AckableMessage, AsyncBroker
from taskiq.receiver import Receiver

from batchtask import _lifecycle
from batchtask._grouping import GroupedAcks, GroupedResultBackend

logger = logging.getLogger("batchtask")

DEFAULT_MAX_BUFFERED = 10_000
"""Batch items a worker process holds without a taskiq slot, by default."""

_HOOKS = ("_start_callback", "_on_callback_done")
"""Receiver methods this class extends to give a buffered item's slot back."""


class BatchReceiver(Receiver):
    """taskiq's `Receiver` that lifts the batch-size cap and groups writes.

    Pass it to the worker with ``--receiver batchtask:BatchReceiver``; its
    own settings come as ``--receiver_arg max_buffered=N`` and
    ``--receiver_arg group_writes=false``. See the module documentation.
    """

    def __init__(
        self,
        broker: AsyncBroker,
        executor: Executor | None = None,
        *args: Any,
        max_buffered: int | str = DEFAULT_MAX_BUFFERED,
        group_writes: bool | str = True,
        **kwargs: Any,
    ) -> None:
        """Take taskiq's receiver arguments, plus `max_buffered` and `group_writes`.

        Both may be strings, as ``--receiver_arg`` passes them.
        """
        super().__init__(broker, executor, *args, **kwargs)
        self.max_buffered = _count(max_buffered, "max_buffered")
        self.group_writes = _flag(group_writes, "group_writes")
        self._slots: dict[asyncio.Task[Any], bool] = {}
        """Callback task -> whether it holds a delivery slot too."""
        self._parked: set[asyncio.Task[Any]] = set()
        """Callback tasks whose item waits in a batch without a slot."""
        self._acks = GroupedAcks.for_broker(broker) if self.group_writes else None
        self._can_park = all(callable(getattr(Receiver, name, None)) for name in _HOOKS)
        if not self._can_park:
            logger.warning(
                "batchtask: this taskiq version's Receiver lacks %s; "
                "BatchReceiver cannot lift the batch-size cap",
                ", ".join(_HOOKS),
            )
        limit: int | None = None  # the stock cap stays: its warning applies
        if self.sem is None:
            limit = 0  # the worker has no task limit at all
        elif self._can_park and self.max_buffered:
            limit = self.max_buffered
        _lifecycle.receiver_started(broker, limit)

    @property
    def parked(self) -> int:
        """Batch items waiting in their batch without holding a slot now."""
        return len(self._parked)

    async def listen(self, finish_event: asyncio.Event) -> None:
        """Listen like taskiq's receiver, with grouped writes installed."""
        broker = self.broker
        original = broker.result_backend
        if self.group_writes and not isinstance(original, GroupedResultBackend):
            broker.result_backend = GroupedResultBackend(original)
        token = _lifecycle.parking.set(self.park)
        try:
            await super().listen(finish_event)
        finally:
            _lifecycle.parking.reset(token)
            broker.result_backend = original

    async def callback(
        self, message: bytes | AckableMessage, raise_err: bool = False
    ) -> None:
        """Run one message as taskiq does, acking it with its batch's others."""
        if self._acks is not None and isinstance(message, AckableMessage):
            grouped = self._acks.wrap(message.ack)
            if grouped is not None:
                message = AckableMessage.model_construct(data=message.data, ack=grouped)
        await super().callback(message, raise_err=raise_err)

    def park(self) -> None:
        """Give the running callback's slots back: its item is in a batch.

        The entry point of a batch task calls it (through
        `batchtask._lifecycle.parking`) once the item is buffered. Does
        nothing outside this receiver's callbacks, without a
        ``--max-async-tasks`` limit, or when `max_buffered` items already
        wait without a slot.
        """
        task = asyncio.current_task()
        sem = self.sem
        if task is None or sem is None or task in self._parked:
            return
        owns_delivery_slot = self._slots.get(task)
        if owns_delivery_slot is None or len(self._parked) >= self.max_buffered:
            return
        self._parked.add(task)
        sem.release()
        if owns_delivery_slot:
            self.sem_prefetch.release()

    def _start_callback(self, message: Any, *, owns_execution_slot: bool) -> Any:
        started = super()._start_callback(  # pyright: ignore[reportPrivateUsage]
            message, owns_execution_slot=owns_execution_slot
        )
        if self._can_park and self.sem is not None:
            self._slots[started.task] = started.owns_delivery_slot
        return started

    def _on_callback_done(
        self,
        task: "asyncio.Task[Any]",
        *,
        active_tasks: set["asyncio.Task[Any]"],
        owns_delivery_slot: bool,
    ) -> None:
        self._slots.pop(task, None)
        if task in self._parked:
            # Its slots went back when it was parked.
            self._parked.discard(task)
            active_tasks.discard(task)
            return
        super()._on_callback_done(  # pyright: ignore[reportPrivateUsage]
            task, active_tasks=active_tasks, owns_delivery_slot=owns_delivery_slot
        )


def _count(value: int | str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if isinstance(value, bool) or number < 0:
        raise ValueError(
            f"BatchReceiver: {name} must be a whole number >= 0, got {value!r} "
            f"(--receiver_arg {name}=10000)"
        )
    return number


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _flag(value: bool | str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(
        f"BatchReceiver: {name} must be true or false, got {value!r} "
        f"(--receiver_arg {name}=false)"
    )
