"""taskiq-nats: ``PullBasedJetStreamBroker`` and ``PushBasedJetStreamBroker``.

- Acks: a batch's acks are sent one after another in one task: each only
  adds a frame to the client's outgoing buffer, which is flushed once after
  them (one write, no round trip each).
- A delivery was delivered before when JetStream's delivery count
  (``metadata.num_delivered``) is above 1.
- The consumer's ``ack_wait`` (default `DEFAULT_ACK_WAIT`) hands a message
  left unacknowledged that long to another consumer.

The brokers and their subclasses (recognised by class name and module, so
batchtask imports without taskiq-nats installed).
"""

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

from taskiq import AckableMessage, AsyncBroker

from batchtask.brokers._base import (
    DEFAULTS,
    NOTICE_CONNECT_WAIT,
    AckPairs,
    Answers,
    Arrivals,
    Delivery,
    LeaseServer,
    MemberGone,
    Options,
    PerMessage,
    cancelling,
    ready_within,
)
from batchtask.brokers._redis import BACKEND_NAMES, backend_leases

logger = logging.getLogger("batchtask")

DEFAULT_ACK_WAIT = 30.0
"""Seconds: a NATS JetStream consumer's ``ack_wait`` when none is configured."""


class JetStream(PerMessage):
    """taskiq-nats's JetStream brokers (see the module)."""

    family: ClassVar[str] = "nats"
    private_names: ClassVar[tuple[str, ...]] = (
        "nats.aio.msg.Msg.ack, .metadata.num_delivered: a delivery's ack as "
        "taskiq-nats hands it out",
        "PullBasedJetStreamBroker.js, .subject, .stream_config, .consumer_config: "
        "the stream the fleet's heartbeats and inboxes sit beside",
        ".client, .servers, .connection_kwargs: where settings notices are "
        "sent (a connection of their own outside a started broker)",
        *BACKEND_NAMES,
    )

    def __init__(self, broker: AsyncBroker, options: Options = DEFAULTS) -> None:
        """No routes yet."""
        super().__init__(broker, options)
        self._routes: JetStreamRoutes | None = None

    def listen(self) -> AsyncIterator[Delivery]:
        """The broker's ``listen()``, with this member's inbox in the fleet.

        A fetch that times out as asyncio's ``TimeoutError`` rather than
        nats-py's (nats-py raises it when a fetch's deadline runs out between
        its two requests; taskiq-nats catches only nats-py's) starts the
        broker's ``listen()`` again, quietly: it is an empty fetch, not a
        fault.
        """
        main = _fetching(self.broker)
        return main if self._routes is None else self._routes.listen(main)

    def route_server(self) -> "JetStreamRoutes | None":
        """Members and inboxes on the broker's JetStream (`JetStreamRoutes`).

        Pull-based brokers only (a push consumer's deliveries are the server's
        to spread); None with ``fleet=false``.
        """
        if (
            self._routes is None
            and self.options.fleet
            and type(self.broker).__name__ == "PullBasedJetStreamBroker"
            and not self.changes()
        ):
            self._routes = JetStreamRoutes(self)
        return self._routes

    def notices(self) -> "NatsNotices | None":
        """Settings notices on a NATS subject of the stream (`NatsNotices`)."""
        needed = ("client", "servers", "connection_kwargs")
        if not all(hasattr(self.broker, name) for name in needed):
            return None
        name = _stream_of(self.broker)
        return None if not name else NatsNotices(self.broker, name)

    def lease_server(self) -> LeaseServer | None:
        """Leases on the Redis of the broker's taskiq-redis result backend.

        None for any other backend: the limits hold per process.
        """
        if not self.options.fleet:
            return None
        return backend_leases(self.broker.result_backend)

    def changes(self) -> list[str]:
        """What fleet mode needs from the broker and did not find."""
        # ``js`` is set at startup, after the receiver is made: used, not checked.
        needed = ("subject", "stream_config", "consumer_config", "stream_name")
        return [
            f"{type(self.broker).__name__}.{name}"
            for name in needed
            if not hasattr(self.broker, name)
        ]

    def redelivered(self, data: Delivery) -> bool | None:
        """JetStream's delivery count above 1, or a moved copy of such a one."""
        if not isinstance(data, AckableMessage):
            return False
        message = getattr(data.ack, "__self__", None)
        if message is None or not type(message).__module__.startswith("nats."):
            return False
        if MOVED_HEADER in (getattr(message, "headers", None) or {}):
            return True
        try:
            return int(message.metadata.num_delivered) > 1
        except Exception:
            return False

    async def ack_many(self, acks: AckPairs) -> list[BaseException | None]:
        """Ack the messages not acked yet, in order; return each one's error."""
        if not self.options.group_acks:
            return await super().ack_many(acks)
        errors: list[BaseException | None] = [None] * len(acks)
        for index, (controller, _) in enumerate(acks):
            try:
                await controller.ack()
            except Exception as exc:
                errors[index] = exc
        return errors

    def redelivery_window(self) -> tuple[float, str] | None:
        """The consumer's ``ack_wait``."""
        config = getattr(self.broker, "consumer_config", None)
        ack_wait = getattr(config, "ack_wait", None) or DEFAULT_ACK_WAIT
        if isinstance(ack_wait, (int, float)):
            return float(ack_wait), f"the NATS consumer's ack_wait={ack_wait:g}"
        return None


