"""What every broker adapter shares: the Protocol, the per-message fallback, coalescing.

`BrokerAdapter` is everything batchtask knows about one broker family, in one
shape; `PerMessage` implements it for any broker by doing what taskiq itself
does, one message at a time (it is the adapter of every broker no family
module claims, and the base the family adapters override). `Coalescer` and
`ack_each` are the two ways of sending many requests the adapters share.
"""

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Generic, NamedTuple, Protocol, TypeVar

from taskiq import (
    AckableMessage,
    AsyncBroker,
    AsyncResultBackend,
    BrokerMessage,
    TaskiqMessage,
)
from taskiq.acks import AckController

logger = logging.getLogger("batchtask")

T = TypeVar("T")

Send = Callable[[list[T]], Awaitable[Sequence[BaseException | None]]]
"""Sends requests at once; returns each one's error, or None."""

RawAck = Callable[[], Awaitable[None] | None]
"""A broker's ack of one message, as an ``AckableMessage`` carries it."""

Delivery = bytes | AckableMessage
"""One delivery as a broker's ``listen()`` yields it."""

AckPairs = Sequence[tuple[AckController, RawAck | None]]
"""Messages to ack: each one's controller and the broker's own ack it wraps."""

ResultWriter = Send[tuple[str, Any]]
"""Stores many (task id, ``TaskiqResult``) at once; each one's error, or None."""

CONCURRENT_KICKS = 100
"""Kicks in flight at once for a broker without a pipelined path."""


class LocalPath(Protocol):
    """The batch-native path as an in-process broker's kicks feed it.

    `batchtask._native.NativePath` is one; the core hands the adapters the way
    to make one (`batchtask.brokers.serve_in_process`), since the adapters
    import nothing above them.
    """

    ended: Callable[[str], None] | None
    """Told the task id of each taken message as it ends."""

    def start(self) -> None:
        """Read the broker's batch tasks and middlewares (again)."""
        ...

    def take(self, data: bytes | AckableMessage, owns_delivery_slot: bool) -> bool:
        """Take a batch task's message; False leaves it to taskiq."""
        ...

    def take_sent(self, message: TaskiqMessage) -> bool:
        """Take a batch task's message as parsed, kicked in this process."""
        ...

    def close(self) -> None:
        """Run every buffered batch now."""
        ...

    async def drain(self) -> None:
        """Wait until every taken message has ended."""
        ...


NewLocalPath = Callable[[Any, "BrokerAdapter"], LocalPath]
"""Makes the batch-native path of a taskiq ``Receiver`` (the broker's own), whose
deliveries are acked through the adapter given."""


class LeaseServer(Protocol):
    """Where leases are kept (`batchtask._fleet`): a family's ``lease_server``."""

    async def acquire(self, name: str, limit: int, holder: str, ttl_ms: int) -> int:
        """One of `limit` slots of `name` for `holder`: a fencing token, 0 if full."""
        ...

    async def renew(self, name: str, holder: str, ttl_ms: int) -> bool:
        """Extend `holder`'s lease of `name` by `ttl_ms`; False if it is gone."""
        ...

    async def release(self, name: str, holder: str) -> None:
        """Give `holder`'s lease of `name` back."""
        ...


class MemberGone(Exception):
    """The member a delivery was to move to is no longer in the fleet.

    What a `RouteServer.forward` raises when the server refused the move
    for that reason (the delivery is still here, unacked).
    """


class RouteServer(Protocol):
    """Where batches fill across the fleet (`batchtask._fleet.Router`).

    Each worker process is a member with an expiring heartbeat and an inbox;
    a delivery whose key another member owns moves to that member's inbox,
    with its ack, in one atomic step.
    """

    async def beat(self, member: str, ttl_ms: int) -> tuple[list[str], list[str]]:
        """Renew `member` for `ttl_ms`; the live members and the expired ones.

        The member's inbox is made at its first beat (and at the beat after
        one that failed); a reader that finds it gone makes it again.
        """
        ...

    async def reclaim(self, member: str, count: int) -> int:
        """Move up to `count` of expired `member`'s inbox entries to the queue.

        How many moved; -1 if `member` is alive.
        """
        ...

    async def forward(self, member: str, data: Delivery) -> None:
        """Move `data` to `member`'s inbox and ack it here, atomically.

        :raises Exception: if it did not move (it is still here, unacked).
        """
        ...

    async def leave(self, member: str, count: int) -> int:
        """`member` leaving: up to `count` of its inbox entries back to the queue.

        How many moved; once its inbox is empty, it is no member.
        """
        ...

    def forwardable(self, data: Delivery) -> bool:
        """Whether `data` may move: a delivery of the shared queue.

        Never an inbox's; a family may refuse redelivered ones too.
        """
        ...

    def serve(self, member: str | None) -> None:
        """Read `member`'s inbox with the queue from now on (None: stop)."""
        ...


