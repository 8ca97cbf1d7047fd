"""taskiq-aio-pika: ``AioPikaBroker`` (RabbitMQ, AMQP 0-9-1).

- Acks: a batch's deliveries are acked with one ``basic.ack(multiple=True)``
  where that covers no unfinished delivery (`Amqp.ack_many`): every
  delivery of the worker is noted in order, per channel (`Amqp.noted`);
  acking a batch acks, with one frame, the longest run of its deliveries that
  starts at the channel's oldest unacked one; the batch's other deliveries
  (an older one is still unfinished) are acked one by one, so no ack waits.
  Acks of one channel are sent in the order they were planned, so a
  ``multiple`` ack never covers a tag that is also acked alone. Messages of
  taskiq's own path are acked through the same tracker (`Amqp.stock_message`).
- A delivery was delivered before when AMQP's ``redelivered`` flag says so.
- ``AioPikaBroker(qos=N)`` caps the unacknowledged messages of one worker.

The broker and its subclasses (recognised by class name and module, so
batchtask imports without taskiq-aio-pika installed).
"""

import asyncio
import contextlib
import copy
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, cast

from taskiq import AckableMessage, AsyncBroker
from taskiq.acks import AckController

from batchtask.brokers._base import (
    DEFAULTS,
    NOTICE_CONNECT_WAIT,
    AckPairs,
    Answers,
    Arrivals,
    Coalescer,
    Delivery,
    LeaseServer,
    MemberGone,
    Options,
    PerMessage,
    RawAck,
    UnackedCap,
    ack_each,
    ready_within,
)
from batchtask.brokers._redis import BACKEND_NAMES, backend_leases

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel

logger = logging.getLogger("batchtask")


