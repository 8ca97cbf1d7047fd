"""What the three Redis stream families share: reading, claiming, acks, writes, kicks.

taskiq-redis's ``RedisStreamBroker``, ``RedisStreamClusterBroker`` and
``RedisStreamSentinelBroker`` keep messages the same way (an entry with a
``data`` field in a stream read by a consumer group, acked with ``XACK``) and
differ in how a client reaches the server. `StreamFamily` does the work once;
each family module says how it connects (`StreamFamily.client`).

Reading (`StreamFamily.listen`, what a `batchtask.BatchReceiver` reads): one
``XREADGROUP`` per read, with taskiq-redis's stream, group and consumer
names, so stock workers and batchtask's share one stream. Entries left
unacknowledged for the idle time (the broker's ``idle_timeout``) are claimed
with ``XAUTOCLAIM`` on a timer (`CLAIM_EVERY`), whether or not new entries
arrive: a dead worker's entries come back on a quiet stream too.
taskiq-redis's own ``listen()`` claims only after a read that returned new
entries, with a lock round trip each time, and the Cluster and Sentinel
brokers never claim. An entry read here knows whether it was claimed, so no
``XPENDING`` is needed to tell a redelivery. An entry without a ``data``
field (written by another tool, or a bug) is logged and acknowledged; it
never ends the reader.

Leases (`StreamLeases`, for call limits across the fleet: `batchtask._fleet`)
live on the same server: one sorted set per name, of holders scored by when
their lease expires by the server's clock (``TIME`` in a script), and a
counter beside it for fencing tokens; both keys share a hash tag, so a
Redis Cluster keeps them on one node.
"""

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, cast

from taskiq import AckableMessage, AsyncBroker, BrokerMessage

from batchtask.brokers._base import (
    DEFAULTS,
    AckPairs,
    Coalescer,
    Delivery,
    MemberGone,
    Options,
    PerMessage,
    RawAck,
    ack_each,
    each_error,
)

logger = logging.getLogger("batchtask")

CLAIM_EVERY = 1.0
"""Seconds between two ``XAUTOCLAIM`` rounds of one reader."""

INBOX_CLAIM_MAX = 10.0
"""Most seconds between two ``XAUTOCLAIM`` rounds of a fleet member's inbox."""

DEFAULT_IDLE_MS = 600_000
"""Idle time before a claim where the broker has no ``idle_timeout`` (taskiq-redis's
default for ``RedisStreamBroker``)."""

Target = tuple[str | bytes, str | bytes]
"""(stream, entry id): what one ``XACK`` names."""


class StreamAck:
    """The ack of one entry read by `StreamFamily.listen`: an ``XACK`` of its id."""

    __slots__ = ("claimed", "entry", "family", "stream")

    def __init__(
        self,
        family: "StreamFamily",
        stream: str | bytes,
        entry: str | bytes,
        *,
        claimed: bool,
    ) -> None:
        """Ack `entry` of `stream`; `claimed` if ``XAUTOCLAIM`` handed it out."""
        self.family = family
        self.stream = stream
        self.entry = entry
        self.claimed = claimed

    async def __call__(self) -> None:
        """Send this entry's ``XACK`` (with this loop turn's others, if grouped)."""
        family = self.family
        if family.options.group_acks:
            await family.grouped_xack.submit((self.stream, self.entry))
            return
        (error,) = await family.xack([(self.stream, self.entry)])
        if error is not None:
            raise error