# -- batches that fill across the fleet ---------------------------------------

BEATS_PREFIX = "batchtask.fleet"
"""A member beats on ``batchtask.fleet.<stream>.<token>`` (stream
``batchtask_fleet_<stream>``, one message per subject)."""
INBOX_PREFIX = "batchtask.inbox"
"""A member's inbox: ``batchtask.inbox.<stream>.<token>`` (stream
``batchtask_inbox_<stream>``, a work queue), read by consumer ``inbox_<token>``."""
MOVED_HEADER = "Batchtask-Redelivered"
"""On a moved copy of a delivery JetStream had delivered before."""
MOVE_BACK_FOR = 0.5
"""Seconds one reclaim or leave moves messages before it returns."""
FETCH_TIMEOUT = 2.0
"""Seconds an inbox's reader waits for messages per fetch: an idle member's
inbox costs one pull request per that long. A reader stopped mid-fetch
leaves its pull request on the server for at most that long; a message
moved to the inbox meanwhile is redelivered after the consumer's
``ack_wait`` (late, not lost)."""


async def _fetching(broker: Any) -> AsyncIterator[Delivery]:
    """`broker`'s ``listen()``, again after an empty fetch (see `JetStream.listen`)."""
    while True:
        try:
            async for data in broker.listen():
                yield data
            return
        except TimeoutError:
            if cancelling():
                raise  # nats-py's answer to a cancelled fetch
            logger.debug("batchtask: an empty fetch timed out; fetching again")


def _consumer(member: str) -> str:
    """The durable consumer that reads `member`'s inbox."""
    return f"inbox_{_token(member)}"


def _stream_of(broker: Any) -> str | None:
    """The name of a taskiq-nats JetStream broker's stream, if it has one."""
    config = getattr(broker, "stream_config", None)
    name = getattr(config, "name", None) or getattr(broker, "stream_name", None)
    return None if name is None else str(name)


def _token(member: str) -> str:
    """`member` as one subject token and a consumer name (no dots, no spaces)."""
    return hashlib.blake2b(member.encode(), digest_size=8).hexdigest()