class Amqp(PerMessage):
    """taskiq-aio-pika's ``AioPikaBroker`` (see the module)."""

    family: ClassVar[str] = "amqp"
    private_names: ClassVar[tuple[str, ...]] = (
        "AioPikaBroker._qos: the prefetch count (checked at start)",
        "aio_pika.message.IncomingMessage.ack, .delivery_tag, .channel, "
        ".redelivered: a delivery's ack as taskiq-aio-pika hands it out",
        "AioPikaBroker._delay_queue, ._delayed_message_exchange_plugin: whether "
        "its kick honours a delay label",
        "AioPikaBroker._task_queues, .write_conn, .read_channel: the queue, and "
        "the connection and channel the fleet's inboxes and heartbeats use",
        "AioPikaBroker.url, ._conn_kwargs: where settings notices connect "
        "outside a started broker (python -m batchtask reconfigure)",
        *BACKEND_NAMES,
    )

    def __init__(self, broker: AsyncBroker, options: Options = DEFAULTS) -> None:
        """Track no delivery yet."""
        super().__init__(broker, options)
        self._channels: dict[int, _Channel] = {}
        self._routes: AmqpRoutes | None = None
        self.round_trips = 0
        """``basic.ack`` frames sent so far (for tests and benchmarks)."""

    def listen(self) -> AsyncIterator[Delivery]:
        """The broker's ``listen()``, with this member's inbox in the fleet."""
        main = aiter(self.broker.listen())
        return main if self._routes is None else self._routes.listen(main)

    def lease_server(self) -> LeaseServer | None:
        """Leases on the Redis of the broker's taskiq-redis result backend.

        None for any other backend: RabbitMQ keeps nothing a holder could
        fence (an exclusive consumer is let go when the server drops the
        connection, which the holder may learn of later).
        """
        if not self.options.fleet:
            return None
        return backend_leases(self.broker.result_backend)

    def route_server(self) -> "AmqpRoutes | None":
        """Members and inboxes on the broker's RabbitMQ (see `AmqpRoutes`).

        None with ``fleet=false``, or with more than one task queue (which
        one a message came from is the broker's routing, not the fleet's).
        """
        if self._routes is None and self.options.fleet and not self.changes():
            queues: Any = getattr(self.broker, "_task_queues", None)
            if isinstance(queues, list) and len(cast("list[object]", queues)) <= 1:
                self._routes = AmqpRoutes(self)
        return self._routes

    def notices(self) -> "AmqpNotices | None":
        """Settings notices on a fanout exchange of the queue (`AmqpNotices`)."""
        if not hasattr(self.broker, "url") or not hasattr(self.broker, "_task_queues"):
            return None
        return AmqpNotices(self.broker)

    def noted(self, data: Delivery) -> None:
        """Note one delivery, in order, if acks are grouped."""
        if self.options.group_acks and isinstance(data, AckableMessage):
            self.delivered(data.ack)

    def delivered(self, ack: RawAck | None) -> bool:
        """Note one delivery, by its ack; False if it is not aio-pika's."""
        target = _amqp_target(ack)
        if target is None:
            return False
        self._state(target[0]).note(target[1])
        return True

    def handed_back(self, ack: RawAck | None) -> None:
        """A delivery the worker never took, settled without the tracker.

        Given back to its queue: its tag no longer holds a gap.
        """
        target = _amqp_target(ack)
        if target is None:
            return
        self._state(target[0]).seen(target[1])

    def _state(self, channel: Any) -> "_Channel":
        """What the tracker knows of aiormq channel `channel`."""
        state = self._channels.get(id(channel))
        if state is None or state.channel is not channel:
            state = self._channels[id(channel)] = _Channel(channel)
        return state

    def redelivered(self, data: Delivery) -> bool | None:
        """AMQP's ``redelivered`` flag.

        Or a fleet inbox's copy of a delivery that had it (`AmqpRoutes.forward`).
        """
        if not isinstance(data, AckableMessage):
            return False
        message = getattr(data.ack, "__self__", None)
        if message is None or type(message).__module__ != "aio_pika.message":
            return False
        if getattr(message, "redelivered", False):
            return True
        headers: Any = getattr(message, "headers", None) or {}
        return REDELIVERED_HEADER in headers

    def stock_message(self, data: AckableMessage) -> AckableMessage:
        """A noted delivery, acked through the tracker on taskiq's path too.

        So that a batch's ``multiple=True`` ack never covers it unfinished.
        """
        target = _amqp_target(data.ack)
        state = None if target is None else self._channels.get(id(target[0]))
        if target is None or state is None or target[1] not in state.unacked:
            return data
        return AckableMessage.model_construct(data=data.data, ack=self.wrap(data.ack))

    def wrap(self, ack: RawAck) -> Callable[[], Awaitable[None]]:
        """One delivery's ack, sent through this tracker (for taskiq's own path)."""
        controller = AckController(ack)

        async def tracked_ack() -> None:
            (error,) = await self.ack_many([(controller, ack)])
            if error is not None:
                raise error

        return tracked_ack

    async def ack_many(self, acks: AckPairs) -> list[BaseException | None]:
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
            covered = state.leading(tags)
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

    def unacked_cap(self) -> UnackedCap | None:
        """``AioPikaBroker(qos=N)``."""
        qos = getattr(self.broker, "_qos", None)
        if not isinstance(qos, int) or isinstance(qos, bool):
            return None
        return UnackedCap(
            qos, f"AioPikaBroker(qos={qos})", "AioPikaBroker(..., qos={n})"
        )

    def delays(self) -> bool:
        """Whether ``kick`` delays a message by its ``delay`` label.

        With a delay queue or the delayed-message exchange it does; without
        either it refuses the label.
        """
        return getattr(self.broker, "_delay_queue", None) is not None or (
            getattr(self.broker, "_delayed_message_exchange_plugin", False) is True
        )

    def changes(self) -> list[str]:
        """What the checks need and did not find."""
        needed = (
            "_qos",
            "_delay_queue",
            "_delayed_message_exchange_plugin",
            "_task_queues",
            "write_conn",
            "read_channel",
        )
        return [
            f"AioPikaBroker.{name}" for name in needed if not hasattr(self.broker, name)
        ]


