"""Result writes and acks of one batch, sent to Redis in one round trip.

When a batch's call ends, every item's receiver callback wakes in the same
turn of the event loop, and each stores its result and then acks its message.
These helpers collect what arrives in one loop turn and send it together:

- `GroupedResultBackend` wraps a broker's result backend. For taskiq-redis's
  ``RedisAsyncResultBackend`` (exactly that class) it writes the results of
  one loop turn with one command (a script), each under the key, with the value and the
  expiry the backend's own ``set_result`` uses; every other backend, and
  every other method, is called as before.
- `GroupedAcks` acks taskiq-redis ``RedisStreamBroker`` messages of one loop
  turn with one ``XACK`` per stream.
- `AmqpAcks` acks a batch of taskiq-aio-pika deliveries with one
  ``basic.ack(multiple=True)`` where that covers no unfinished delivery.
- `BufferedAcks` acks a batch of taskiq-nats deliveries one after another in
  one task: each ack only adds to the client's outgoing buffer, which is
  flushed once after them (one write, no round trip each).

Each caller still waits for its own write and gets its own outcome: a result
is stored, and a message acked, before the call returns, exactly as with one
write per item; a write that fails fails its own caller only (a lost
connection fails every caller of that round trip, as it would have failed
each of them alone).
"""

import asyncio
import copy
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from taskiq import AckableMessage, AsyncBroker, AsyncResultBackend, TaskiqResult
from taskiq.acks import AckController
from taskiq.brokers.inmemory_broker import InmemoryResultBackend
from taskiq.result_backends.dummy import DummyResultBackend

T = TypeVar("T")

Send = Callable[[list[T]], Awaitable[Sequence[BaseException | None]]]
"""Sends requests at once; returns each one's error, or None."""

RawAck = Callable[[], Awaitable[None] | None]
"""A broker's ack of one message, as an ``AckableMessage`` carries it."""