class JetStreamRoutes:
    """Members of the fleet and their inboxes, on the broker's NATS JetStream.

    - **Members** beat on a stream of their own
      (``batchtask_fleet_<stream>``, one message kept per subject, a subject
      per member). Every member follows it with an ordered consumer that
      starts at each subject's last message: it knows every member that ever
      beat and was not removed, with the time of its last beat by the
      server's clock. A member is live while the newest beat heard (its own,
      every second) is less than the lifetime it announced after its last:
      no clock is compared across machines.
    - **An inbox** is a subject per member in a work-queue stream
      (``batchtask_inbox_<stream>``), read by a durable pull consumer
      beside the queue's. A message is deleted once acked.
    - **A move** publishes the delivery's data and headers to the owner's
      inbox subject, waits for JetStream's acknowledgement of the publish,
      then acks the delivery. A process that dies between the two leaves a
      copy in both: the redelivered one moves too, marked, and is
      recognised by the owner (against the result backend).
    - **A dead member's inbox** (its heartbeat older than its lifetime) is
      read through its own consumer by the others, each message published
      to the queue's subject and then acked; once it is empty, the member's
      consumer and heartbeat are removed.
    """

    def __init__(self, adapter: "JetStream") -> None:
        """Route `adapter`'s broker's stream."""
        self.adapter = adapter
        self.broker: Any = adapter.broker
        self._heard: dict[str, tuple[float, float]] = {}
        """Each member: (server time of its last beat, its lifetime), seconds."""
        self._now = 0.0
        """The newest beat's server time: the server's clock, as last heard."""
        self._ready = False
        self._following: Any = None
        self._arrivals = Arrivals(self._read_inbox, self._of_inbox, self._give_back)

    @property
    def stream(self) -> str:
        """The broker's stream."""
        return str(_stream_of(self.broker))

    def _names(self) -> tuple[str, str]:
        """The fleet's two streams: heartbeats and inboxes."""
        return f"batchtask_fleet_{self.stream}", f"batchtask_inbox_{self.stream}"

    def _beat_subject(self, member: str) -> str:
        return f"{BEATS_PREFIX}.{self.stream}.{_token(member)}"

    def inbox(self, member: str) -> str:
        """The subject of `member`'s inbox."""
        return f"{INBOX_PREFIX}.{self.stream}.{_token(member)}"

    async def _prepare(self) -> None:
        """Make the two streams and follow the heartbeats (once)."""
        if self._ready:
            return
        from nats.js.api import (
            ConsumerConfig,
            DeliverPolicy,
            RetentionPolicy,
            StorageType,
            StreamConfig,
        )
        from nats.js.errors import BadRequestError

        beats, inboxes = self._names()
        for config in (
            StreamConfig(
                name=beats,
                subjects=[f"{BEATS_PREFIX}.{self.stream}.*"],
                max_msgs_per_subject=1,
                storage=StorageType.FILE,
            ),
            StreamConfig(
                name=inboxes,
                subjects=[f"{INBOX_PREFIX}.{self.stream}.*"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            ),
        ):
            try:
                await self.broker.js.add_stream(config=config)
            except BadRequestError as exc:  # made by another member already
                if exc.err_code != 10058:
                    raise
        self._following = await self.broker.js.subscribe(
            f"{BEATS_PREFIX}.{self.stream}.*",
            cb=self._heard_beat,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT),
        )
        self._ready = True

    async def _heard_beat(self, message: Any) -> None:
        try:
            beat = json.loads(message.data)
            member = str(beat["member"])
            at = message.metadata.timestamp.timestamp()
        except Exception:  # not one of ours: ignored
            logger.debug("batchtask: an unreadable heartbeat was ignored")
            return
        self._now = max(self._now, at)
        if beat.get("left"):
            self._heard.pop(member, None)
        else:
            self._heard[member] = (at, int(beat["ttl"]) / 1000)

    async def beat(self, member: str, ttl_ms: int) -> tuple[list[str], list[str]]:
        """Announce `member` for `ttl_ms`; the live members and the expired ones."""
        await self._prepare()
        body = json.dumps({"member": member, "ttl": ttl_ms}).encode()
        await self.broker.js.publish(self._beat_subject(member), body)
        self._heard.setdefault(member, (self._now, ttl_ms / 1000))
        live: list[str] = []
        expired: list[str] = []
        for name, (at, ttl) in self._heard.items():
            (live if self._now - at < ttl or name == member else expired).append(name)
        return sorted(live), expired

    # -- moving -----------------------------------------------------------
    def forwardable(self, data: Delivery) -> bool:
        """A delivery of the queue (its own subject), not of an inbox."""
        if self._arrivals.member is None or not isinstance(data, AckableMessage):
            return False
        message: Any = getattr(data.ack, "__self__", None)
        if message is None or not type(message).__module__.startswith("nats."):
            return False
        return not str(getattr(message, "subject", "")).startswith(INBOX_PREFIX)

    async def forward(self, member: str, data: Delivery) -> None:
        """Publish `data` to `member`'s inbox (acknowledged), then ack it here.

        :raises MemberGone: if `member` is no live member as last heard.
        """
        heard = self._heard.get(member)
        if heard is None or self._now - heard[0] >= heard[1]:
            raise MemberGone(member)
        assert isinstance(data, AckableMessage)
        message: Any = getattr(data.ack, "__self__", None)
        await self.broker.js.publish(
            self.inbox(member), message.data, headers=_headers_of(message)
        )
        try:
            await message.ack()
        except Exception:  # it moved; its redelivered copy is recognised
            logger.debug("batchtask: acking a moved delivery failed", exc_info=True)

    # -- an inbox's way back ----------------------------------------------
    async def reclaim(self, member: str, count: int) -> int:
        """Move up to `count` of dead `member`'s inbox messages to the queue."""
        heard = self._heard.get(member)
        if heard is not None and self._now - heard[0] < heard[1]:
            return -1
        return await self._move_back(member, count, own=False)

    async def leave(self, member: str, count: int) -> int:
        """`member` leaving: move up to `count` of its inbox back to the queue."""
        await self._arrivals.stopped()
        return await self._move_back(member, count, own=True)

    async def _move_back(self, member: str, count: int, *, own: bool) -> int:
        """Move `member`'s inbox to the queue for a while.

        Once it is empty, the member is removed: its consumer and heartbeat.
        """
        from nats.js.errors import NotFoundError

        js = self.broker.js
        beats, inboxes = self._names()
        name = _consumer(member)
        moved = 0
        until = time.monotonic() + MOVE_BACK_FOR
        try:
            reader = await js.pull_subscribe(
                self.inbox(member), durable=name, stream=inboxes
            )
        except NotFoundError:
            return 0
        try:
            empty = False
            while moved < count and time.monotonic() < until:
                try:
                    messages = await reader.fetch(
                        batch=min(100, count - moved), timeout=0.2
                    )
                except TimeoutError:  # nats-py's and asyncio's: empty
                    if cancelling():
                        raise
                    empty = True
                    break
                for message in messages:
                    await asyncio.shield(self._requeue(message))
                    moved += 1
            if empty:
                info = await js.consumer_info(inboxes, name)
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    if own:
                        body = json.dumps({"member": member, "left": True})
                        await js.publish(self._beat_subject(member), body.encode())
                    await js.delete_consumer(inboxes, name)
                    await js.purge_stream(beats, subject=self._beat_subject(member))
                    self._heard.pop(member, None)
        finally:
            with contextlib.suppress(Exception):
                await reader.unsubscribe()
        return moved

    async def _requeue(self, message: Any) -> None:
        """Publish inbox `message` to the queue's subject, then ack it."""
        await self.broker.js.publish(
            self.broker.subject, message.data, headers=_headers_of(message)
        )
        await message.ack()

    # -- reading ----------------------------------------------------------
    def serve(self, member: str | None) -> None:
        """Read `member`'s inbox beside the queue (None: stop reading it)."""
        self._arrivals.serve(member)

    async def _read_inbox(self, member: str, reading_works: Callable[[], None]) -> None:
        """Fetch `member`'s inbox onto the arrivals until it fails."""
        from nats.js.api import ConsumerConfig

        await self._prepare()
        main: Any = self.broker.consumer_config
        reader = await self.broker.js.pull_subscribe(
            self.inbox(member),
            durable=_consumer(member),
            stream=self._names()[1],
            config=ConsumerConfig(
                durable_name=_consumer(member),
                ack_wait=getattr(main, "ack_wait", None),
                max_ack_pending=getattr(main, "max_ack_pending", None),
            ),
        )
        reading_works()
        while True:
            try:
                messages = await reader.fetch(batch=100, timeout=FETCH_TIMEOUT)
            except TimeoutError:  # nats-py's and asyncio's: empty
                if cancelling():
                    raise
                continue
            for message in messages:
                self._arrivals.put(AckableMessage(data=message.data, ack=message.ack))

    @staticmethod
    def _of_inbox(data: Delivery) -> bool:
        """Whether `data` was read from an inbox."""
        message = getattr(getattr(data, "ack", None), "__self__", None)
        return str(getattr(message, "subject", "")).startswith(INBOX_PREFIX)

    @staticmethod
    async def _give_back(data: Delivery) -> None:
        """An inbox's delivery nobody took, back to the inbox (``nak``)."""
        message: Any = getattr(getattr(data, "ack", None), "__self__", None)
        await message.nak()

    def listen(self, main: AsyncIterator[Delivery]) -> AsyncIterator[Delivery]:
        """The queue's deliveries (`main`) and the inbox's, as they come."""
        return self._arrivals.listen(main)