class _Channel:
    """One AMQP channel's deliveries not acked yet, by delivery tag.

    A channel numbers its deliveries 1, 2, 3... across its consumers (the
    queue and a fleet inbox); the worker may see them in another order.
    A ``multiple=True`` ack of tag ``t`` acks every unacked tag up to ``t``,
    so it is sent only where every tag up to ``t`` was noted (`seen_through`):
    a delivery numbered lower that has not reached the worker yet is never
    acked with it, unfinished (RabbitMQ would then refuse its own ack, as an
    unknown tag, and close the channel: its deliveries would come back).
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.unacked: dict[int, None] = {}
        """The tags not acked yet, lowest first: a ``multiple=True`` ack of a
        tag covers every lower one."""
        self.last = 0
        self.seen_through = 0
        """Every tag up to this one was noted (or settled without the worker)."""
        self._seen_after: set[int] = set()
        """Tags noted above a gap (a tag not noted yet)."""
        self.lock = asyncio.Lock()

    def note(self, tag: int) -> None:
        """Track `tag`, in tag order even if it is noted out of order.

        Deliveries of two consumers of one channel (the queue and a fleet
        inbox, or two task queues) reach the worker merged, not always in the
        order the channel numbered them.
        """
        self.unacked[tag] = None
        if tag < self.last:
            self.unacked = dict.fromkeys(sorted(self.unacked))
        else:
            self.last = tag
        self.seen(tag)

    def seen(self, tag: int) -> None:
        """`tag` reached the worker (noted, or handed back without it)."""
        if tag != self.seen_through + 1:
            if tag > self.seen_through:
                self._seen_after.add(tag)
                if len(self._seen_after) > GAP_GIVEN_UP_AFTER:
                    self._close_gap()
            return
        self.seen_through = tag
        after = self._seen_after
        while self.seen_through + 1 in after:
            self.seen_through += 1
            after.discard(self.seen_through)

    def _close_gap(self) -> None:
        """Take long-missing tags as settled where the tracker did not see them.

        A consumer's buffer is handed back as its iterator closes: tags
        missing while `GAP_GIVEN_UP_AFTER` later ones were noted are taken as
        seen, lowest first, until half as many wait above a gap.
        """
        while len(self._seen_after) > GAP_GIVEN_UP_AFTER // 2:
            self.seen(self.seen_through + 1)

    def leading(self, tags: set[int]) -> list[int]:
        """The unacked tags one ``multiple=True`` ack of the last may cover.

        Lowest first: all in `tags`, none past `seen_through`.
        """
        covered: list[int] = []
        for tag in self.unacked:
            if tag not in tags or tag > self.seen_through:
                break
            covered.append(tag)
        return covered


GAP_GIVEN_UP_AFTER = 65_536
"""Tags noted past a missing one before the tracker takes it as settled."""


def _amqp_target(ack: RawAck | None) -> tuple[Any, int] | None:
    """(aiormq channel, delivery tag) of an aio-pika message's ``ack``, or None."""
    message = getattr(ack, "__self__", None)
    if message is None or type(message).__module__ != "aio_pika.message":
        return None
    if getattr(ack, "__name__", None) != "ack":
        return None
    tag = getattr(message, "delivery_tag", None)
    try:
        channel = message.channel
    except Exception:  # aio-pika raises once the channel closed: acked alone
        return None
    if not isinstance(tag, int) or channel is None:
        return None
    return channel, tag


# -- batches that fill across the fleet ---------------------------------------