class StreamFamily(PerMessage):
    """A taskiq-redis stream broker (see the module); subclasses say how to connect."""

    family: ClassVar[str] = "redis-stream"
    ack_closure: ClassVar[str] = ""
    """The qualified name of the broker's own ack closures."""

    def __init__(self, broker: AsyncBroker, options: Options = DEFAULTS) -> None:
        """Serve `broker` (a taskiq-redis stream broker) with `options`."""
        super().__init__(broker, options)
        self.stream: Any = broker
        self.grouped_xack: Coalescer[Target] = Coalescer(self.xack)
        self.round_trips = 0
        """``XACK`` round trips sent so far (for tests and benchmarks)."""
        self.malformed = 0
        """Entries without a ``data`` field acknowledged so far."""
        self._asking: list[tuple[Target, asyncio.Future[int]]] = []
        self._asks: set[asyncio.Task[None]] = set()
        self.inbox: str | None = None
        """This worker's inbox in the fleet (`StreamRoutes`), read with the queue."""

    # -- connecting (one per family) -------------------------------------------

    def client(self) -> AbstractAsyncContextManager[Any]:
        """A client of the server the stream is on, for one use."""
        raise NotImplementedError

    @property
    def own_idle_ms(self) -> int | float | None:
        """The broker's own ``idle_timeout`` (ms), if it has one."""
        own = getattr(self.broker, "idle_timeout", None)
        if isinstance(own, (int, float)) and not isinstance(own, bool):
            return own
        return None

    @property
    def idle_ms(self) -> int:
        """Milliseconds an entry stays unacknowledged before it is claimed."""
        own = self.own_idle_ms
        if own is not None:
            return int(own)
        return self.options.idle_timeout_ms or DEFAULT_IDLE_MS

    @property
    def inbox_claim_every(self) -> float:
        """Seconds between two claims of the inbox: half the idle time.

        At least `CLAIM_EVERY`, at most `INBOX_CLAIM_MAX`. Only this process
        reads its inbox, so only its own entries left unacknowledged (a
        failed batch's) wait there for the idle time.
        """
        return min(INBOX_CLAIM_MAX, max(CLAIM_EVERY, self.idle_ms / 2000))

    def streams(self) -> dict[Any, Any]:
        """The streams a read asks for, each with its starting id."""
        broker = self.stream
        streams = {broker.queue_name: ">", **broker.additional_streams}
        if self.inbox is not None:
            streams[self.inbox] = ">"
        return streams

    # -- deliveries -------------------------------------------------------------

    def listen(self) -> AsyncIterator[Delivery]:
        """Read new entries and claim idle ones on a timer (see the module)."""
        if self.changes():
            return super().listen()
        return self._read()

    async def _read(self) -> AsyncIterator[Delivery]:
        broker = self.stream
        group, consumer = broker.consumer_group_name, broker.consumer_name
        count = getattr(broker, "count", None) or 100
        block_ms = max(1, int(broker.block))
        loop = asyncio.get_running_loop()
        claim_due = inbox_due = loop.time()
        async with self.client() as client:
            while True:
                if loop.time() >= claim_due:
                    for stream in list(self.streams()):
                        inbox = stream == self.inbox
                        if inbox and loop.time() < inbox_due:
                            continue
                        try:
                            async for message in self._claim(client, stream):
                                yield message
                        except Exception as exc:
                            if not inbox or "NOGROUP" not in str(exc):
                                raise
                        if inbox:
                            inbox_due = loop.time() + self.inbox_claim_every
                    claim_due = loop.time() + CLAIM_EVERY
                wait = max(1, min(block_ms, int((claim_due - loop.time()) * 1000)))
                try:
                    fetched: Any = await client.xreadgroup(
                        group, consumer, self.streams(), block=wait, count=count
                    )
                except Exception as exc:
                    inbox = self.inbox
                    if inbox is None or "NOGROUP" not in str(exc):
                        raise
                    # Moved back to the queue while this worker was cut off
                    # (`StreamRoutes`): an empty inbox again.
                    with contextlib.suppress(Exception):
                        await client.xgroup_create(inbox, group, "0", mkstream=True)
                    continue
                for stream, entries in fetched or ():
                    async for message in self._messages(
                        client, stream, entries, claimed=False
                    ):
                        yield message

    async def _claim(self, client: Any, stream: Any) -> AsyncIterator[AckableMessage]:
        """Claim `stream`'s entries idle for `idle_ms`, all of them, in rounds."""
        broker = self.stream
        cursor: Any = "0-0"
        while True:
            reply: Any = await client.xautoclaim(
                stream,
                broker.consumer_group_name,
                broker.consumer_name,
                min_idle_time=self.idle_ms,
                start_id=cursor,
                count=getattr(broker, "unacknowledged_batch_size", 100),
            )
            cursor, entries = reply[0], reply[1]
            if entries:
                logger.info(
                    "batchtask: claimed %d entr%s of stream %s idle for %d ms",
                    len(entries),
                    "y" if len(entries) == 1 else "ies",
                    _text(stream),
                    self.idle_ms,
                )
            async for message in self._messages(client, stream, entries, claimed=True):
                yield message
            if _text(cursor) == "0-0" or not entries:
                return

    async def _messages(
        self, client: Any, stream: Any, entries: Any, *, claimed: bool
    ) -> AsyncIterator[AckableMessage]:
        """The deliveries of a read's (or a claim's) entries; the bad ones dropped.

        Only an entry without ``data`` is awaited (`_drop`): the others cost
        no coroutine each.
        """
        pairs = cast("list[tuple[Any, object]]", entries)
        for entry, fields in pairs:
            data = _data_of(fields)
            if data is not None:
                yield AckableMessage.model_construct(
                    data=data, ack=StreamAck(self, stream, entry, claimed=claimed)
                )
            else:
                await self._drop(client, stream, entry, fields)

    async def _drop(self, client: Any, stream: Any, entry: Any, fields: object) -> None:
        """Log and acknowledge an entry that is not a taskiq message."""
        found: dict[object, object] | None = (
            cast("dict[object, object]", fields) if isinstance(fields, dict) else None
        )
        self.malformed += 1
        keys = None if found is None else sorted(_text(key) for key in found)
        logger.error(
            "batchtask: stream %s entry %s has no data field (fields: %s); it is "
            "not a taskiq message: acknowledged without running",
            _text(stream),
            _text(entry),
            keys,
        )
        try:
            await client.xack(stream, self.stream.consumer_group_name, entry)
        except Exception:
            logger.warning(
                "batchtask: could not acknowledge entry %s; it comes back after "
                "the idle time",
                _text(entry),
                exc_info=True,
            )

    def redelivered(self, data: Delivery) -> bool | None:
        """Whether `data` was delivered before: claimed entries were.

        An entry of the broker's own ``listen()`` older than the idle time may
        be (None: `delivered_before` asks).
        """
        if not isinstance(data, AckableMessage):
            return False
        ack = data.ack
        if isinstance(ack, StreamAck):
            return ack.claimed
        target = self.closure_target(ack)
        if target is None:
            return False
        text = _text(target[1])
        try:
            added_ms = int(text.partition("-")[0])
        except ValueError:
            return False
        # XAUTOCLAIM hands out only entries idle that long; a fresh read returns
        # one older only from a backlog that old: then XPENDING tells.
        return None if added_ms <= time.time() * 1000 - self.idle_ms else False

    async def delivered_before(self, data: Delivery) -> bool:
        """Whether the entry's delivery count is above 1 (``XPENDING``).

        The entries asked about in one loop turn share one round trip.
        """
        target = (
            self.closure_target(data.ack) if isinstance(data, AckableMessage) else None
        )
        if target is None:
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        if not self._asking:
            loop.call_soon(self._start_asking)
        self._asking.append((target, future))
        return await future > 1

    def _start_asking(self) -> None:
        # Held here until done: a task nothing refers to may be collected
        # mid-flight, and its askers would wait forever.
        task = asyncio.ensure_future(self._ask())
        self._asks.add(task)
        task.add_done_callback(self._asks.discard)

    async def _ask(self) -> None:
        asking, self._asking = self._asking, []
        try:
            async with self.client() as client:
                pipeline = client.pipeline(transaction=False)
                for (stream, entry), _ in asking:
                    pipeline.xpending_range(
                        stream,
                        self.stream.consumer_group_name,
                        min=entry,
                        max=entry,
                        count=1,
                    )
                replies: list[Any] = await pipeline.execute(raise_on_error=False)
        except Exception as exc:
            replies = [exc] * len(asking)
        for (_, future), reply in zip(asking, replies, strict=True):
            if not future.done():
                future.set_result(_times_delivered(reply))

    # -- acks -------------------------------------------------------------------

    def target(self, ack: RawAck | None) -> Target | None:
        """(stream, id) of one of this broker's acks, or None."""
        if isinstance(ack, StreamAck):
            return (ack.stream, ack.entry) if ack.family is self else None
        return None if ack is None else self.closure_target(ack)

    def closure_target(self, ack: Callable[..., Any]) -> Target | None:
        """(stream, id) a broker's own ack closure acks, or None."""
        code = getattr(ack, "__code__", None)
        cells = getattr(ack, "__closure__", None)
        if code is None or cells is None or ack.__qualname__ != self.ack_closure:
            return None
        try:
            bound = {
                name: cell.cell_contents
                for name, cell in zip(code.co_freevars, cells, strict=True)
            }
        except ValueError:  # an empty cell
            return None
        stream, entry = bound.get("queue_name"), bound.get("id")
        if bound.get("self") is not self.broker or not isinstance(stream, (str, bytes)):
            return None
        if not isinstance(entry, (str, bytes)):
            return None
        return stream, entry

    async def ack_many(self, acks: AckPairs) -> list[BaseException | None]:
        """One ``XACK`` per stream for this broker's messages; others one by one."""
        if not self.options.group_acks:
            return await super().ack_many(acks)
        errors: list[BaseException | None] = [None] * len(acks)
        streamed: list[int] = []
        targets: list[Target] = []
        others: list[int] = []
        for index, (controller, raw) in enumerate(acks):
            if controller.is_acked:
                continue
            target = self.target(raw)
            if target is None:
                others.append(index)
            else:
                streamed.append(index)
                targets.append(target)
        if targets:
            try:
                replies = await self.xack(targets)
            except Exception as exc:
                replies = each_error(exc, len(targets))
            for index, reply in zip(streamed, replies, strict=True):
                errors[index] = reply
                if reply is None:
                    acks[index][0].is_acked = True
        for index, error in zip(
            others, await ack_each([acks[i][0] for i in others]), strict=True
        ):
            errors[index] = error
        return errors

    async def xack(self, requests: list[Target]) -> list[BaseException | None]:
        """``XACK`` each (stream, id): one pipeline, one command per stream."""
        streams: dict[str | bytes, list[int]] = {}
        for index, (stream, _) in enumerate(requests):
            streams.setdefault(stream, []).append(index)
        errors: list[BaseException | None] = [None] * len(requests)
        self.round_trips += 1
        async with self.client() as client:
            pipeline = client.pipeline(transaction=False)
            inboxes: list[bool] = []
            for stream, indexes in streams.items():
                ids = [requests[index][1] for index in indexes]
                pipeline.xack(stream, self.stream.consumer_group_name, *ids)
                inboxes.append(INBOX_MARK in _text(stream))
                if inboxes[-1]:  # an inbox keeps only what is still owed
                    pipeline.xdel(stream, *ids)
            replies: list[Any] = await pipeline.execute(raise_on_error=False)
        acked = iter(replies)
        for indexes, inbox in zip(streams.values(), inboxes, strict=True):
            reply = next(acked)
            if inbox:
                next(acked)  # an XDEL that failed leaves an acked entry: harmless
            if isinstance(reply, BaseException):
                for index in indexes:
                    errors[index] = reply
        return errors

    def grouped(self, ack: RawAck) -> Callable[[], Awaitable[None]] | None:
        """A grouped version of one of this broker's acks, or None."""
        target = self.target(ack)
        if target is None:
            return None
        submit = self.grouped_xack.submit

        async def grouped_ack() -> None:
            await submit(target)

        return grouped_ack

    def stock_message(self, data: AckableMessage) -> AckableMessage:
        """`data` with its ``XACK`` sent with this loop turn's others."""
        if not self.options.group_acks or isinstance(data.ack, StreamAck):
            return data
        grouped = self.grouped(data.ack)
        if grouped is None:
            return data
        return AckableMessage.model_construct(data=data.data, ack=grouped)

    def on_stock_worker(self) -> None:
        """Wrap the broker's ``listen`` to hand out grouped acks."""
        broker = self.broker
        if "listen" in vars(broker):
            return
        listen = broker.listen
        stock_message = self.stock_message

        async def listen_with_grouped_acks() -> AsyncIterator[Delivery]:
            deliveries = listen()
            try:
                async for message in deliveries:
                    if isinstance(message, AckableMessage):
                        message = stock_message(message)
                    yield message
            finally:
                await deliveries.aclose()

        setattr(broker, "listen", listen_with_grouped_acks)  # noqa: B010

    # -- kicks and checks ---------------------------------------------------------

    async def kick_many(self, messages: Sequence[BrokerMessage]) -> None:
        """Every message's ``XADD`` in one pipeline, as the broker's ``kick`` does."""
        broker = self.stream
        async with self.client() as client:
            pipeline = client.pipeline(transaction=False)
            for message in messages:
                pipeline.xadd(
                    message.labels.get("queue_name") or broker.queue_name,
                    {b"data": message.message},
                    maxlen=broker.maxlen,
                    approximate=broker.approximate,
                )
            await pipeline.execute()

    def redelivery_window(self) -> tuple[float, str] | None:
        """The idle time after which an unacknowledged entry is claimed."""
        own = self.own_idle_ms
        if own is not None:
            return own / 1000, f"{type(self.broker).__name__}(idle_timeout={own:g})"
        idle = self.idle_ms
        return idle / 1000, f"BatchReceiver(idle_timeout={idle})"

    async def keep(self, acks: Sequence[Any]) -> None:
        """``XCLAIM ... JUSTID`` to this consumer: the entries' idle time restarts.

        Entries a `BatchReceiver` holds longer than the idle time (waiting
        for a call slot of their key across the fleet, or in a long batch)
        would otherwise be claimed by another consumer and run twice.
        """
        by_stream: dict[Any, list[Any]] = {}
        for ack in acks:
            if isinstance(ack, StreamAck):
                by_stream.setdefault(ack.stream, []).append(ack.entry)
        if not by_stream:
            return
        broker = self.stream
        async with self.client() as client:
            for stream, entries in by_stream.items():
                await client.xclaim(
                    stream,
                    broker.consumer_group_name,
                    broker.consumer_name,
                    0,
                    entries,
                    justid=True,
                )

    def notices(self) -> "StreamNotices":
        """``PUBLISH`` / ``SUBSCRIBE`` on the stream's server."""
        return StreamNotices(self)

    def notice_client(self) -> AbstractAsyncContextManager[Any]:
        """A client that can publish and subscribe (a cluster's: one node)."""
        return self.client()

    def route_server(self) -> "StreamRoutes | None":
        """Members and inboxes on the stream's server (see `StreamRoutes`).

        None with ``fleet=false``, or where the reader is the broker's own
        ``listen()`` (it would not read the inbox).
        """
        if not self.options.fleet or self.changes():
            return None
        return StreamRoutes(self)

    def lease_server(self) -> "StreamLeases | None":
        """Leases on the stream's server, unless the worker asked for none."""
        return StreamLeases(self.client) if self.options.fleet else None

    def changes(self) -> list[str]:
        """What the reader and grouped acks need from the broker and did not find."""
        names = ("queue_name", "consumer_group_name", "consumer_name", "block")
        missing = [n for n in names if not hasattr(self.broker, n)]
        if not isinstance(getattr(self.broker, "additional_streams", None), dict):
            missing.append("additional_streams")
        return [f"{type(self.broker).__name__}.{name}" for name in missing]