class Coalescer(Generic[T]):
    """Collects the requests made in one loop turn and sends them with one call."""

    def __init__(self, send: Send[T]) -> None:
        """Send what `submit` collects with `send`."""
        self._send = send
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.rounds = 0
        """Calls of `send` so far (for tests and benchmarks)."""

    async def submit(self, request: T) -> None:
        """Send `request` with the others of this loop turn; raise its error."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._pending = []
        future: asyncio.Future[None] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush, loop)
        self._pending.append((request, future))
        await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        self.rounds += 1
        task = loop.create_task(self._deliver(pending))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _deliver(self, pending: list[tuple[T, "asyncio.Future[None]"]]) -> None:
        errors: Sequence[BaseException | None]
        try:
            errors = await self._send([request for request, _ in pending])
        except asyncio.CancelledError:
            for _, future in pending:
                future.cancel()
            raise
        except Exception as exc:
            # One exception object per caller: each raises it in its own task.
            errors = [copy.copy(exc) for _ in pending]
        for (_, future), error in zip(pending, errors, strict=True):
            if future.done():
                continue  # its caller was cancelled; the write happened anyway
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


class GroupedResultBackend(AsyncResultBackend[Any]):
    """A result backend that stores the results of one loop turn together.

    Wraps `inner`; see the module's documentation for what is grouped.
    Attributes it does not define are read from `inner`.
    """

    def __init__(self, inner: AsyncResultBackend[Any]) -> None:
        """Wrap `inner`, grouping its writes where it is known how."""
        self.inner = inner
        self.group: Coalescer[tuple[str, TaskiqResult[Any]]] | None = None
        self.round_trips = 0
        """Grouped writes sent so far (for tests and benchmarks)."""
        self._write = _redis_result_writer(inner)
        if self._write is not None:
            self.group = Coalescer(self.write)

    @property
    def groups_writes(self) -> bool:
        """Whether `write` stores many results in one round trip."""
        return self._write is not None

    async def write(
        self, requests: list[tuple[str, TaskiqResult[Any]]]
    ) -> Sequence[BaseException | None]:
        """Store many results in one round trip; return each one's error.

        :raises RuntimeError: if the wrapped backend is not one it groups.
        """
        if self._write is None:
            raise RuntimeError("this result backend's writes are not grouped")
        self.round_trips += 1
        return await self._write(requests)

    def __getattr__(self, name: str) -> Any:
        """Read what this wrapper does not define from the wrapped backend."""
        if name == "inner":  # not set yet: avoid recursing during __init__
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def startup(self) -> None:
        """Start the wrapped backend."""
        await self.inner.startup()

    async def shutdown(self) -> None:
        """Shut the wrapped backend down."""
        await self.inner.shutdown()

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        """Store `result` under `task_id` (with this loop turn's other results)."""
        if self.group is None:
            await self.inner.set_result(task_id, result)
        else:
            await self.group.submit((task_id, result))

    async def is_result_ready(self, task_id: str) -> bool:
        """Ask the wrapped backend."""
        return await self.inner.is_result_ready(task_id)

    async def get_result(
        self, task_id: str, with_logs: bool = False
    ) -> TaskiqResult[Any]:
        """Read from the wrapped backend."""
        return await self.inner.get_result(task_id, with_logs=with_logs)

    async def set_progress(self, task_id: str, progress: Any) -> None:
        """Store progress through the wrapped backend."""
        await self.inner.set_progress(task_id, progress)

    async def get_progress(self, task_id: str) -> Any:
        """Read progress from the wrapped backend."""
        return await self.inner.get_progress(task_id)


async def store_many(
    backend: AsyncResultBackend[Any],
    requests: Sequence[tuple[str, TaskiqResult[Any]]],
) -> list[BaseException | None]:
    """Store each (task id, result); return each one's error, or None.

    One round trip where `backend` is a `GroupedResultBackend` that knows how,
    else one ``set_result`` per request, concurrently.
    """
    if isinstance(backend, GroupedResultBackend) and backend.groups_writes:
        try:
            return list(await backend.write(list(requests)))
        except Exception as exc:
            return [copy.copy(exc) for _ in requests]
    inner = backend.inner if isinstance(backend, GroupedResultBackend) else backend
    if len(requests) == 1 or type(inner) in _IN_PROCESS_BACKENDS:
        # No I/O to overlap: one after another, without a task each.
        errors: list[BaseException | None] = []
        for task_id, result in requests:
            try:
                await backend.set_result(task_id, result)
            except Exception as exc:
                errors.append(exc)
            else:
                errors.append(None)
        return errors
    replies = await asyncio.gather(
        *(backend.set_result(task_id, result) for task_id, result in requests),
        return_exceptions=True,
    )
    return [reply if isinstance(reply, BaseException) else None for reply in replies]


_IN_PROCESS_BACKENDS: tuple[type[AsyncResultBackend[Any]], ...] = (
    DummyResultBackend,
    InmemoryResultBackend,
)
"""taskiq's result backends that store in the process (no I/O)."""


_SET_MANY = """
local unit, amount = ARGV[1], ARGV[2]
for i, key in ipairs(KEYS) do
  if unit == '' then
    redis.call('SET', key, ARGV[i + 2])
  else
    redis.call('SET', key, ARGV[i + 2], unit, amount)
  end
end
return #KEYS
"""
"""Sets each key to its value with the same expiry: one command, one reply."""


def _redis_result_writer(
    backend: AsyncResultBackend[Any],
) -> Send[tuple[str, TaskiqResult[Any]]] | None:
    """A grouped ``set_result`` for ``RedisAsyncResultBackend``, else None.

    One script call sets every result of the group, each under the key, with
    the value and expiry the backend's own ``set_result`` uses: one command
    and one reply instead of one each per result.
    """
    try:
        from redis.asyncio import Redis
        from taskiq_redis import RedisAsyncResultBackend
    except ImportError:
        return None
    if not isinstance(backend, RedisAsyncResultBackend):
        return None
    if type(backend) is not RedisAsyncResultBackend:  # a subclass may store differently
        return None
    redis_backend = backend
    # The same expiry choice as RedisAsyncResultBackend.set_result.
    ex = redis_backend.result_ex_time or None
    px = None if ex else redis_backend.result_px_time or None

    expiry: list[Any] = ["EX", ex] if ex else ["PX", px] if px else ["", 0]
    script: Any = None

    async def write(
        requests: list[tuple[str, TaskiqResult[Any]]],
    ) -> list[BaseException | None]:
        nonlocal script
        errors: list[BaseException | None] = [None] * len(requests)
        names: list[str] = []
        values: list[bytes] = []
        for index, (task_id, result) in enumerate(requests):
            try:
                value = redis_backend.serializer.dumpb(result.model_dump(mode="json"))
            except Exception as exc:  # this result only: it cannot be stored
                errors[index] = exc
                continue
            names.append(redis_backend._task_name(task_id))  # pyright: ignore[reportPrivateUsage]
            values.append(value)
        if not names:
            return errors
        async with Redis(connection_pool=redis_backend.redis_pool) as connection:
            if script is None:
                script = connection.register_script(_SET_MANY)
            try:
                await script(keys=names, args=[*expiry, *values], client=connection)
            except Exception as exc:
                for index, error in enumerate(errors):
                    if error is None:
                        errors[index] = copy.copy(exc)
        return errors

    return write


class GroupedAcks:
    """Acks ``RedisStreamBroker`` messages of one loop turn: one XACK per stream."""

    def __init__(self, broker: AsyncBroker) -> None:
        """Group the acks of `broker`'s messages (see `for_broker`)."""
        self.broker: Any = broker
        self.group: Coalescer[tuple[str | bytes, Any]] = Coalescer(self._xack)
        self.round_trips = 0
        """``XACK`` round trips sent so far (for tests and benchmarks)."""

    @classmethod
    def for_broker(cls, broker: AsyncBroker) -> "GroupedAcks | None":
        """Grouped acks for a taskiq-redis ``RedisStreamBroker``, else None."""
        try:
            from taskiq_redis import RedisStreamBroker
        except ImportError:
            return None
        if type(broker) is not RedisStreamBroker:
            return None
        return cls(broker)

    def wrap(
        self, ack: Callable[[], Awaitable[None] | None]
    ) -> Callable[[], Awaitable[None]] | None:
        """A grouped version of one message's `ack`, or None if it is not known.

        ``RedisStreamBroker`` gives each message an ack closure over the
        message's id and stream; only such a closure of this very broker is
        grouped (read, never changed), anything else keeps its own ack.
        """
        target = stream_ack_target(ack, self.broker)
        if target is None:
            return None
        submit = self.group.submit

        async def grouped_ack() -> None:
            await submit(target)

        return grouped_ack

    async def ack_many(
        self, acks: Sequence[tuple[AckController, RawAck | None]]
    ) -> list[BaseException | None]:
        """Ack messages not acked yet: one ``XACK`` per stream for this broker's.

        Each pair is a message's controller and the broker's own ack it wraps;
        a message acked here is marked acked on its controller.
        """
        errors: list[BaseException | None] = [None] * len(acks)
        streamed: list[int] = []
        targets: list[tuple[str | bytes, Any]] = []
        others: list[int] = []
        for index, (controller, raw) in enumerate(acks):
            if controller.is_acked:
                continue
            target = None if raw is None else stream_ack_target(raw, self.broker)
            if target is None:
                others.append(index)
            else:
                streamed.append(index)
                targets.append(target)
        if targets:
            try:
                replies = await self._xack(targets)
            except Exception as exc:
                replies = [copy.copy(exc) for _ in targets]
            for index, reply in zip(streamed, replies, strict=True):
                errors[index] = reply
                if reply is None:
                    acks[index][0].is_acked = True
        for index, error in zip(
            others, await ack_each([acks[i][0] for i in others]), strict=True
        ):
            errors[index] = error
        return errors

    async def _xack(
        self, requests: list[tuple[str | bytes, Any]]
    ) -> list[BaseException | None]:
        from redis.asyncio import Redis

        streams: dict[str | bytes, list[int]] = {}
        for index, (stream, _) in enumerate(requests):
            streams.setdefault(stream, []).append(index)
        errors: list[BaseException | None] = [None] * len(requests)
        broker = self.broker
        self.round_trips += 1
        async with Redis(connection_pool=broker.connection_pool) as connection:
            pipeline = connection.pipeline(transaction=False)
            for stream, indexes in streams.items():
                ids = [requests[index][1] for index in indexes]
                pipeline.xack(stream, broker.consumer_group_name, *ids)
            replies = await pipeline.execute(raise_on_error=False)
        for indexes, reply in zip(streams.values(), replies, strict=True):
            if isinstance(reply, BaseException):
                for index in indexes:
                    errors[index] = reply
        return errors


_STREAM_ACK = "RedisStreamBroker._ack_generator.<locals>._ack"


def stream_ack_target(
    ack: Callable[..., Any], broker: AsyncBroker
) -> tuple[str | bytes, Any] | None:
    """(stream, message id) a ``RedisStreamBroker`` ack closure acks, or None."""
    code = getattr(ack, "__code__", None)
    cells = getattr(ack, "__closure__", None)
    if code is None or cells is None or ack.__qualname__ != _STREAM_ACK:
        return None
    try:
        bound = {
            name: cell.cell_contents
            for name, cell in zip(code.co_freevars, cells, strict=True)
        }
    except ValueError:  # an empty cell
        return None
    stream, message_id = bound.get("queue_name"), bound.get("id")
    if bound.get("self") is not broker or not isinstance(stream, (str, bytes)):
        return None
    if not isinstance(message_id, (str, bytes)):
        return None
    return stream, message_id


async def ack_each(controllers: Sequence[AckController]) -> list[BaseException | None]:
    """Ack each message not acked yet, concurrently; return each one's error."""
    due = [(i, c) for i, c in enumerate(controllers) if not c.is_acked]
    errors: list[BaseException | None] = [None] * len(controllers)
    if len(due) == 1:
        index, controller = due[0]
        try:
            await controller.ack()
        except Exception as exc:
            errors[index] = exc
    elif due:
        replies = await asyncio.gather(
            *(controller.ack() for _, controller in due), return_exceptions=True
        )
        for (index, _), reply in zip(due, replies, strict=True):
            if isinstance(reply, BaseException):
                errors[index] = reply
    return errors


def install_on_stock_worker(broker: AsyncBroker) -> None:
    """Group a worker's result writes and acks without `BatchReceiver`.

    Called when a worker with taskiq's own receiver starts: the items of a
    batch finish in the same loop turn, so their results go in one command
    (`GroupedResultBackend`, where the backend is one it groups) and their
    ``RedisStreamBroker`` acks in one ``XACK`` (the broker's ``listen`` is
    wrapped to hand out grouped acks). Each message is still acked after its
    own result is stored, as before.
    """
    backend = broker.result_backend
    if not isinstance(backend, GroupedResultBackend):
        grouped = GroupedResultBackend(backend)
        if grouped.groups_writes:
            broker.result_backend = grouped
    acks = GroupedAcks.for_broker(broker)
    if acks is None or "listen" in vars(broker):
        return
    listen = broker.listen

    async def listen_with_grouped_acks() -> AsyncGenerator[
        bytes | AckableMessage, None
    ]:
        deliveries = listen()
        try:
            async for message in deliveries:
                if isinstance(message, AckableMessage):
                    grouped_ack = acks.wrap(message.ack)
                    if grouped_ack is not None:
                        message = AckableMessage.model_construct(
                            data=message.data, ack=grouped_ack
                        )
                yield message
        finally:
            await deliveries.aclose()

    setattr(broker, "listen", listen_with_grouped_acks)  # noqa: B010


class AmqpAcks:
    """Acks taskiq-aio-pika deliveries of a batch with ``multiple=True``.

    Every delivery of the worker is noted (`delivered`) in order, per channel.
    Acking a batch acks, with one ``basic.ack(multiple=True)``, the longest
    run of its deliveries that starts at the channel's oldest unacked one:
    that covers no delivery still unfinished. The batch's other deliveries
    (an older one is still unfinished) are acked one by one, so no ack waits.
    Acks of one channel are sent in the order they were planned, so a
    ``multiple`` ack never covers a tag that is also acked alone.
    """

    def __init__(self) -> None:
        """Track no delivery yet."""
        self._channels: dict[int, _Channel] = {}
        self.round_trips = 0
        """``basic.ack`` frames sent so far (for tests and benchmarks)."""

    @classmethod
    def for_broker(cls, broker: AsyncBroker) -> "AmqpAcks | None":
        """Grouped acks for a taskiq-aio-pika ``AioPikaBroker``, else None."""
        if not any(k.__name__ == "AioPikaBroker" for k in type(broker).__mro__):
            return None
        return cls()

    def delivered(self, ack: RawAck | None) -> bool:
        """Note one delivery, by its ack; False if it is not aio-pika's."""
        target = _amqp_target(ack)
        if target is None:
            return False
        channel, tag = target
        state = self._channels.get(id(channel))
        if state is None or state.channel is not channel:
            state = self._channels[id(channel)] = _Channel(channel)
        state.unacked[tag] = None
        return True

    def wrap(self, ack: RawAck) -> Callable[[], Awaitable[None]]:
        """One delivery's ack, sent through this tracker (for taskiq's own path)."""
        controller = AckController(ack)

        async def tracked_ack() -> None:
            (error,) = await self.ack_many([(controller, ack)])
            if error is not None:
                raise error

        return tracked_ack

    async def ack_many(
        self, acks: Sequence[tuple[AckController, RawAck | None]]
    ) -> list[BaseException | None]:
        """Ack the deliveries not acked yet; return each one's error, or None."""
        errors: list[BaseException | None] = [None] * len(acks)
        by_channel: dict[int, list[tuple[int, int]]] = {}
        alone: list[int] = []
        for index, (controller, raw) in enumerate(acks):
            if controller.is_acked:
                continue
            target = _amqp_target(raw)
            state = None if target is None else self._channels.get(id(target[0]))
            if target is None or state is None or target[1] not in state.unacked:
                alone.append(index)
            else:
                by_channel.setdefault(id(target[0]), []).append((index, target[1]))
        for key, members in by_channel.items():
            state = self._channels[key]
            tags = {tag for _, tag in members}
            covered: list[int] = []
            for tag in state.unacked:
                if tag not in tags:
                    break
                covered.append(tag)
            for tag in tags:
                del state.unacked[tag]
            single = sorted(tags.difference(covered))
            try:
                async with state.lock:
                    if covered:
                        self.round_trips += 1
                        await state.channel.basic_ack(covered[-1], multiple=True)
                    for tag in single:
                        self.round_trips += 1
                        await state.channel.basic_ack(tag)
            except Exception as exc:
                for index, _ in members:
                    errors[index] = copy.copy(exc)
                continue
            for index, _ in members:
                acks[index][0].is_acked = True
        for index, error in zip(
            alone, await ack_each([acks[i][0] for i in alone]), strict=True
        ):
            errors[index] = error
        return errors


class _Channel:
    """One AMQP channel's deliveries not acked yet, oldest first."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.unacked: dict[int, None] = {}
        self.lock = asyncio.Lock()


def _amqp_target(ack: RawAck | None) -> tuple[Any, int] | None:
    """(aiormq channel, delivery tag) of an aio-pika message's ``ack``, or None."""
    message = getattr(ack, "__self__", None)
    if message is None or type(message).__module__ != "aio_pika.message":
        return None
    if getattr(ack, "__name__", None) != "ack":
        return None
    tag = getattr(message, "delivery_tag", None)
    channel = getattr(message, "channel", None)
    if not isinstance(tag, int) or channel is None:
        return None
    return channel, tag


class BufferedAcks:
    """Acks one after another, for brokers whose ack only buffers a frame."""

    @classmethod
    def for_broker(cls, broker: AsyncBroker) -> "BufferedAcks | None":
        """For taskiq-nats's JetStream brokers, else None."""
        kinds = {k.__name__ for k in type(broker).__mro__}
        if kinds & {"PullBasedJetStreamBroker", "PushBasedJetStreamBroker"}:
            return cls()
        return None

    async def ack_many(
        self, acks: Sequence[tuple[AckController, RawAck | None]]
    ) -> list[BaseException | None]:
        """Ack the messages not acked yet, in order; return each one's error."""
        errors: list[BaseException | None] = [None] * len(acks)
        for index, (controller, _) in enumerate(acks):
            try:
                await controller.ack()
            except Exception as exc:
                errors[index] = exc
        return errors