INBOX_PREFIX = "batchtask.inbox."
"""A member's inbox: ``batchtask.inbox.<queue>.<member>``."""
BEATS_PREFIX = "batchtask.fleet."
"""The fanout exchange a queue's members beat on: ``batchtask.fleet.<queue>``."""
INBOX_MESSAGE_TTL_MS = 20_000
"""Milliseconds a message waits in an inbox unread before RabbitMQ dead-letters
it back to the queue (``x-message-ttl``): what no member reclaims comes back."""
INBOX_EXPIRES_MS = 60_000
"""Milliseconds an inbox nobody reads lives on (``x-expires``): longer than a
member's heartbeat and `INBOX_MESSAGE_TTL_MS` together, so it expires empty."""
REDELIVERED_HEADER = "x-batchtask-redelivered"
"""On an inbox's copy of a delivery RabbitMQ had delivered before."""
FORGET_AFTER = 3
"""Heartbeat lifetimes after which an expired member is no longer reclaimed."""
BEAT_TIMEOUT = 1.0
"""Seconds a reclaim or a leave may wait for one message."""
MOVE_BACK_FOR = 0.5
"""Seconds one reclaim or leave moves messages before it returns (the fleet's
router waits a second for it)."""


class AmqpRoutes:
    """Members of the fleet and their inboxes, on the broker's RabbitMQ.

    - **Members** beat on a fanout exchange of the queue
      (``batchtask.fleet.<queue>``), each into an exclusive queue of its own
      bound to it: every member hears every heartbeat, and counts a member
      live while its last one is younger than the lifetime it announced, by
      its own monotonic clock (no clock is compared across machines). A
      member that leaves says so on the same exchange.
    - **An inbox** is a durable queue per member,
      ``batchtask.inbox.<queue>.<member>``, read on the broker's read channel
      beside the queue (its acks go through the same ``multiple=True``
      tracker). It dead-letters what waits in it unread for
      `INBOX_MESSAGE_TTL_MS` back to the queue, and expires
      `INBOX_EXPIRES_MS` after nobody reads it: a dead member's inbox
      empties into the queue even if no member saw it die.
    - **Moving** a delivery publishes it to the owner's inbox with
      ``mandatory`` on a channel with publisher confirms, then acks it on the
      queue: once RabbitMQ confirmed it, it is in the inbox; if the inbox is
      gone the message comes back (`MemberGone`) and stays here unacked. A
      crash between the confirm and the ack leaves a copy in both: at least
      once (the redelivered copy is checked against the result backend).
    - **Reclaiming** a dead member's inbox moves its ready messages to the
      queue the same way, one ``basic.get`` and confirmed publish each.
    """

    def __init__(self, adapter: "Amqp") -> None:
        """Route `adapter`'s broker's queue (its only task queue)."""
        self.adapter = adapter
        self.broker: Any = adapter.broker
        self._heard: dict[str, tuple[float, float]] = {}
        """Each member heard: (monotonic time of its last beat, its lifetime)."""
        self._channel: AbstractChannel | None = None
        self._beats_ready = False
        self._arrivals = Arrivals(self._read_inbox, self._of_inbox, self._give_back)
        self._acks: Coalescer[AckableMessage] = Coalescer(self._ack_moved)

    @property
    def queue(self) -> str:
        """The broker's queue."""
        return _queue_of(self.broker)

    def inbox(self, member: str) -> str:
        """The name of `member`'s inbox."""
        return f"{INBOX_PREFIX}{self.queue}.{member}"

    @property
    def exchange(self) -> str:
        """The fanout exchange members beat on."""
        return f"{BEATS_PREFIX}{self.queue}"

    # -- membership -------------------------------------------------------
    async def beat(self, member: str, ttl_ms: int) -> tuple[list[str], list[str]]:
        """Announce `member` for `ttl_ms`; the live members and the expired ones."""
        from aio_pika import Message

        channel = await self._publisher()
        if not self._beats_ready:
            await self._listen_beats(channel, member)
            self._beats_ready = True
        body = json.dumps({"member": member, "ttl": ttl_ms}).encode()
        exchange = await channel.get_exchange(self.exchange, ensure=False)
        await exchange.publish(Message(body), routing_key="")
        now = time.monotonic()
        self._heard[member] = (now, ttl_ms / 1000)
        live: list[str] = []
        expired: list[str] = []
        for name, (at, ttl) in list(self._heard.items()):
            if now - at < ttl:
                live.append(name)
            elif now - at < FORGET_AFTER * ttl:
                expired.append(name)
            else:
                del self._heard[name]
        return sorted(live), expired

    async def _listen_beats(self, channel: "AbstractChannel", member: str) -> None:
        from aio_pika import ExchangeType

        exchange = await channel.declare_exchange(
            self.exchange, ExchangeType.FANOUT, durable=False, auto_delete=True
        )
        beats = await channel.declare_queue(
            f"{BEATS_PREFIX}{self.queue}.{member}", exclusive=True, auto_delete=True
        )
        await beats.bind(exchange)
        await beats.consume(self._heard_beat, no_ack=True)

    async def _heard_beat(self, message: Any) -> None:
        try:
            beat = json.loads(message.body)
            member = str(beat["member"])
            if beat.get("left"):
                self._heard.pop(member, None)
            else:
                self._heard[member] = (time.monotonic(), int(beat["ttl"]) / 1000)
        except Exception:  # not one of ours: ignored
            logger.debug("batchtask: an unreadable heartbeat was ignored")

    async def _publisher(self) -> "AbstractChannel":
        """The channel heartbeats and moves are published on (confirms on)."""
        channel = self._channel
        if channel is None or channel.is_closed:
            connection = self.broker.write_conn
            if connection is None:
                raise RuntimeError("the broker has not started")
            channel = self._channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._beats_ready = False
        return channel

    # -- moving -----------------------------------------------------------
    def forwardable(self, data: Delivery) -> bool:
        """A delivery of the queue, not of an inbox.

        Redelivered ones move too (marked, so their owner checks them against
        the result backend): a member that dies between a move's confirm and
        its ack leaves a second copy in the queue, which then goes where the
        first one went, and is recognised there, not run beside it.
        """
        if self._arrivals.member is None or not isinstance(data, AckableMessage):
            return False
        message = getattr(data.ack, "__self__", None)
        if message is None or type(message).__module__ != "aio_pika.message":
            return False
        return not self._from_inbox(message)

    @staticmethod
    def _from_inbox(message: Any) -> bool:
        """Whether aio-pika delivery `message` came from an inbox."""
        return str(getattr(message, "routing_key", "")).startswith(INBOX_PREFIX)

    async def forward(self, member: str, data: Delivery) -> None:
        """Publish `data` to `member`'s inbox (confirmed), then ack it here."""
        from aiormq.exceptions import PublishError

        assert isinstance(data, AckableMessage)
        channel = await self._publisher()
        try:
            await _publish_copy(
                channel, getattr(data.ack, "__self__", None), self.inbox(member)
            )
        except PublishError as exc:  # returned: no such inbox
            raise MemberGone(member) from exc
        try:
            await self._acks.submit(data)
        except Exception:  # it moved; its redelivered copy is checked
            logger.debug("batchtask: acking a moved delivery failed", exc_info=True)

    async def _ack_moved(
        self, moved: list[AckableMessage]
    ) -> list[BaseException | None]:
        return await self.adapter.ack_many(
            [(AckController(data.ack), data.ack) for data in moved]
        )

    # -- an inbox's way back ----------------------------------------------
    async def reclaim(self, member: str, count: int) -> int:
        """Move up to `count` of dead `member`'s inbox messages to the queue."""
        heard = self._heard.get(member)
        if heard is not None and time.monotonic() - heard[0] < heard[1]:
            return -1
        return await self._move_back(member, count)

    async def leave(self, member: str, count: int) -> int:
        """`member` leaving: say so, then move up to `count` of its inbox back."""
        from aio_pika import Message

        await self._arrivals.stopped()
        self._heard.pop(member, None)
        channel = await self._publisher()
        exchange = await channel.get_exchange(self.exchange, ensure=False)
        body = json.dumps({"member": member, "left": True}).encode()
        await exchange.publish(Message(body), routing_key="")
        return await self._move_back(member, count)

    async def _move_back(self, member: str, count: int) -> int:
        """Move up to `count` of `member`'s inbox to the queue, for a while.

        Each message moves whole (its confirmed publish, then its ack) even
        if the caller stops waiting: a move cut between the two would leave a
        copy in both. After `MOVE_BACK_FOR` seconds it stops between two
        messages; the next beat goes on.
        """
        from aio_pika.exceptions import ChannelNotFoundEntity

        connection = self.broker.write_conn
        if connection is None:
            return 0
        moved = 0
        channel = await connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        moving: asyncio.Future[None] | None = None
        until = time.monotonic() + MOVE_BACK_FOR
        try:
            inbox = await channel.get_queue(self.inbox(member), ensure=False)
            while moved < count and time.monotonic() < until:
                message = await asyncio.wait_for(
                    inbox.get(no_ack=False, fail=False), BEAT_TIMEOUT
                )
                if message is None:
                    break
                moving = asyncio.ensure_future(self._requeue(channel, message))
                await asyncio.shield(moving)
                moved += 1
        except ChannelNotFoundEntity:  # no such inbox (any more)
            pass
        finally:
            if moving is not None and not moving.done():
                # Bounded: a channel that stalls must not hold a shutdown.
                await asyncio.wait({moving}, timeout=BEAT_TIMEOUT)
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()
        return moved

    async def _requeue(self, channel: "AbstractChannel", message: Any) -> None:
        """Publish inbox `message` to the queue (confirmed), then ack it."""
        await _publish_copy(channel, message, self.queue)
        await message.ack()

    # -- reading ----------------------------------------------------------
    def serve(self, member: str | None) -> None:
        """Read `member`'s inbox beside the queue (None: stop reading it)."""
        self._arrivals.serve(member)

    async def _read_inbox(self, member: str, reading_works: Callable[[], None]) -> None:
        """Read `member`'s inbox on the broker's read channel until it fails."""
        channel = self.broker.read_channel
        if channel is None:
            raise RuntimeError("the broker has not started")
        inbox = await channel.declare_queue(
            self.inbox(member),
            durable=True,
            arguments={
                "x-message-ttl": INBOX_MESSAGE_TTL_MS,
                "x-expires": INBOX_EXPIRES_MS,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.queue,
            },
        )
        async with inbox.iterator() as messages:
            reading_works()
            async for message in messages:
                self._arrivals.put(AckableMessage(data=message.body, ack=message.ack))

    def _of_inbox(self, data: Delivery) -> bool:
        """Whether `data` was read from an inbox."""
        message = getattr(getattr(data, "ack", None), "__self__", None)
        return message is not None and self._from_inbox(message)

    async def _give_back(self, data: Delivery) -> None:
        """An inbox's delivery nobody took, back to the inbox.

        The tracker counts its tag as seen: a later ``multiple=True`` ack
        may cover it (it is not unacked any more).
        """
        ack = getattr(data, "ack", None)
        message: Any = getattr(ack, "__self__", None)
        self.adapter.handed_back(ack)
        await message.nack(requeue=True)

    def listen(self, main: AsyncIterator[Delivery]) -> AsyncIterator[Delivery]:
        """The queue's deliveries (`main`) and the inbox's, as they come."""
        return self._arrivals.listen(main)


