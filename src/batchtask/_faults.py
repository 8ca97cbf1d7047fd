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
- whether a delivery may be a second one is the broker adapter's to tell
  (`batchtask.brokers`: AMQP's ``redelivered`` flag, JetStream's delivery
  count, a Redis stream entry claimed from another consumer); such a
  delivery is checked against the result backend (`Redeliveries.finished`),
  and one whose result is already stored is acked without a call.
"""

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from taskiq import AsyncResultBackend
from taskiq.result_backends.dummy import DummyResultBackend

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


@runtime_checkable
class FaultObserver(Protocol):
    """Where fault events are counted (`batchtask.metrics`)."""

    def fault(self, event: str, count: int) -> None:
        """`count` messages (or listens) met `event` (see `FAULT_EVENTS`)."""
        ...


FAULT_EVENTS = (
    "write_retried",
    "write_given_up",
    "ack_retried",
    "ack_given_up",
    "redelivered_joined",
    "redelivered_acked_unrun",
    "suspect",
    "poison",
    "relisten",
)
"""What a `FaultObserver` is told: a result write or ack sent again after a
transient failure, or given up after `RETRY_DELAYS`; a redelivered copy that
joined its held first copy, or was acked without a call (its first copy had
finished); an item run as a suspect, or failed as the poison; a ``listen()``
started again after a fault."""


def fault_observer(observer: object) -> FaultObserver | None:
    """`observer` if it counts fault events, else None."""
    return observer if isinstance(observer, FaultObserver) else None


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
    *,
    observer: FaultObserver | None = None,
    event: str = "",
) -> list[BaseException | None]:
    """`send` the items; send again those that failed transiently; each's error.

    `send` is called with the items still failing (it reads anything that
    changed meanwhile, such as an ack handed over by a redelivered copy).
    Gives up after `RETRY_DELAYS`, logging what could not be done. Retries
    and what was given up are counted as ``<event>_retried`` and
    ``<event>_given_up`` with `observer`, where given.
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
        if observer is not None:
            observer.fault(f"{event}_retried", len(due))
        await asyncio.sleep(delay)
        replies = await send([items[index] for index in due])
        for index, reply in zip(due, replies, strict=True):
            errors[index] = reply
    failed = [index for index, error in enumerate(errors) if error is not None]
    if failed and observer is not None:
        observer.fault(f"{event}_given_up", len(failed))
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
