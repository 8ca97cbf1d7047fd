"""`BatchReceiver`: taskiq's receiver, with batch tasks' messages handled as batches.

Start a worker with it::

    taskiq worker --receiver batchtask:BatchReceiver app:broker

Batching works without it; with it, a worker handles the messages of batch
tasks on a batch-native path (`batchtask._native`): no asyncio task per
message, dependencies resolved once per call, results written and messages
acknowledged per batch (one command and one ``XACK`` on Redis). Every
message still gets what taskiq's receiver gives it: its middlewares' hooks,
its result under its own task id, its ack at its ``ack_type`` time. Plain
taskiq tasks keep taskiq's own path.

- The batch-size cap is lifted: a buffered item holds no ``--max-async-tasks``
  slot, and gives its delivery slot back while at most `max_buffered` items
  per worker process wait that way (``--receiver_arg max_buffered=N``,
  default `DEFAULT_MAX_BUFFERED`); beyond that an item keeps its delivery
  slot until it ends, so the broker stops delivering and memory stays bounded.
- ``--receiver_arg group_writes=false`` writes results and sends acks one
  message at a time, as taskiq does.
- ``--receiver_arg max_message_bytes=N`` (default `DEFAULT_MAX_MESSAGE_BYTES`,
  0: no limit): a delivery larger than that is not parsed; it is logged,
  its error (`batchtask.MessageTooLargeError`) stored under its task id when
  the message is a batch task's whose id can be read from its start, and it
  is acknowledged.
- ``--receiver_arg idle_timeout=MS``: for Redis stream brokers without an
  ``idle_timeout`` of their own (Cluster, Sentinel), the milliseconds after
  which an entry left unacknowledged by a dead consumer is claimed (default
  600000, taskiq-redis's default for ``RedisStreamBroker``).
- ``--receiver_arg fleet=false``: batches fill, and ``max_concurrent_calls``
  and ``max_concurrent_calls_per_key`` hold, per worker process only. By
  default, on the Redis stream brokers, RabbitMQ (taskiq-aio-pika) and NATS
  JetStream (taskiq-nats, pull-based), each delivery moves to the process
  that owns its batch key, and the limits hold across every `BatchReceiver`
  worker of the queue (on taskiq-postgres's broker, the limits): each call
  of a limited task holds a lease on the stream's server, the broker's
  database, or the Redis of a taskiq-redis result backend
  (`batchtask._fleet`, docs/fleets.md).
- ``--receiver_arg gc_freeze=false``: by default, once the worker has started
  and before it reads its first delivery, each process (once) collects its garbage
  and freezes what is left (``gc.collect()``, ``gc.freeze()``: the imported
  modules, the app, its connections), so that the cyclic garbage
  collector's full collections, which batched items waiting in memory
  trigger often, stop walking the whole start-up heap (`freeze_heap`).
  Frozen objects are still freed by reference counting; a reference cycle
  among them is never collected.

What the receiver knows about the broker (how it reads, what a delivery is,
how acks go together) comes from the broker's adapter (`batchtask.brokers`).

It relies on a few of taskiq's private names (`batchtask._compat`); on a
taskiq where they changed it warns once and runs every message on taskiq's
own path, where batching works as on any worker.
"""

import asyncio
import contextlib
import functools
import gc
import logging
import re
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

import anyio
from taskiq import AckableMessage, AsyncBroker, TaskiqResult
from taskiq.acks import AckController
from taskiq.receiver import Receiver

from batchtask import _compat, _lifecycle
from batchtask._errors import MessageTooLargeError
from batchtask._faults import retried, transient
from batchtask._grouping import GroupedResultBackend, store_many
from batchtask._native import NativePath
from batchtask._task import batch_task_of
from batchtask.brokers import BrokerAdapter, Options, adapter_for

logger = logging.getLogger("batchtask")

RELISTEN_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Pauses before listening again after the broker's ``listen()`` failed."""