def _queue_of(broker: Any) -> str:
    """The name of `broker`'s (first) task queue."""
    queues: Any = getattr(broker, "_task_queues", None)
    if not queues:
        return "taskiq"
    first: Any = queues[0]
    return str(first.routing_key or first.name)


NOTICES_PREFIX = "batchtask.notices."
"""The fanout exchange of a queue's settings notices: ``batchtask.notices.<queue>``."""


class AmqpNotices:
    """Settings changes for every worker of a queue, on a fanout exchange.

    Each follower binds an exclusive queue of its own to the queue's notice
    exchange and answers each notice on the queue its ``reply_to`` names; a
    publisher counts the answers heard within `NOTICE_ANSWERS_FOR` seconds
    (RabbitMQ does not say how many queues a fanout message reached). A
    started broker's connection is used; outside one (the command line) a
    connection of its own, closed after.
    """

    def __init__(self, broker: Any) -> None:
        """Notices of `broker`'s queue."""
        self.broker = broker

    @property
    def exchange(self) -> str:
        """The notice exchange's name."""
        return f"{NOTICES_PREFIX}{_queue_of(self.broker)}"

    @asynccontextmanager
    async def _channel(self, wait: float) -> AsyncGenerator["AbstractChannel", None]:
        """A channel on the broker's connection (waited for up to `wait` s)."""
        from aio_pika import connect

        await ready_within(lambda: self.broker.write_conn is not None, wait)
        connection: Any = self.broker.write_conn
        own: Any = None
        if connection is None:
            options: dict[str, Any] = self.broker._conn_kwargs or {}
            own = connection = await connect(self.broker.url, **options)
        try:
            channel: AbstractChannel = await connection.channel()
            try:
                yield channel
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        finally:
            if own is not None:
                await own.close()

    async def _declare(self, channel: "AbstractChannel") -> Any:
        from aio_pika import ExchangeType

        return await channel.declare_exchange(
            self.exchange, ExchangeType.FANOUT, durable=False, auto_delete=True
        )

    async def publish(self, data: bytes) -> int:
        """Publish `data` to every follower; how many answered in time."""
        from aio_pika import Message

        answers = Answers()
        async with self._channel(0) as channel:
            exchange = await self._declare(channel)
            replies = await channel.declare_queue(exclusive=True, auto_delete=True)
            await replies.consume(answers.note, no_ack=True)
            await exchange.publish(Message(data, reply_to=replies.name), routing_key="")
            return await answers.counted()

    async def subscribe(self) -> AsyncIterator[bytes]:
        """Each notice's body as it comes, answered first."""
        from aio_pika import Message

        async with self._channel(NOTICE_CONNECT_WAIT) as channel:
            exchange = await self._declare(channel)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange)
            async with queue.iterator(no_ack=True) as notices:
                async for notice in notices:
                    if notice.reply_to:
                        await channel.default_exchange.publish(
                            Message(b"1"), routing_key=notice.reply_to
                        )
                    yield notice.body


async def _publish_copy(channel: "AbstractChannel", message: Any, queue: str) -> None:
    """Publish aio-pika delivery `message` to `queue`, confirmed, ``mandatory``.

    With its body, headers and properties, persistent. A copy of a delivery
    RabbitMQ had delivered before says so (`REDELIVERED_HEADER`): where it
    is taken, it is checked against the result backend before it runs.
    Straight on aiormq's channel, with the delivery's own properties: an
    aio-pika ``Message`` built per copy cost more than the publish.

    :raises aiormq.exceptions.PublishError: if no queue `queue` took it.
    :raises RuntimeError: if RabbitMQ refused it.
    """
    from pamqp.commands import Basic

    properties = message.properties
    headers = dict(properties.headers or {})
    if message.redelivered:
        headers[REDELIVERED_HEADER] = 1
    properties.headers = headers
    properties.delivery_mode = 2  # persistent
    underlay = await channel.get_underlay_channel()
    confirmed = await underlay.basic_publish(
        message.body,
        exchange="",
        routing_key=queue,
        properties=properties,
        mandatory=True,
    )
    if not isinstance(confirmed, Basic.Ack):
        raise RuntimeError(f"RabbitMQ did not confirm a moved message: {confirmed!r}")
