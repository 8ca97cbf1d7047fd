"""`BatchContext`: the messages of one batch call, and their acknowledgement.

A batch function asks for it like taskiq's own ``Context``::

    @batch_task(broker, batch_size=100, batch_timeout=2.0, ack_type="manual")
    async def save(rows: list[Row], ctx: BatchContext = TaskiqDepends()) -> None:
        await db.copy(rows)
        await ctx.ack()  # every message of this call

``ctx.messages[i]`` is the message of ``rows[i]``. ``ack()`` acknowledges
every message of the call, ``ack_item(i)`` one of them; ``requeue_item(i)``
sends item *i* again (taskiq's ``Context.requeue`` for one item) and
``reject_item(i)`` fails it with taskiq's ``TaskRejectedError``;
``await retry_item(i, delay=30.0)`` sends it again, counted and delayed, as
a `Retry` raised for it would (see `batchtask.Retry`). A taskiq
``Context`` injected into a batch function acknowledges every message of the
call too (`call_context`).

On a worker's batch-native path (`batchtask.BatchReceiver`) the receiver
builds one `BatchContext` per call. On the stock path taskiq resolves one per
message (through ``__init__``) and `BatchContext.merge` joins those of a
call's items before the call.
"""

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from taskiq import AsyncBroker, Context, TaskiqDepends, TaskiqMessage, TaskiqState
from taskiq.acks import AckController
from taskiq.exceptions import NoResultError, TaskRejectedError

from batchtask._errors import Retry

Ack = Callable[[], Awaitable[None]]
"""Acknowledges one message (idempotent), as taskiq's ``Context.ack``."""
AckMany = Callable[[Sequence[int]], Awaitable[Sequence[BaseException | None]]]
"""Acknowledges the messages at the given indexes at once; each one's error."""