DEFAULT_MAX_BUFFERED = 10_000
"""Batch items a worker process holds without a delivery slot, by default."""

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
"""Bytes above which a delivery is refused unparsed, by default (64 MiB)."""

_HEAD = 4096
"""Bytes of a refused delivery searched for its task id and name."""
_FIELD = {
    name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*"([^"\\]{1,512})"')
    for name in ("task_id", "task_name")
}


class BatchReceiver(Receiver):
    """taskiq's `Receiver` with a batch-native path for batch tasks.

    Pass it to the worker with ``--receiver batchtask:BatchReceiver``; its
    own settings come as ``--receiver_arg max_buffered=N``,
    ``--receiver_arg group_writes=false``, ``--receiver_arg
    max_message_bytes=N``, ``--receiver_arg idle_timeout=MS``,
    ``--receiver_arg fleet=false`` and ``--receiver_arg gc_freeze=false``.
    See the module documentation.
    """

    def __init__(
        self,
        broker: AsyncBroker,
        executor: Executor | None = None,
        *args: Any,
        max_buffered: int | str = DEFAULT_MAX_BUFFERED,
        group_writes: bool | str = True,
        idle_timeout: int | str | None = None,
        max_message_bytes: int | str = DEFAULT_MAX_MESSAGE_BYTES,
        fleet: bool | str = True,
        gc_freeze: bool | str = True,
        **kwargs: Any,
    ) -> None:
        """Take taskiq's receiver arguments, plus batchtask's own six.

        `max_buffered`, `group_writes`, `idle_timeout`, `max_message_bytes`,
        `fleet` and `gc_freeze` may each be a string, as ``--receiver_arg``
        passes them.
        """
        super().__init__(broker, executor, *args, **kwargs)
        self.max_buffered = _count(max_buffered, "max_buffered")
        self.group_writes = _flag(group_writes, "group_writes")
        self.max_message_bytes = _count(max_message_bytes, "max_message_bytes")
        self._refusals: set[asyncio.Task[None]] = set()
        idle = None if idle_timeout is None else _count(idle_timeout, "idle_timeout")
        self.fleet = _flag(fleet, "fleet")
        self.gc_freeze = _flag(gc_freeze, "gc_freeze")
        options = Options(
            group_acks=self.group_writes,
            idle_timeout_ms=idle or None,
            fleet=self.fleet,
        )
        self.adapter: BrokerAdapter = adapter_for(broker, options)
        """What this receiver knows about its broker (`batchtask.brokers`)."""
        changed = _compat.receiver_changes(self)
        self.native: NativePath | None = None
        """The batch-native path; None where taskiq's receiver changed."""
        if changed:
            logger.warning(
                "batchtask: this taskiq's receiver changed (%s); BatchReceiver "
                "runs every message on taskiq's own path",
                "; ".join(changed),
            )
        else:
            # Without a task limit taskiq holds no slot per task either.
            unbounded = self.sem is None
            self.native = NativePath(
                self,
                max_buffered=1 << 62 if unbounded else self.max_buffered,
                adapter=self.adapter,
            )
        limit: int | None = None  # the stock cap stays: its warning applies
        if self.native is not None and (self.sem is None or self.max_buffered):
            limit = 0 if self.sem is None else self.max_buffered
        _lifecycle.receiver_started(
            broker, limit, native=self.native is not None, options=options
        )

    @property
    def buffered(self) -> int:
        """Batch items waiting now without holding a delivery slot."""
        return 0 if self.native is None else self.native.unslotted

    async def listen(self, finish_event: asyncio.Event) -> None:
        """Listen like taskiq's receiver, with grouped writes installed."""
        broker = self.broker
        original = broker.result_backend
        if self.group_writes and not isinstance(original, GroupedResultBackend):
            broker.result_backend = GroupedResultBackend(original)
        try:
            await super().listen(finish_event)
        finally:
            broker.result_backend = original

    async def prefetcher(
        self, queue: "asyncio.Queue[Any]", finish_event: asyncio.Event
    ) -> None:
        """Read the broker; batch tasks' deliveries go to the batch-native path.

        One task reads the broker's ``listen()`` (taskiq's prefetcher starts two
        tasks per delivery); every other delivery goes on `queue` to taskiq's
        runner exactly as taskiq's prefetcher puts it there. When
        `finish_event` is set (or ``--max-tasks-per-child`` is reached), reading
        stops, buffered batches run at once and are waited for, then the
        runner is told that no more deliveries come.
        """
        native = self.native
        if native is None:
            await super().prefetcher(queue, finish_event)
            return
        native.start()
        await self.adapter.start()
        if self.gc_freeze:
            freeze_heap()
        reading = asyncio.ensure_future(self._read(queue))
        finishing = asyncio.ensure_future(finish_event.wait())
        try:
            await asyncio.wait(
                {reading, finishing}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            logger.info("Stopping prefetching messages...")
            finishing.cancel()
            with anyio.CancelScope(shield=True):
                await _stop(reading)
                await asyncio.gather(reading, finishing, return_exceptions=True)
                if self._refusals:
                    await asyncio.wait(set(self._refusals))
                native.close()  # nothing more arrives: run what is buffered now
                draining = asyncio.ensure_future(native.drain())
                await asyncio.wait({draining}, timeout=self.wait_tasks_timeout)
                await native.leave()
                await self.adapter.stop()
                queue.put_nowait(_compat.END_OF_DELIVERIES)
        if reading.cancelled():
            return
        error = reading.exception()
        if error is None:
            return
        if finishing.done() and not finishing.cancelled():
            # Stopped on purpose: a listen() that turns its cancellation into
            # an error (nats-py raises TimeoutError from a cancelled fetch) is
            # not a failure of the broker.
            logger.info("batchtask: the broker's listen() ended with %r", error)
            return
        raise error  # the broker's listen() failed: as taskiq's prefetcher

    async def _read(self, queue: "asyncio.Queue[Any]") -> None:
        """Read the broker's ``listen()``, listening again after a fault."""
        native = self.native
        assert native is not None
        slots = self.sem_prefetch
        limit = self.max_tasks_to_execute
        fetched = 0
        failures = 0
        deliveries = self.adapter.listen()
        try:
            while not limit or fetched < limit:
                await slots.acquire()
                try:
                    data = await anext(deliveries)
                except StopAsyncIteration:
                    slots.release()
                    return
                except Exception as error:
                    slots.release()
                    if not transient(error):
                        raise
                    # The connection dropped: buffered items stay, and are
                    # acked by id (a Redis stream), or their redelivered
                    # copies hand over their acks (AMQP).
                    delay = RELISTEN_DELAYS[min(failures, len(RELISTEN_DELAYS) - 1)]
                    failures += 1
                    if native.faults is not None:
                        native.faults.fault("relisten", 1)
                    logger.warning(
                        "batchtask: the broker's listen() failed (%r); listening "
                        "again in %.2f s (attempt %d), %d item(s) still held",
                        error,
                        delay,
                        failures,
                        native.unslotted,
                    )
                    with contextlib.suppress(Exception):
                        await _closed(deliveries)
                    await asyncio.sleep(delay)
                    deliveries = self.adapter.listen()
                    continue
                except BaseException:
                    slots.release()
                    raise
                failures = 0
                fetched += 1
                self._deliver(native, data, queue)
            logger.info("Max number of tasks executed.")
        finally:
            with contextlib.suppress(Exception):
                await _closed(deliveries)

    def _deliver(
        self,
        native: NativePath,
        data: bytes | AckableMessage,
        queue: "asyncio.Queue[Any]",
    ) -> None:
        """One delivery: to the batch-native path, or to taskiq's runner."""
        self.adapter.noted(data)
        raw = data.data if isinstance(data, AckableMessage) else data
        if self.max_message_bytes and len(raw) > self.max_message_bytes:
            task = asyncio.ensure_future(self._refuse(data, raw))
            self._refusals.add(task)
            task.add_done_callback(self._refusals.discard)
            return
        if not native.take(data, owns_delivery_slot=True):
            # `callback` hands its ack to the adapter (`stock_message`).
            queue.put_nowait(_compat.delivery(data, owns_delivery_slot=True))

    async def _refuse(self, data: bytes | AckableMessage, raw: bytes) -> None:
        """A delivery over `max_message_bytes`: its error stored, then acked."""
        try:
            head = raw[:_HEAD]
            found = {
                name: match.group(1).decode(errors="replace")
                for name, pattern in _FIELD.items()
                if (match := pattern.search(head)) is not None
            }
            task_id, name = found.get("task_id"), found.get("task_name")
            logger.error(
                "batchtask: a delivery of %d bytes (task %s, id %s) is over "
                "max_message_bytes=%d; not parsed, acknowledged",
                len(raw),
                name or "unknown",
                task_id or "unknown",
                self.max_message_bytes,
            )
            found_task = None if name is None else self.broker.find_task(name)
            if (
                task_id is not None
                and found_task is not None
                and batch_task_of(found_task.original_func) is not None
            ):
                await self._store_refusal(task_id, found_task.task_name, len(raw))
            if isinstance(data, AckableMessage):
                await retried(
                    "acknowledging",
                    [AckController(data.ack)],
                    lambda due: self.adapter.ack_many([(c, data.ack) for c in due]),
                    lambda _: task_id or "unknown",
                )
        finally:
            self.sem_prefetch.release()

    async def _store_refusal(self, task_id: str, name: str, size: int) -> None:
        error = MessageTooLargeError(
            message=f"batch task {name!r}: message {task_id} is {size} bytes, over "
            f"the worker's max_message_bytes={self.max_message_bytes}; not run "
            f"(--receiver_arg max_message_bytes=N raises the limit)"
        )
        result: TaskiqResult[Any] = TaskiqResult(
            is_err=True, log=None, return_value=None, execution_time=0.0, error=error
        )
        backend = self.broker.result_backend
        await retried(
            "storing results",
            [(task_id, result)],
            lambda due: store_many(backend, list(due)),
            lambda pair: pair[0],
        )

    async def callback(
        self, message: bytes | AckableMessage, raise_err: bool = False
    ) -> None:
        """Run one message as taskiq does, its ack grouped where the broker allows."""
        if isinstance(message, AckableMessage):
            message = self.adapter.stock_message(message)
        await super().callback(message, raise_err=raise_err)


async def _closed(deliveries: AsyncIterator[bytes | AckableMessage]) -> None:
    close = getattr(deliveries, "aclose", None)
    if close is not None:
        await close()


STOP_GRACE = 1.0
"""Seconds the reader has to end after its first cancellation, before it is
cancelled again (`_stop`)."""


async def _stop(task: "asyncio.Task[None]") -> None:
    """Cancel `task` until it ends.

    A broker's ``listen()`` may swallow one cancellation (redis-py's read
    timeout can absorb a cancel that arrives as it expires), and taskiq's
    prefetcher would then wait forever; cancelling again ends it. Again only
    after `STOP_GRACE`: a ``listen()`` closing on its first cancellation may
    wait for its server (aio-pika's ``basic.cancel``), and aiormq closes a
    channel whose call is cancelled, handing back every delivery not yet
    acknowledged on it.
    """
    task.cancel()
    await asyncio.wait({task}, timeout=STOP_GRACE)
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)


@functools.cache
def freeze_heap() -> int:
    """Collect garbage, then freeze every object left; return how many are frozen.

    Once per process: later calls return the first one's count. A batch's
    items wait in memory long enough to survive into the collector's oldest
    generation, so full collections come every few thousand items; each
    walks every object not frozen. Frozen, the start-up heap (modules,
    classes, the app) is out of those walks.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug(
        "batchtask: %d objects from start-up frozen (gc.freeze); full garbage "
        "collections skip them (--receiver_arg gc_freeze=false: not frozen)",
        frozen,
    )
    return frozen


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