class Notices(Protocol):
    """A channel to every worker process of a broker (`batchtask._notices`)."""

    async def publish(self, data: bytes) -> int:
        """Send `data` to every subscriber now; how many there were.

        Where the server does not count them (RabbitMQ, NATS), each
        subscriber answers and the answers heard within `NOTICE_ANSWERS_FOR`
        are counted.
        """
        ...

    def subscribe(self) -> AsyncIterator[bytes]:
        """What is published from now on, until cancelled (or the link drops)."""
        ...


NOTICE_ANSWERS_FOR = 0.5
"""Seconds a notice's publisher counts subscribers' answers, where the
server does not say how many got it."""


class Answers:
    """Counts the subscribers' answers to one notice, for `NOTICE_ANSWERS_FOR`.

    Where the server does not say how many got a message (RabbitMQ, NATS):
    hand `note` to the server's consumer of the notice's reply address (a
    coroutine function, as nats-py requires), publish, then
    ``await answers.counted()``.
    """

    def __init__(self) -> None:
        """None heard yet."""
        self.heard = 0

    async def note(self, _: object) -> None:
        """One answer."""
        self.heard += 1

    async def counted(self) -> int:
        """How many answered within `NOTICE_ANSWERS_FOR` seconds from now."""
        await asyncio.sleep(NOTICE_ANSWERS_FOR)
        return self.heard


NOTICE_CONNECT_WAIT = 10.0
"""Seconds a worker's subscription waits for its broker's connection (the
worker connects it just after it starts following) before opening its own."""


async def ready_within(ready: Callable[[], bool], seconds: float) -> bool:
    """Whether `ready()` holds within `seconds` (checked every 50 ms)."""
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


class UnackedCap(NamedTuple):
    """A broker's cap on the messages one consumer holds unacknowledged."""

    limit: int
    setting: str
    """The setting as the user wrote it, e.g. ``AioPikaBroker(qos=10)``."""
    fix: str
    """The same setting with ``{n}`` where the fix puts its value."""


@dataclass(frozen=True, slots=True)
class Options:
    """What a worker asks of the adapter of its broker."""

    group_acks: bool = True
    """Whether acks of one batch go together (``--receiver_arg group_writes``)."""
    idle_timeout_ms: int | None = None
    """Milliseconds after which a stream's unacknowledged entry is claimed by
    another consumer, where the broker has no setting of its own."""
    fleet: bool = True
    """Whether batches fill and call limits hold across the fleet where the
    family can (``--receiver_arg fleet=false``: per worker process)."""


DEFAULTS: Final = Options()
"""What a worker asks when it asks nothing: grouped acks, the broker's idle time."""


class BrokerAdapter(Protocol):
    """Everything batchtask knows about one broker family (see the package)."""

    family: ClassVar[str]
    """The family's short name, as `batchtask.brokers.FAMILIES` lists it."""
    private_names: ClassVar[tuple[str, ...]]
    """What this adapter uses that its broker package does not document."""

    # -- deliveries ----------------------------------------------------------
    def listen(self) -> AsyncIterator[Delivery]:
        """What a `BatchReceiver` reads: the broker's ``listen()``, or faster."""
        ...

    def noted(self, data: Delivery) -> None:
        """A `BatchReceiver` received `data` (before anything else happens to it)."""
        ...

    def redelivered(self, data: Delivery) -> bool | None:
        """Whether `data` was delivered before; None: maybe (ask the server)."""
        ...

    async def delivered_before(self, data: Delivery) -> bool:
        """Ask the server whether `data` was delivered before (after None above)."""
        ...

    # -- acks and kicks ------------------------------------------------------
    async def ack_many(self, acks: AckPairs) -> list[BaseException | None]:
        """Ack the messages not acked yet; each one's error, or None."""
        ...

    def stock_message(self, data: AckableMessage) -> AckableMessage:
        """`data` as taskiq's own receiver should get it (its ack grouped)."""
        ...

    async def kick_many(self, messages: Sequence[BrokerMessage]) -> None:
        """Send `messages` (``kiq_many``)."""
        ...

    def delays(self) -> bool:
        """Whether a kick with a ``delay`` label (seconds) delivers that much later.

        A retry's delay then costs the worker nothing.
        """
        ...

    def lease_server(self) -> LeaseServer | None:
        """Where call limits across the fleet keep their leases; None: per process."""
        ...

    async def keep(self, acks: Sequence[RawAck | None]) -> None:
        """Tell the server these deliveries are still worked on (not idle)."""
        ...

    def route_server(self) -> RouteServer | None:
        """Where batches fill across the fleet; None: each process fills its own."""
        ...

    def notices(self) -> Notices | None:
        """The channel settings changes reach every worker process on, if any."""
        ...

    # -- the worker's life ---------------------------------------------------
    async def start(self) -> None:
        """A `BatchReceiver` starts listening: start what runs beside it."""
        ...

    async def stop(self) -> None:
        """The `BatchReceiver` stopped: stop what `start` started."""
        ...

    def on_stock_worker(self) -> None:
        """A worker without `BatchReceiver` starts: group its acks if known."""
        ...

    def registered(self) -> None:
        """A batch task was registered on the broker."""
        ...

    def runs_in_place(self) -> bool:
        """Whether a kick returns only once its message was handled."""
        ...

    async def wait_kicked(self) -> None:
        """Wait until every message kicked in this process was handled."""
        ...

    # -- start-up checks ------------------------------------------------------
    def redelivery_window(self) -> tuple[float, str] | None:
        """(seconds, setting): after how long an unacked message goes elsewhere."""
        ...

    def unacked_cap(self) -> UnackedCap | None:
        """The broker's cap on unacknowledged messages per consumer, if any."""
        ...

    def changes(self) -> list[str]:
        """Which of `private_names` the installed package no longer has."""
        ...


