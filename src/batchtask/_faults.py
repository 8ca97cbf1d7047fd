"""Surviving faults on the batch-native path: retried writes and acks, redeliveries.

A finished call's results and acks must reach their servers even when a
connection drops, and a message the broker hands out again must not run a
second time when its first copy is still held or has already finished:

- `retried` repeats a batch's result writes or acks that failed with a
  transient error (a dropped connection, a timeout: see `transient`), with
  growing pauses (`RETRY_DELAYS`), over a new connection where the client
  makes one; every retry and every final failure is logged.
- `Redeliveries` keeps, per worker process, the messages held now (buffered, in
  a call or finishing) by task id, and the task ids whose call finished but
  whose ack never got through. A redelivered copy of a held message hands its
  (new, valid) ack to the held one instead of joining a batch; a copy of a
  finished one is acked without a call.
- `looks_redelivered` tells, from what the broker's client shows, whether a
  delivery may be a second one (AMQP's ``redelivered`` flag, JetStream's
  delivery count, a Redis stream entry older than the broker's
  ``idle_timeout``); such a delivery is checked against the result backend,
  and one whose result is already stored is acked without a call.
"""

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

from taskiq import AckableMessage, AsyncBroker, AsyncResultBackend
from taskiq.result_backends.dummy import DummyResultBackend

from batchtask._grouping import stream_ack_target

logger = logging.getLogger("batchtask")

T = TypeVar("T")

RETRY_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
"""Pauses before each retry of a failed write or ack: about 8 s in all."""

_TRANSIENT_WORDS = (
    "Connection",
    "Timeout",
    "Closed",
    "Reconnecting",
    "NotConnected",
    "InvalidState",
    "Unavailable",
)
LOOKUPS = 16
"""Redelivered messages looked up in the result backend at once, per process.

Each lookup holds one of the backend's connections: a burst of redelivered
messages (a dead worker's claimed entries) must not take them all (redis-py
8's pools refuse a 101st with ``MaxConnectionsError``).
"""

UNACKED_MEMORY = 100_000
"""Task ids of finished messages whose ack failed, kept per worker process."""


def transient(error: BaseException) -> bool:
    """Whether `error` looks like a fault of the connection, worth a retry.

    Built-in ``OSError`` and ``TimeoutError``, and any exception whose class
    (or a base) is named for a connection, a timeout, a closed or
    reconnecting client or an invalid channel state: redis-py's
    ``ConnectionError``, aio-pika's ``ChannelInvalidStateError``, nats-py's
    ``ConnectionClosedError``, asyncpg's ``ConnectionDoesNotExistError``.
    """
    if isinstance(error, (OSError, TimeoutError)):
        return True
    return any(
        word in kind.__name__
        for kind in type(error).__mro__
        for word in _TRANSIENT_WORDS
    )


async def retried(
    what: str,
    items: Sequence[T],
    send: Callable[[Sequence[T]], Awaitable[Sequence[BaseException | None]]],
    describe: Callable[[T], str],
) -> list[BaseException | None]:
    """`send` the items; send again those that failed transiently; each's error.

    `send` is called with the items still failing (it reads anything that
    changed meanwhile, such as an ack handed over by a redelivered copy).
    Gives up after `RETRY_DELAYS`, logging what could not be done.
    """
    errors: list[BaseException | None] = list(await send(items))
    for attempt, delay in enumerate(RETRY_DELAYS, start=1):
        due = [
            index
            for index, error in enumerate(errors)
            if error is not None and transient(error)
        ]
        if not due:
            break
        logger.warning(
            "batchtask: %s failed for %d message(s) (%r); retry %d of %d in %.2f s",
            what,
            len(due),
            errors[due[0]],
            attempt,
            len(RETRY_DELAYS),
            delay,
        )
        await asyncio.sleep(delay)
        replies = await send([items[index] for index in due])
        for index, reply in zip(due, replies, strict=True):
            errors[index] = reply
    failed = [index for index, error in enumerate(errors) if error is not None]
    if failed:
        logger.error(
            "batchtask: %s failed for %d message(s), given up: %s",
            what,
            len(failed),
            ", ".join(describe(items[index]) for index in failed[:10]),
            exc_info=errors[failed[0]],
        )
    return errors