def _times_delivered(reply: object) -> int:
    """An ``XPENDING`` row's delivery count; 2 when unknown (then checked)."""
    if isinstance(reply, list) and reply:
        row: object = cast("list[object]", reply)[0]
        if isinstance(row, dict):
            count: object = cast("dict[str, object]", row).get("times_delivered")
            if isinstance(count, int):
                return count
    return 2


def _data_of(fields: object) -> bytes | None:
    """An entry's ``data`` field, if it has one (a taskiq message's bytes)."""
    if isinstance(fields, dict):
        data = cast("dict[object, object]", fields).get(b"data")
        if isinstance(data, bytes):
            return data
    return None


_ACQUIRE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
local stale = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ms - tonumber(ARGV[4]))
for _, gone in ipairs(stale) do
  redis.call('ZREM', KEYS[3], gone)
  redis.call('ZREM', KEYS[4], gone)
end
redis.call('ZADD', KEYS[3], 'NX', ms, ARGV[2])
redis.call('ZADD', KEYS[4], ms, ARGV[2])
redis.call('PEXPIRE', KEYS[3], ttl * 2)
redis.call('PEXPIRE', KEYS[4], ttl * 2)
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
if free <= 0 or redis.call('ZRANK', KEYS[3], ARGV[2]) >= free then
  return 0