class PerMessage:
    """The adapter of any broker: each message as taskiq handles it, nothing more."""

    family: ClassVar[str] = "any"
    private_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, broker: AsyncBroker, options: Options = DEFAULTS) -> None:
        """Serve `broker` with `options`."""
        self.broker = broker
        self.options = options

    def listen(self) -> AsyncIterator[Delivery]:
        """The broker's own ``listen()``."""
        return aiter(self.broker.listen())

    def noted(self, data: Delivery) -> None:
        """Nothing to note."""

    def redelivered(self, data: Delivery) -> bool | None:
        """Unknown deliveries are taken as first ones."""
        return False

    async def delivered_before(self, data: Delivery) -> bool:
        """Nothing to ask: a maybe is checked against the result backend."""
        return True

    async def ack_many(self, acks: AckPairs) -> list[BaseException | None]:
        """Ack each message on its own, concurrently."""
        return await ack_each([controller for controller, _ in acks])

    def stock_message(self, data: AckableMessage) -> AckableMessage:
        """`data` as it came."""
        return data

    async def kick_many(self, messages: Sequence[BrokerMessage]) -> None:
        """The broker's ``kick`` per message, `CONCURRENT_KICKS` at a time."""
        kick = self.broker.kick
        for start in range(0, len(messages), CONCURRENT_KICKS):
            chunk = messages[start : start + CONCURRENT_KICKS]
            await asyncio.gather(*(kick(message) for message in chunk))

    def delays(self) -> bool:
        """Unknown brokers deliver at once: the worker holds a delayed retry."""
        return False

    def lease_server(self) -> LeaseServer | None:
        """No lease server: call limits hold per worker process."""
        return None

    async def keep(self, acks: Sequence[RawAck | None]) -> None:
        """Nothing to tell: the broker's redelivery, if any, is its own."""

    def route_server(self) -> RouteServer | None:
        """No routes: each worker process fills batches from what it receives."""
        return None

    def notices(self) -> Notices | None:
        """No channel: settings change per process."""
        return None

    async def start(self) -> None:
        """Nothing runs beside the receiver."""

    async def stop(self) -> None:
        """Nothing to stop."""

    def on_stock_worker(self) -> None:
        """Nothing to install."""

    def registered(self) -> None:
        """Nothing to prepare."""

    def runs_in_place(self) -> bool:
        """Messages go to a worker."""
        return False

    async def wait_kicked(self) -> None:
        """Kicked messages are handled by workers: nothing to wait for here."""

    def redelivery_window(self) -> tuple[float, str] | None:
        """Not known."""
        return None

    def unacked_cap(self) -> UnackedCap | None:
        """Not known."""
        return None

    def changes(self) -> list[str]:
        """Nothing private is used."""
        return []


def missing_attributes(owner: object, names: Sequence[str]) -> list[str]:
    """The `names` `owner` lacks, each as ``Owner.name``."""
    label = getattr(owner, "__name__", type(owner).__name__)
    return [f"{label}.{name}" for name in names if not hasattr(owner, name)]


def of_class(kinds: tuple[str, ...], value: object) -> bool:
    """Whether `value`'s class or a base is one of `kinds` (``module.Class``)."""
    return any(
        f"{kind.__module__}.{kind.__qualname__}" in kinds
        for kind in type(value).__mro__
    )


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