class BatchContext:
    """The messages of one batch call, in item order, and their acks.

    Inject it into a batch function with ``ctx: BatchContext = TaskiqDepends()``;
    do not build it yourself.
    """

    def __init__(self, context: Context = TaskiqDepends()) -> None:
        """The context of one message; the batch joins its items' contexts."""
        self.messages: tuple[TaskiqMessage, ...] = (context.message,)
        """The messages of the call's items: ``messages[i]`` carried item *i*."""
        self.broker: AsyncBroker = context.broker
        self.state: TaskiqState = context.state
        self._acks: tuple[Ack | None, ...] = (
            context.ack if context.is_ackable else None,
        )
        self._acked = [context.is_acked]
        self._ack_many: AckMany | None = None
        self._requeued: set[int] = set()
        self._rejected: set[int] = set()
        self._retried: dict[int, Retry] = {}

    @classmethod
    def of(
        cls,
        messages: Sequence[TaskiqMessage],
        acks: Sequence[Ack | None],
        broker: AsyncBroker,
        ack_many: AckMany | None = None,
    ) -> "BatchContext":
        """The context of a call of `messages`, each acked by its `acks` entry.

        `ack_many`, if given, acknowledges several of them in one go for `ack`.
        """
        self = cls.__new__(cls)
        self.messages = tuple(messages)
        self.broker = broker
        self.state = broker.state
        self._acks = tuple(acks)
        self._acked = [False] * len(self._acks)
        self._ack_many = ack_many
        self._requeued = set()
        self._rejected = set()
        self._retried = {}
        return self

    @classmethod
    def merge(cls, parts: Sequence["BatchContext"]) -> "BatchContext":
        """One context for a call, from one context per item (in item order)."""
        merged = cls.of(
            [message for part in parts for message in part.messages],
            [ack for part in parts for ack in part._acks],
            parts[0].broker,
        )
        merged._acked = [acked for part in parts for acked in part._acked]
        return merged

    def __len__(self) -> int:
        """How many items (and messages) the call has."""
        return len(self.messages)

    @property
    def is_ackable(self) -> bool:
        """Whether every message of the call can be acknowledged."""
        return all(ack is not None for ack in self._acks)

    @property
    def acked(self) -> tuple[bool, ...]:
        """Per item: whether its message has been acknowledged."""
        return tuple(self._acked)

    async def ack(self) -> None:
        """Acknowledge every message of the call (each once).

        :raises RuntimeError: if the broker's messages cannot be acknowledged.
        """
        if self._ack_many is None or not self.is_ackable:
            for index in range(len(self._acks)):
                await self.ack_item(index)
            return
        due = [index for index, acked in enumerate(self._acked) if not acked]
        errors = await self._ack_many(due)
        for index, error in zip(due, errors, strict=True):
            if error is None:
                self._acked[index] = True
        first = next((error for error in errors if error is not None), None)
        if first is not None:
            raise first

    async def ack_item(self, index: int) -> None:
        """Acknowledge the message of item `index` (once).

        :raises IndexError: if the call has no item `index`.
        :raises RuntimeError: if the broker's messages cannot be acknowledged.
        """
        ack = self._acks[self._index(index)]
        if ack is None:
            raise RuntimeError("Current message is not ackable.")
        if not self._acked[index]:
            await ack()
            self._acked[index] = True

    async def requeue_item(self, index: int) -> None:
        """Send item `index`'s message again; the item then stores no result.

        Like taskiq's ``Context.requeue`` for one message: the label
        ``X-Taskiq-requeue`` counts the requeues. The call goes on; when it
        returns, item `index` ends without a result (taskiq's
        ``NoResultError``) whatever the call returned for it.
        """
        message = self.messages[self._index(index)]
        count = int(message.labels.get("X-Taskiq-requeue", 0)) + 1
        message.labels["X-Taskiq-requeue"] = str(count)
        await self.broker.kick(self.broker.formatter.dumps(message))
        self._requeued.add(index)

    def reject_item(self, index: int) -> None:
        """Fail item `index` with taskiq's ``TaskRejectedError`` when the call ends."""
        self._rejected.add(self._index(index))

    async def retry_item(self, index: int, *, delay: float | None = None) -> None:
        """Retry item `index` after `delay` seconds, whatever the call returns for it.

        As a `Retry` for that item in `PartialFailure`: when the call ends, its
        message is sent again (its attempt counted) and joins a later batch no
        earlier than `delay` seconds later (None: the task's ``retry_delay``);
        past the task's attempts its failure is final.

        :raises IndexError: if the call has no item `index`.
        :raises ValueError: if `delay` is not a finite number >= 0 or None.
        """
        self._retried[self._index(index)] = Retry(delay)

    def override(self, index: int) -> BaseException | None:
        """The error item `index` ends with whatever the call returned, if any."""
        if index in self._requeued:
            return NoResultError()
        if index in self._rejected:
            return TaskRejectedError()
        return self._retried.get(index)

    def call_context(self, message: TaskiqMessage) -> Context:
        """A taskiq ``Context`` whose ``ack()`` acknowledges every message here."""
        return Context(message, self.broker, AckController(self.ack))

    def _index(self, index: int) -> int:
        if not 0 <= index < len(self.messages):
            raise IndexError(
                f"BatchContext: item index {index} is out of range; the call "
                f"has {len(self.messages)} item(s)"
            )
        return index


def merge_contexts(contexts: Sequence[Context]) -> Context:
    """One taskiq ``Context`` for a call, from its items' (in item order)."""
    batch = BatchContext.of(
        [context.message for context in contexts],
        [context.ack if context.is_ackable else None for context in contexts],
        contexts[0].broker,
    )
    return batch.call_context(contexts[0].message)


def merged_injections(
    per_item: Sequence[Any],
) -> dict[str, Any]:
    """Injected values for one call, from each item's (a mapping per item).

    A taskiq ``Context`` or a `BatchContext` becomes one for the whole call;
    every other dependency is the first item's.
    """
    first = per_item[0]
    merged = dict(first)
    for name, value in first.items():
        if isinstance(value, BatchContext):
            merged[name] = BatchContext.merge([item[name] for item in per_item])
        elif isinstance(value, Context):
            merged[name] = merge_contexts([item[name] for item in per_item])
    return merged