def _headers_of(message: Any) -> dict[str, str]:
    """`message`'s headers, marked if JetStream had delivered it before."""
    headers = dict(message.headers or {})
    try:
        if int(message.metadata.num_delivered) > 1:
            headers[MOVED_HEADER] = "1"
    except Exception:  # no metadata: a plain message
        pass
    return headers


NOTICES_PREFIX = "batchtask.notices"
"""The subject of a stream's settings notices: ``batchtask.notices.<stream>``."""


class NatsNotices:
    """Settings changes for every worker of a stream, on a core NATS subject.

    Each follower subscribes to the stream's notice subject and answers each
    notice on its reply subject; a publisher counts the answers heard within
    `NOTICE_ANSWERS_FOR` seconds. A started broker's connection is used;
    outside one (the command line) a connection of its own, closed after.
    """

    def __init__(self, broker: Any, stream: str) -> None:
        """Notices of `broker`'s `stream`."""
        self.broker = broker
        self.subject = f"{NOTICES_PREFIX}.{stream}"

    @asynccontextmanager
    async def _client(self, wait: float) -> AsyncGenerator[Any, None]:
        """The broker's client once connected (waited for up to `wait` s)."""
        from nats.aio.client import Client

        client = self.broker.client
        if await ready_within(lambda: client.is_connected, wait):
            yield client
            return
        own = Client()
        await own.connect(self.broker.servers, **self.broker.connection_kwargs)
        try:
            yield own
        finally:
            await own.close()

    async def publish(self, data: bytes) -> int:
        """Publish `data` to every follower; how many answered in time."""
        answers = Answers()
        async with self._client(0) as client:
            inbox = client.new_inbox()
            replies = await client.subscribe(inbox, cb=answers.note)
            try:
                await client.publish(self.subject, data, reply=inbox)
                await client.flush()
                return await answers.counted()
            finally:
                await replies.unsubscribe()

    async def subscribe(self) -> AsyncIterator[bytes]:
        """Each notice's data as it comes, answered first."""
        async with self._client(NOTICE_CONNECT_WAIT) as client:
            notices = await client.subscribe(self.subject)
            try:
                async for notice in notices.messages:
                    if notice.reply:
                        await client.publish(notice.reply, b"1")
                    yield notice.data
            finally:
                with contextlib.suppress(Exception):
                    await notices.unsubscribe()