end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('ZADD', KEYS[1], ms + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
local token = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], 86400000)
return token
"""
"""Grant one of ARGV[1] slots of KEYS[1] to holder ARGV[2] for ARGV[3] ms, in
the order holders first asked (KEYS[3], by first ask; KEYS[4], by latest ask:
a holder that has not asked again for ARGV[4] ms leaves the queue)."""

_RENEW = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not until_ms or tonumber(until_ms) <= ms then
  return 0
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', ms + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
"""
"""Extend holder ARGV[1]'s unexpired lease of KEYS[1] by ARGV[2] ms."""

QUEUE_STALE_MS = 3000
"""A holder waiting for a lease that has not asked again for this long (it
asks every quarter second at most, or gave up) leaves the queue."""

LEASE_PREFIX = "batchtask:lease"
"""The prefix of the lease keys: ``batchtask:lease:{<name>}`` and ``...:fence``."""


class StreamLeases:
    """Leases on a Redis server (see the module).

    A stream family's own, or a result backend's (`backend_leases`).
    """

    def __init__(self, client: Callable[[], AbstractAsyncContextManager[Any]]) -> None:
        """Keep leases on the server `client` gives a client of, per use."""
        self.client = client

    @staticmethod
    def keys(name: str) -> tuple[str, str, str, str]:
        """A lease name's holders, token counter, and waiting queue (two sets)."""
        tagged = f"{LEASE_PREFIX}:{{{name}}}"
        return tagged, f"{tagged}:fence", f"{tagged}:queue", f"{tagged}:seen"

    async def acquire(self, name: str, limit: int, holder: str, ttl_ms: int) -> int:
        """One of `limit` slots of `name`, first come first served.

        A fencing token, or 0 if all are held or others asked first.
        """
        async with self.client() as client:
            granted = await client.eval(
                _ACQUIRE, 4, *self.keys(name), limit, holder, ttl_ms, QUEUE_STALE_MS
            )
        return int(granted)

    async def renew(self, name: str, holder: str, ttl_ms: int) -> bool:
        """Extend `holder`'s lease of `name`; False if it expired or is gone."""
        holders, fence, _, _ = self.keys(name)
        async with self.client() as client:
            kept = await client.eval(_RENEW, 2, holders, fence, holder, ttl_ms)
        return int(kept) == 1

    async def release(self, name: str, holder: str) -> None:
        """Give the slot back at once."""
        holders, _, queue, seen = self.keys(name)
        async with (
            self.client() as client,
            client.pipeline(transaction=False) as pipe,
        ):
            pipe.zrem(holders, holder)
            pipe.zrem(queue, holder)
            pipe.zrem(seen, holder)
            await pipe.execute()