class Redeliveries:
    """What one worker process holds and owes, by task id (see the module)."""

    def __init__(self, backend: AsyncResultBackend[Any]) -> None:
        """Check redelivered messages against `backend` (unless it keeps nothing)."""
        self.held: dict[str, Any] = {}
        """Messages held now: task id to the item of its first copy."""
        self.unacked: OrderedDict[str, None] = OrderedDict()
        self.backend = backend
        self.skipped = 0
        """Redelivered copies acked without a call so far."""
        self.lookups = asyncio.Semaphore(LOOKUPS)
        """Held while one redelivered message is looked up (`LOOKUPS`)."""
        self._asking: list[tuple[tuple[Any, Any], asyncio.Future[int]]] = []
        self._asks: set[asyncio.Task[None]] = set()

    async def delivered_before(self, data: AckableMessage, broker: AsyncBroker) -> bool:
        """Whether a Redis stream entry's delivery count is above 1 (XPENDING).

        The entries asked about in one loop turn share one round trip.
        """
        target = stream_ack_target(data.ack, broker)
        if target is None:
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        if not self._asking:
            loop.call_soon(self._start_asking, broker)
        self._asking.append((target, future))
        return await future > 1

    def _start_asking(self, broker: Any) -> None:
        # Held here until done: a task nothing refers to may be collected
        # mid-flight, and its askers would wait forever.
        task = asyncio.ensure_future(self._ask(broker))
        self._asks.add(task)
        task.add_done_callback(self._asks.discard)

    async def _ask(self, broker: Any) -> None:
        asking, self._asking = self._asking, []
        from redis.asyncio import Redis

        try:
            async with Redis(connection_pool=broker.connection_pool) as connection:
                pipeline = connection.pipeline(transaction=False)
                for (stream, message_id), _ in asking:
                    pipeline.xpending_range(
                        stream,
                        broker.consumer_group_name,
                        min=message_id,
                        max=message_id,
                        count=1,
                    )
                replies = await pipeline.execute(raise_on_error=False)
        except Exception as exc:
            replies = [exc] * len(asking)
        for (_, future), reply in zip(asking, replies, strict=True):
            if not future.done():
                future.set_result(_times_delivered(reply))

    @property
    def checks_results(self) -> bool:
        """Whether a stored result tells that a message already ran."""
        inner = getattr(self.backend, "inner", self.backend)
        return not isinstance(inner, DummyResultBackend)

    def owe(self, task_id: str) -> None:
        """`task_id` finished, but its ack did not get through."""
        self.unacked[task_id] = None
        self.unacked.move_to_end(task_id)
        while len(self.unacked) > UNACKED_MEMORY:
            self.unacked.popitem(last=False)

    def owed(self, task_id: str) -> bool:
        """Whether `task_id` finished here with its ack not through (forgets it)."""
        return self.unacked.pop(task_id, 0) is None

    async def finished(self, task_id: str) -> bool:
        """Whether the result backend holds `task_id`'s result already."""
        if not self.checks_results:
            return False
        for delay in (*RETRY_DELAYS, None):
            try:
                return bool(await self.backend.is_result_ready(task_id))
            except Exception as exc:
                if delay is None or not transient(exc):
                    logger.warning(
                        "batchtask: could not check whether redelivered message "
                        "%s already ran; running it",
                        task_id,
                        exc_info=True,
                    )
                    return False
                await asyncio.sleep(delay)
        return False


def _times_delivered(reply: object) -> int:
    """An ``XPENDING`` row's delivery count; 2 when unknown (then checked)."""
    if isinstance(reply, list) and reply:
        row: object = cast("list[object]", reply)[0]
        if isinstance(row, dict):
            count: object = cast("dict[str, object]", row).get("times_delivered")
            if isinstance(count, int):
                return count
    return 2


def looks_redelivered(data: bytes | AckableMessage, broker: AsyncBroker) -> bool | None:
    """Whether this delivery was delivered before (see the module).

    None: maybe; `Redeliveries.delivered_before` asks the server (a Redis
    stream entry older than the broker's ``idle_timeout``).
    """
    if not isinstance(data, AckableMessage):
        return False
    ack = data.ack
    message = getattr(ack, "__self__", None)
    if message is not None:
        module = type(message).__module__
        if module == "aio_pika.message":
            return bool(getattr(message, "redelivered", False))
        if module.startswith("nats."):
            try:
                return int(message.metadata.num_delivered) > 1
            except Exception:
                return False
        return False
    target = stream_ack_target(ack, broker)
    if target is None:
        return False
    message_id = target[1]
    text = message_id.decode() if isinstance(message_id, bytes) else message_id
    try:
        added_ms = int(text.partition("-")[0])
    except ValueError:
        return False
    idle_ms = int(getattr(broker, "idle_timeout", 0))
    # XAUTOCLAIM hands out only entries idle that long; a fresh read returns
    # one older only from a backlog that old: then XPENDING tells.
    return None if added_ms <= time.time() * 1000 - idle_ms else False