class _Ended:
    """The end of one `Arrivals.listen`'s queue reader, with its error."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: Exception | None = None


def cancelling() -> bool:
    """Whether the running task is being cancelled.

    nats-py turns a cancelled fetch into a ``TimeoutError``: a loop that
    retries on errors must then end, not retry.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


InboxReader = Callable[[str, Callable[[], None]], Awaitable[None]]
"""Reads a member's inbox onto `Arrivals.put` until it fails; calls its second
argument once reading works (the pause before the next try starts over)."""


class Arrivals:
    """A queue's deliveries and a fleet inbox's, merged in arrival order.

    For a family whose inbox is a second consumer (RabbitMQ, NATS): `serve`
    starts its inbox reader (again after a fault, with a growing pause) and
    stops it; the reader `put`s what it reads. `listen` reads the queue with
    one task onto the same arrivals (what the broker hands out is bounded by
    its prefetch) and yields both as they come; the end or the error of the
    queue's reader ends it.
    """

    def __init__(
        self,
        read: InboxReader,
        of_inbox: Callable[[Delivery], bool],
        give_back: Callable[[Delivery], Awaitable[object]],
    ) -> None:
        """Read inboxes with `read`.

        What one read and nobody took goes back with `give_back` when it
        stops (`of_inbox` tells which those are).
        """
        self._queue: asyncio.Queue[Delivery | _Ended] = asyncio.Queue()
        self._read = read
        self._of_inbox = of_inbox
        self._give_back = give_back
        self.member: str | None = None
        """The member whose inbox is read (None: none)."""
        self._reading: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None

    def put(self, data: Delivery) -> None:
        """One delivery of the inbox, to be read."""
        self._queue.put_nowait(data)

    def serve(self, member: str | None) -> None:
        """Read `member`'s inbox beside the queue (None: stop reading it)."""
        if member == self.member:
            return
        reading, self._reading = self._reading, None
        self.member = member
        loop = asyncio.get_running_loop()
        if reading is not None:
            self._stopping = loop.create_task(self._stop(reading))
        if member is not None:
            self._reading = loop.create_task(self._keep_reading(member))

    async def stopped(self) -> None:
        """Wait until the inbox reader stopped by `serve` gave its rest back."""
        stopping = self._stopping
        if stopping is not None:
            await stopping

    async def _keep_reading(self, member: str) -> None:
        pause = 0.1

        def reading_works() -> None:
            nonlocal pause
            pause = 0.1

        while True:
            try:
                await self._read(member, reading_works)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if cancelling():
                    return  # cancelled, as a client's own error (nats-py)
                logger.warning(
                    "batchtask: reading this worker's inbox failed (%r); again in "
                    "%.1f s",
                    exc,
                    pause,
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)

    async def _stop(self, reading: "asyncio.Task[None]") -> None:
        """Stop the inbox's reader `reading`.

        What it read and nobody took goes back to the inbox (`give_back`);
        the queue's stays to be read.
        """
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        kept: list[Delivery | _Ended] = []
        while not self._queue.empty():
            data = self._queue.get_nowait()
            if isinstance(data, _Ended) or not self._of_inbox(data):
                kept.append(data)
                continue
            with contextlib.suppress(Exception):
                await self._give_back(data)
        for data in kept:
            self._queue.put_nowait(data)

    async def listen(self, main: AsyncIterator[Delivery]) -> AsyncIterator[Delivery]:
        """The queue's deliveries (`main`) and the inbox's, as they come."""
        arrivals = self._queue
        ended = _Ended()
        pump = asyncio.ensure_future(self._pump(main, ended))
        try:
            while True:
                data = await arrivals.get()
                if isinstance(data, _Ended):
                    if data is not ended:
                        continue  # an earlier listen's end
                    if data.error is not None:
                        raise data.error
                    return
                yield data
        finally:
            pump.cancel()
            # Waited for, not awaited: a worker that stops cancels its reader
            # until it ends, and ``await pump`` would hand a second
            # cancellation on to the pump while the broker's listen() closes
            # (aiormq closes a channel whose ``basic.cancel`` was cancelled,
            # and RabbitMQ hands back every delivery unacknowledged on it:
            # items run twice).
            with contextlib.suppress(BaseException):
                await asyncio.wait({pump})

    async def _pump(self, main: AsyncIterator[Delivery], ended: _Ended) -> None:
        arrivals = self._queue
        try:
            async for data in main:
                arrivals.put_nowait(data)
        except Exception as exc:
            ended.error = exc
        finally:
            arrivals.put_nowait(ended)
            aclose = getattr(main, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()


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


def each_error(exc: BaseException, count: int) -> list[BaseException | None]:
    """`exc` for each of `count` requests, one object each."""
    return [copy.copy(exc) for _ in range(count)]


ResultBackend = AsyncResultBackend[Any]