BACKEND_NAMES = (
    "taskiq_redis.RedisAsyncResultBackend.redis_pool, "
    "RedisAsyncClusterResultBackend.redis, RedisAsyncSentinelResultBackend"
    ".sentinel, .master_name: the result backend's server, where call limits "
    "across the fleet keep their leases",
)
"""What `backend_leases` relies on (in the `private_names` of its adapters)."""


def backend_leases(backend: object) -> StreamLeases | None:
    """Leases on the server of a taskiq-redis result backend; None for others.

    For a broker whose own server keeps no leases (RabbitMQ, NATS): the Redis
    its results go to is a server the fleet already shares.
    """
    while type(backend).__name__ == "GroupedResultBackend":
        backend = getattr(backend, "inner", None)
    found: Any = backend
    kind = f"{type(found).__module__}.{type(found).__qualname__}"
    if kind == "taskiq_redis.redis_backend.RedisAsyncResultBackend":
        pool = getattr(found, "redis_pool", None)
        if pool is None:
            return None

        def plain() -> AbstractAsyncContextManager[Any]:
            from redis.asyncio import Redis

            return Redis(connection_pool=pool)

        return StreamLeases(plain)
    if kind == "taskiq_redis.redis_backend.RedisAsyncClusterResultBackend":
        cluster = getattr(found, "redis", None)
        return None if cluster is None else StreamLeases(lambda: kept(cluster))
    if kind == "taskiq_redis.redis_backend.RedisAsyncSentinelResultBackend":
        sentinel = getattr(found, "sentinel", None)
        name = getattr(found, "master_name", None)
        if sentinel is None or name is None:
            return None
        master = sentinel.master_for(name)
        return StreamLeases(lambda: kept(master))
    return None


def hash_tag(name: str) -> str:
    """What Redis Cluster hashes of key `name`: its ``{tag}`` or all of it."""
    start = name.find("{")
    if start >= 0:
        end = name.find("}", start + 1)
        if end > start + 1:
            return name[start + 1 : end]
    return name


INBOX_MARK = ":batchtask:inbox:"
"""In an inbox's name: ``{<stream's tag>}:batchtask:inbox:<member>``."""

_BEAT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if ARGV[4] == '1' then
  redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[3], '0', 'MKSTREAM')
end
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
local scored = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local live, expired = {}, {}
for i = 1, #scored, 2 do
  if tonumber(scored[i + 1]) >= ms then
    live[#live + 1] = scored[i]
  else
    expired[#expired + 1] = scored[i]
  end
end
return {live, expired}
"""
"""Renew member ARGV[1] of KEYS[1] for ARGV[2] ms, its inbox KEYS[2] read by
group ARGV[3] made first if ARGV[4] is 1; the live members and the expired
ones (one ``ZRANGE``: a fleet's set is small)."""

_RECLAIM = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[1])
if until_ms and tonumber(until_ms) > ms and ARGV[3] == '0' then
  return -1
end
local entries = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', ARGV[2])
for _, entry in ipairs(entries) do
  redis.call('XADD', KEYS[3], '*', unpack(entry[2]))
  redis.call('XDEL', KEYS[2], entry[1])
end
if #entries < tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return #entries
"""
"""Move up to ARGV[2] entries of member ARGV[1]'s inbox KEYS[2] to the queue
KEYS[3]; once it is empty, the member leaves KEYS[1]. Unless ARGV[3] is 1 (the
member itself leaving), -1 if the member is alive."""

_FORWARD = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local moved = {}
for i = 1, #KEYS - 2 do
  local base = (i - 1) * 3
  local until_ms = redis.call('ZSCORE', KEYS[2], ARGV[base + 2])
  if until_ms and tonumber(until_ms) > ms then
    redis.call('XADD', KEYS[i + 2], '*', 'data', ARGV[base + 4])
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[base + 3])
    moved[i] = 1
  else
    moved[i] = 0
  end
end
return moved
"""
"""For each move i (inbox KEYS[i + 2]; member, entry id of the queue KEYS[1],
data in ARGV): if the member is alive, add the data to its inbox and ``XACK``
the entry for group ARGV[1]; 1 if moved, 0 if not."""


class StreamRoutes:
    """Members of the fleet and their inboxes, on a stream family's server.

    The members are one sorted set per stream, each scored by when its
    membership expires by the server's clock. A member's inbox is a stream of
    its own with the queue's consumer group, named with the queue's hash tag
    (on a Redis Cluster, queue, members and inboxes share a slot: every
    script here runs on one node). Moving a delivery adds its ``data`` to
    the owner's inbox and acks it on the queue in one script, only while
    the owner is a member: nothing is lost or doubled on the way. An inbox
    entry is deleted as it is acked (`StreamFamily.xack`).
    """

    def __init__(self, family: StreamFamily) -> None:
        """Route `family`'s queue (its broker's ``queue_name``)."""
        self.family = family
        self.queue: str = _text(family.stream.queue_name)
        tag = hash_tag(self.queue)
        self.members_key = f"{{{tag}}}:batchtask:members:{self.queue}"
        self._inbox_prefix = f"{{{tag}}}{INBOX_MARK}"
        self._moves: Coalescer[tuple[str, Delivery]] = Coalescer(self._forward)
        self._made: set[str] = set()
        """Members whose inbox group the last beat found made."""

    def inbox(self, member: str) -> str:
        """The name of `member`'s inbox."""
        return f"{self._inbox_prefix}{member}"

    async def beat(self, member: str, ttl_ms: int) -> tuple[list[str], list[str]]:
        """Renew `member`; the live and the expired members.

        The inbox's group is made at `member`'s first beat and at the beat
        after one that failed, not at every beat; an inbox moved back to the
        queue meanwhile (`reclaim`) is made again by the reader
        (`StreamFamily.listen`, on ``NOGROUP``).
        """
        group = self.family.stream.consumer_group_name
        make = member not in self._made
        self._made.discard(member)
        async with self.family.client() as client:
            reply: Any = await client.eval(
                _BEAT,
                2,
                self.members_key,
                self.inbox(member),
                member,
                ttl_ms,
                group,
                1 if make else 0,
            )
        self._made.add(member)
        live, expired = reply[0], reply[1]
        return [_text(m) for m in live], [_text(m) for m in expired]

    async def reclaim(self, member: str, count: int, *, own: bool = False) -> int:
        """Move up to `count` of dead `member`'s inbox entries back to the queue."""
        async with self.family.client() as client:
            moved = await client.eval(
                _RECLAIM,
                3,
                self.members_key,
                self.inbox(member),
                self.queue,
                member,
                count,
                1 if own else 0,
            )
        return int(moved)

    async def leave(self, member: str, count: int) -> int:
        """`member` itself leaving: move up to `count` of its entries back."""
        return await self.reclaim(member, count, own=True)

    def forwardable(self, data: Delivery) -> bool:
        """A first delivery of the queue (not of an inbox, not claimed)."""
        if self.family.inbox is None or not isinstance(data, AckableMessage):
            return False
        ack = data.ack
        return (
            isinstance(ack, StreamAck)
            and ack.family is self.family
            and not ack.claimed
            and _text(ack.stream) == self.queue
        )

    def serve(self, member: str | None) -> None:
        """Read `member`'s inbox with the queue (None: no inbox)."""
        self.family.inbox = None if member is None else self.inbox(member)

    async def forward(self, member: str, data: Delivery) -> None:
        """Move `data` to `member`'s inbox, with this loop turn's others at once."""
        await self._moves.submit((member, data))

    async def _forward(
        self, moves: list[tuple[str, Delivery]]
    ) -> list[BaseException | None]:
        keys = [self.queue, self.members_key]
        args: list[Any] = [self.family.stream.consumer_group_name]
        for member, data in moves:
            assert isinstance(data, AckableMessage)
            ack = data.ack
            assert isinstance(ack, StreamAck)
            keys.append(self.inbox(member))
            args += [member, ack.entry, data.data]
        async with self.family.client() as client:
            reply: Any = await client.eval(_FORWARD, len(keys), *keys, *args)
        return [
            None if int(moved) == 1 else MemberGone(member)
            for (member, _), moved in zip(moves, reply, strict=True)
        ]


NOTICE_PREFIX = "batchtask:notices"
"""The notice channel of a stream: ``batchtask:notices:<stream>``."""


class StreamNotices:
    """Settings changes for every worker of a stream, by Redis pub/sub."""

    def __init__(self, family: StreamFamily) -> None:
        """Publish and subscribe where `family`'s stream is."""
        self.family = family

    @property
    def channel(self) -> str:
        """The channel's name."""
        return f"{NOTICE_PREFIX}:{_text(self.family.stream.queue_name)}"

    async def publish(self, data: bytes) -> int:
        """``PUBLISH``: how many subscribers got it."""
        async with self.family.notice_client() as client:
            return int(await client.publish(self.channel, data))

    async def subscribe(self) -> AsyncIterator[bytes]:
        """``SUBSCRIBE``, then each message's data as it comes."""
        async with self.family.notice_client() as client:
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                async for message in pubsub.listen():
                    data = message.get("data")
                    if message.get("type") == "message" and isinstance(data, bytes):
                        yield data
            finally:
                await pubsub.aclose()


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def expiry_of(backend: Any) -> list[Any]:
    """``SET`` arguments for a taskiq-redis result backend's expiry, or []."""
    ex = backend.result_ex_time or None
    px = None if ex else backend.result_px_time or None
    return ["EX", ex] if ex else ["PX", px] if px else []


def dumped(
    backend: Any, requests: list[tuple[str, Any]]
) -> tuple[list[int], list[str], list[bytes], list[BaseException | None]]:
    """Each request's key and value as the backend's ``set_result`` makes them.

    Returns the indexes that could be dumped, their keys and values, and an
    error per request (set for those that could not).
    """
    errors: list[BaseException | None] = [None] * len(requests)
    indexes: list[int] = []
    names: list[str] = []
    values: list[bytes] = []
    for index, (task_id, result) in enumerate(requests):
        try:
            value = backend.serializer.dumpb(result.model_dump(mode="json"))
        except Exception as exc:  # this result only: it cannot be stored
            errors[index] = exc
            continue
        indexes.append(index)
        names.append(backend._task_name(task_id))
        values.append(value)
    return indexes, names, values, errors


async def pipelined_sets(
    client: Any, backend: Any, requests: list[tuple[str, Any]]
) -> list[BaseException | None]:
    """One ``SET`` per result in one pipeline (on a cluster: one per node)."""
    indexes, names, values, errors = dumped(backend, requests)
    if not names:
        return errors
    expiry = expiry_of(backend)
    options: dict[str, Any] = {expiry[0].lower(): expiry[1]} if expiry else {}
    pipeline = client.pipeline(transaction=False)
    for name, value in zip(names, values, strict=True):
        pipeline.set(name, value, **options)
    try:
        replies: list[Any] = await pipeline.execute(raise_on_error=False)
    except Exception as exc:
        replies = each_error(exc, len(names))
    for index, reply in zip(indexes, replies, strict=True):
        if isinstance(reply, BaseException):
            errors[index] = copy.copy(reply)
    return errors


@contextlib.asynccontextmanager
async def kept(client: Any) -> AsyncGenerator[Any]:
    """`client` for one use, left open (a cluster client, a Sentinel master)."""
    yield client
