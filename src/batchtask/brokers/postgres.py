"""taskiq-postgres: ``AsyncpgBroker``, with claims tagged by their worker and dead workers' claims handed out again.

taskiq-postgres's ``AsyncpgBroker`` keeps each message as a row (``status``
``'pending'``), announces it with ``NOTIFY``, and a worker claims it by setting
``status = 'processing'``; the ack deletes the row. Alone, that loses messages
three ways: a worker that dies leaves its claimed rows ``'processing'``
forever; a row kicked while nobody listens is never announced again; and a
dropped ``LISTEN`` connection (or a claim failing on a dropped pool
connection) silently stops deliveries. `PostgresRedelivery`, run by
`batchtask.BatchReceiver` on such a broker, closes the three:

- it holds a *lease* connection of its own; its session (``pg_backend_pid()``
  and ``backend_start``) names this worker process while it lives;
- every row this worker claims is tagged ``processing:<pid>:<start in µs>``
  by the claim itself: `PostgresRedelivery.listen` is the broker's
  ``listen()`` with its claim statement setting the tag instead of
  ``'processing'`` (a worker killed between a claim and a later tag would
  leave the row untagged, handed out only after `reclaim_after`); a claim
  made before the lease is connected is tagged by one ``UPDATE`` for the
  claims of a loop turn, and a tag that failed is made by the next sweep; a
  claim whose outcome is unknown (its connection dropped) is tried again
  accepting the row already tagged by it;
- every `sweep_every` seconds one statement hands out again (``pending`` plus
  ``pg_notify``) rows whose tag names a session no longer in
  ``pg_stat_activity``, and untagged ``'processing'`` rows this sweeper has
  seen untagged for `reclaim_after` seconds (a stock taskiq worker, or a worker
  that died between claim and tag); it also lists ``'pending'`` rows due for
  `renotify_after` seconds (at most `STALE_LIMIT`), which this worker then
  claims as if notified (their notification was lost);
- at start, and whenever the broker's ``LISTEN`` connection is found closed
  or not answering (and replaced) or the lease is connected again, every due
  ``'pending'`` row is handed to this worker's broker as if notified; a new
  lease re-tags the rows this worker still holds.

Invariants: a row tagged with a live session is never handed out again;
`held` holds the ids of rows this worker claimed and that still exist (ids
whose row is gone are dropped at the next sweep); one task, owned here from
`start` to `stop`, uses the lease connection, so its queries never overlap;
a sweep or a tag that fails is logged and tried again, it never ends the
worker. A row due is one whose ``delay`` label (seconds after ``created_at``)
has passed.

Reads taskiq-postgres's private ``_read_conn``, ``_owns_read_conn``,
``_notification_handler``, ``_queue`` and ``_write_pool`` of the broker, and
the row id as the ack closure's ``_message_id`` keyword default
(taskiq-postgres 0.9). The lease
must be a session of its own (no transaction-pooling proxy in between).
"""  # noqa: E501

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Final, cast

from taskiq import AckableMessage, AsyncBroker

from batchtask._faults import transient
from batchtask.brokers._base import DEFAULTS, Delivery, Options, PerMessage

logger = logging.getLogger("batchtask")


PRIVATE_NAMES = (
    "taskiq_pg AsyncpgBroker._read_conn, ._owns_read_conn: its LISTEN connection",
    "taskiq_pg AsyncpgBroker._notification_handler(conn, pid, channel, payload)",
    "taskiq_pg AsyncpgBroker._queue: the notified row ids waiting for listen(), "
    "read by PostgresRedelivery.listen",
    "taskiq_pg AsyncpgBroker._write_pool: where PostgresRedelivery.listen claims "
    "and acks rows, and call-limit leases borrow a connection (TableLeases; a "
    "connection of their own without it)",
    "taskiq_pg AsyncpgBroker.listen.<locals>.ack: the row id as its "
    "_message_id keyword default",
)

STALE_LIMIT: Final = 1000
"""Pending rows one sweep hands over for a lost notification, at most."""
SWEEP_LIMIT: Final = 30.0
"""Seconds one sweep (connecting included) may take before it is abandoned."""
PROBE_LIMIT: Final = 10.0
"""Seconds the ``LISTEN`` connection may take to answer ``SELECT 1``."""
CONNECT_TIMEOUT: Final = 10.0
"""``asyncpg.connect`` timeout unless the broker's ``read_kwargs`` set one."""

_SESSION_TAG: Final = (
    "'processing:' || a.pid || ':' || "
    "(extract(epoch FROM a.backend_start) * 1000000)::bigint"
)
"""The tag of the session of ``pg_stat_activity`` row ``a``, in SQL."""

_DUE: Final = (
    "created_at + make_interval(secs => CASE WHEN labels->>'delay' "
    "~ '^[0-9]+(\\.[0-9]+)?$' THEN (labels->>'delay')::float8 ELSE 0 END)"
)
"""When a row is due: ``created_at`` plus its ``delay`` label, in SQL."""

_OWN_TAG: Final = (
    f"SELECT {_SESSION_TAG} FROM pg_stat_activity AS a WHERE a.pid = pg_backend_pid()"
)

_CLAIM: Final = (
    "UPDATE {table} SET status = $2 WHERE id = $1 AND status = 'pending' "
    "RETURNING message"
)
"""taskiq-postgres's claim, setting tag $2 (``'processing'`` before the lease
is connected) instead of ``'processing'``."""

_CLAIM_AGAIN: Final = (
    "UPDATE {table} SET status = $2 WHERE id = $1 AND status IN ('pending', $3) "
    "RETURNING message"
)
"""A claim tried again after its first try's outcome was lost: the row may
already be this worker's, under status $3 as that try set it."""

_DELETE: Final = "DELETE FROM {table} WHERE id = $1"
"""taskiq-postgres's ack."""

_TAG: Final = (
    "UPDATE {table} SET status = $2 "
    "WHERE id = ANY($1::bigint[]) AND status = 'processing'"
)

_RETAG: Final = (
    "UPDATE {table} SET status = $2 WHERE id = ANY($1::bigint[]) "
    "AND status IN ('processing', 'pending', $3) RETURNING id"
)
"""Take back the rows still held here: untagged, under the old tag, or handed
out again but not claimed yet."""

_PENDING: Final = (
    "SELECT id FROM {table} WHERE status = 'pending' AND " + _DUE + " <= now() "
    "ORDER BY id"
)

_SWEEP: Final = (
    "WITH dead AS ("
    " UPDATE {table} AS m SET status = 'pending'"
    " WHERE m.status LIKE 'processing:%'"
    " AND NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a"
    "  WHERE a.pid::text = split_part(m.status, ':', 2)"
    f"  AND (a.backend_start IS NULL OR {_SESSION_TAG} = m.status))"
    " RETURNING m.id"
    "), overdue AS ("
    " UPDATE {table} AS m SET status = 'pending'"
    " WHERE m.id = ANY($2::bigint[]) AND m.status = 'processing'"
    " RETURNING m.id"
    "), tagged AS ("
    " UPDATE {table} SET status = $6"
    " WHERE id = ANY($3::bigint[]) AND status = 'processing'"
    ")"
    " SELECT 'dead' AS kind, id, pg_notify($1, id::text)::text FROM dead"
    " UNION ALL SELECT 'overdue', id, pg_notify($1, id::text)::text FROM overdue"
    " UNION ALL SELECT 'untagged', id, NULL FROM {table}"
    "  WHERE status = 'processing' AND NOT id = ANY($3::bigint[])"
    " UNION ALL (SELECT 'stale', id, NULL FROM {table}"
    "  WHERE status = 'pending' AND " + _DUE + " < now() - make_interval(secs => $4)"
    "  ORDER BY id LIMIT $5)"
    " UNION ALL SELECT 'gone', h, NULL FROM unnest($3::bigint[]) AS h"
    "  WHERE NOT EXISTS (SELECT 1 FROM {table} WHERE id = h)"
)
"""One sweep: hand out (and notify on channel $1) the rows of dead sessions and
the overdue untagged ones ($2); tag with $6 the held rows ($3) still untagged (a
tag that failed); list the untagged rows not held here, the pending rows due for
$4 seconds (at most $5) and the held ids whose row is gone. The lists read the
table as it was before the statement's own updates."""


class PostgresRedelivery:
    """Tags this worker's claims and hands out dead workers' (see the module)."""

    def __init__(
        self,
        broker: Any,
        *,
        sweep_every: float = 2.0,
        reclaim_after: float = 600.0,
        renotify_after: float = 30.0,
    ) -> None:
        """Serve `broker`, a taskiq-postgres ``AsyncpgBroker`` (see `for_broker`)."""
        self.broker: Any = broker
        self.sweep_every = sweep_every
        self.reclaim_after = reclaim_after
        self.renotify_after = renotify_after
        self.held: set[int] = set()
        """Ids of the rows this worker claimed, until their row is gone."""
        self.tag: str | None = None
        """This worker's tag, ``processing:<pid>:<start in µs>``; None until
        the lease is connected."""
        self._asyncpg: Any = importlib.import_module("asyncpg")
        table = broker.table_name
        self._sql = {
            name: query.replace("{table}", table)
            for name, query in {
                "claim": _CLAIM,
                "claim_again": _CLAIM_AGAIN,
                "delete": _DELETE,
                "tag": _TAG,
                "retag": _RETAG,
                "pending": _PENDING,
                "sweep": _SWEEP,
            }.items()
        }
        self._lease: Any = None
        self._fresh: list[int] = []
        """Ids noted since the last tag, to tag next."""
        self._tagged_at_claim: set[int] = set()
        """Rows `listen` claimed under this worker's tag, until noted."""
        self._unsure: dict[int, str] = {}
        """Rows whose claim's outcome was lost: the status that claim set."""
        self._tag_known = asyncio.Event()
        self._untagged_since: dict[int, float] = {}
        """Untagged ``'processing'`` rows not held here: when first seen."""
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    @classmethod
    def for_broker(cls, broker: AsyncBroker) -> "PostgresRedelivery | None":
        """Redelivery for taskiq-postgres's ``AsyncpgBroker``, else None.

        Recognised by its class's name and module, so batchtask imports
        without taskiq-postgres installed.
        """
        if not any(
            kind.__name__ == "AsyncpgBroker" and kind.__module__.startswith("taskiq_pg")
            for kind in type(broker).__mro__
        ):
            return None
        missing = [
            name
            for name in (
                "_notification_handler",
                "table_name",
                "channel_name",
                "dsn",
                "read_kwargs",
            )
            if not hasattr(broker, name)
        ]
        if missing:
            logger.warning(
                "batchtask: this taskiq-postgres AsyncpgBroker has no %s; a worker "
                "that dies keeps its messages claimed (no redelivery)",
                ", ".join(missing),
            )
            return None
        return cls(broker)

    def start(self) -> None:
        """Start tagging and sweeping (the first sweep connects the lease)."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop sweeping and close the lease: this worker's rows become reclaimable."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await self._drop_lease(graceful=True)

    def noted(self, data: bytes | AckableMessage) -> None:
        """Note one delivery of the broker: its row is tagged within a loop turn."""
        if not isinstance(data, AckableMessage):
            return
        row = _row_id(data.ack)
        if row is None:
            return
        self.held.add(row)
        if row in self._tagged_at_claim:
            self._tagged_at_claim.discard(row)
            return
        self._fresh.append(row)
        self._wake.set()

    def can_listen(self) -> bool:
        """Whether `listen` can claim for the broker (it is started)."""
        broker = self.broker
        return (
            getattr(broker, "_queue", None) is not None
            and getattr(broker, "_write_pool", None) is not None
        )

    async def listen(self) -> AsyncIterator[AckableMessage]:
        """The broker's ``listen()``, each row claimed under this worker's tag.

        As taskiq-postgres's: a notified row id is claimed (``pending`` to
        claimed, in one ``UPDATE``) and yielded with an ack that deletes its
        row. The claim sets the lease session's tag, so a worker killed right
        after it leaves a row the next sweep anywhere hands out again. It
        waits up to `CONNECT_TIMEOUT` for the lease at first; without one (or
        while it is lost), it claims as ``'processing'`` and `noted` tags the
        row once a lease is connected. A claim that fails
        on its connection is tried again once listening starts again (the
        error is raised: the receiver listens again after a delay); any other
        error is logged and the notification dropped, as taskiq-postgres does
        (the sweep takes the row up again after `renotify_after`).
        """
        broker = self.broker
        if self.tag is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await self._tag_known.wait()
        waiting: asyncio.Queue[str] = broker._queue
        while True:
            payload = await waiting.get()
            try:
                row = int(payload)
            except ValueError:
                logger.warning("batchtask: a notification of no row id: %r", payload)
                continue
            lease = self._lease
            # Without a live lease the tag may name a session that is gone:
            # claimed as taskiq-postgres does, tagged once a lease is back.
            live = lease is not None and not lease.is_closed()
            tag = self.tag if live and self.tag is not None else "processing"
            before = self._unsure.pop(row, None)
            try:
                async with broker._write_pool.acquire() as conn:
                    if before is None:
                        message = await conn.fetchval(self._sql["claim"], row, tag)
                    else:
                        message = await conn.fetchval(
                            self._sql["claim_again"], row, tag, before
                        )
            except Exception as error:
                if not transient(error):
                    logger.exception("batchtask: claiming message %d failed", row)
                    continue
                # It may have landed: the next try accepts the row as this
                # claim left it.
                self._unsure[row] = tag if before is None else before
                waiting.put_nowait(payload)
                raise
            if message is None:
                continue  # claimed by another worker, or gone
            if tag != "processing":
                self._tagged_at_claim.add(row)

            async def ack(*, _message_id: int = row) -> None:
                async with broker._write_pool.acquire() as conn:
                    await conn.execute(self._sql["delete"], _message_id)

            yield AckableMessage(data=str(message).encode(), ack=ack)

    async def _run(self) -> None:
        """Tag what was noted, sweep every `sweep_every` seconds, until stopped."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            try:
                if loop.time() >= due:
                    await self._sweep()
                    due = loop.time() + self.sweep_every
                elif self._fresh and self._lease is not None:
                    await self._tag_fresh()
                else:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(due - loop.time()):
                            await self._wake.wait()
            except Exception:  # a bug here must not end redelivery
                logger.exception("batchtask: PostgreSQL redelivery failed; going on")
                due = loop.time() + self.sweep_every

    async def _tag_fresh(self) -> None:
        rows, self._fresh = self._fresh, []
        try:
            await self._lease.execute(self._sql["tag"], rows, self.tag)
        except Exception as error:
            # The next sweep tags them (or the next lease, if this one is lost).
            await self._lease_failed(error, f"tagging {len(rows)} claimed message(s)")

    async def _sweep(self) -> None:
        try:
            async with asyncio.timeout(SWEEP_LIMIT):
                await self._connect_lease()
        except Exception as error:
            await self._lease_failed(error, "connecting")
            return
        try:
            async with asyncio.timeout(SWEEP_LIMIT):
                await self._keep_listening()
        except Exception as error:
            logger.warning(
                "batchtask: could not listen on the broker's channel again (%r); "
                "trying again in %.1f s",
                error,
                self.sweep_every,
            )
        try:
            async with asyncio.timeout(SWEEP_LIMIT):
                await self._reclaim()
        except Exception as error:
            await self._lease_failed(error, "sweeping")

    async def _connect(self) -> Any:
        broker = self.broker
        options = {"timeout": CONNECT_TIMEOUT, **broker.read_kwargs}
        return await self._asyncpg.connect(broker.dsn, **options)

    async def _connect_lease(self) -> None:
        """Connect the lease if it is not; take the new tag and re-tag the held rows."""
        if self._lease is not None and not self._lease.is_closed():
            return
        await self._drop_lease(graceful=False)
        lease = await self._connect()
        try:
            tag = str(await lease.fetchval(_OWN_TAG))
            self._fresh = []  # every id noted so far is in `held`, re-tagged now
            held = list(self.held)
            retagged: list[Any] = (
                await lease.fetch(self._sql["retag"], held, tag, self.tag or "")
                if held
                else []
            )
            handed = await self._hand_over_pending(lease)
        except BaseException:
            lease.terminate()
            raise
        first, self._lease, self.tag = self.tag is None, lease, tag
        self._tag_known.set()
        if first:
            logger.info(
                "batchtask: PostgreSQL redelivery on (%s); %d pending message(s) "
                "taken up",
                tag,
                handed,
            )
        else:
            logger.warning(
                "batchtask: PostgreSQL lease connected again (%s): %d of %d held "
                "message(s) tagged again, %d pending message(s) taken up",
                tag,
                len(retagged),
                len(held),
                handed,
            )

    async def _keep_listening(self) -> None:
        """Listen again if the broker's ``LISTEN`` connection is closed or mute."""
        broker = self.broker
        read = getattr(broker, "_read_conn", None)
        if read is not None and not read.is_closed():
            try:
                async with asyncio.timeout(PROBE_LIMIT):
                    await read.fetchval("SELECT 1")
            except Exception as error:
                logger.warning(
                    "batchtask: the broker's LISTEN connection does not answer (%r)",
                    error,
                )
            else:
                return
        conn = await self._connect()
        try:
            await conn.add_listener(broker.channel_name, broker._notification_handler)
            handed = await self._hand_over_pending(conn)
        except BaseException:
            conn.terminate()
            raise
        broker._read_conn = conn
        broker._owns_read_conn = True  # closed by the broker's shutdown
        if read is not None:
            read.terminate()
        logger.warning(
            "batchtask: the broker's LISTEN connection was lost; listening on a "
            "new one, %d pending message(s) taken up",
            handed,
        )

    async def _reclaim(self) -> None:
        """One sweep statement; hand over stale pending rows; track untagged ones."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        overdue = [
            row
            for row, since in self._untagged_since.items()
            if now - since >= self.reclaim_after and row not in self.held
        ]
        held = list(self.held)
        records = await self._lease.fetch(
            self._sql["sweep"],
            self.broker.channel_name,
            overdue,
            held,
            self.renotify_after,
            STALE_LIMIT,
            self.tag,
        )
        found: dict[str, list[int]] = {
            kind: [] for kind in ("dead", "overdue", "untagged", "stale", "gone")
        }
        for record in records:
            found[str(record["kind"])].append(int(record["id"]))
        self.held.difference_update(found["gone"])
        handed_out = set(found["overdue"])
        untagged = [row for row in found["untagged"] if row not in handed_out]
        seen = self._untagged_since
        self._untagged_since = {row: seen.get(row, now) for row in untagged}
        stale = self._hand_over(found["stale"])
        if found["dead"] or found["overdue"]:
            logger.warning(
                "batchtask: %d claimed message(s) handed out again: %d of workers "
                "that are gone, %d untagged for over %.0f s",
                len(found["dead"]) + len(found["overdue"]),
                len(found["dead"]),
                len(found["overdue"]),
                self.reclaim_after,
            )
        if stale:
            logger.warning(
                "batchtask: %d message(s) pending for over %.0f s taken up (their "
                "notification was lost)",
                stale,
                self.renotify_after,
            )

    async def _hand_over_pending(self, conn: Any) -> int:
        """Take up every due pending row as if notified; how many."""
        records = await conn.fetch(self._sql["pending"])
        return self._hand_over([int(record["id"]) for record in records])

    def _hand_over(self, rows: list[int]) -> int:
        """Give `rows` to the broker's ``listen()`` as notifications would.

        Rows already waiting in its queue are left out; how many were given.
        """
        if not rows:
            return 0
        broker = self.broker
        waiting = getattr(broker, "_queue", None)
        queued: set[object] = set(getattr(waiting, "_queue", ()))
        given = 0
        for row in rows:
            payload = str(row)
            if payload not in queued:
                broker._notification_handler(None, 0, broker.channel_name, payload)
                given += 1
        return given

    async def _lease_failed(self, error: Exception, doing: str) -> None:
        lease = self._lease
        lost = lease is None or lease.is_closed() or transient(error)
        logger.warning(
            "batchtask: PostgreSQL redelivery: %s failed (%r)%s; trying again in "
            "%.1f s",
            doing,
            error,
            ", connecting again" if lost else "",
            self.sweep_every,
        )
        if lost:
            await self._drop_lease(graceful=False)

    async def _drop_lease(self, *, graceful: bool) -> None:
        lease, self._lease = self._lease, None
        if lease is None or lease.is_closed():
            return
        if graceful:
            try:
                await lease.close(timeout=2.0)
            except Exception:
                lease.terminate()
        else:
            lease.terminate()


def _row_id(ack: object) -> int | None:
    """The row id an ``AsyncpgBroker`` ack deletes, or None if `ack` is not one."""
    if not getattr(ack, "__qualname__", "").endswith("listen.<locals>.ack"):
        return None
    defaults: object = getattr(ack, "__kwdefaults__", None)
    if not isinstance(defaults, dict):
        return None
    row = cast("dict[str, object]", defaults).get("_message_id")
    return row if isinstance(row, int) and not isinstance(row, bool) else None


LEASE_TABLE: Final = "batchtask_leases"
"""The table of call-limit leases on the broker's database (made if missing)."""

_LEASES_DDL: Final = (
    f"CREATE TABLE IF NOT EXISTS {LEASE_TABLE} ("
    " name text NOT NULL, slot integer NOT NULL, holder text NOT NULL,"
    " expires_at timestamptz NOT NULL, fence bigint NOT NULL,"
    " PRIMARY KEY (name, slot));"
    f" CREATE SEQUENCE IF NOT EXISTS {LEASE_TABLE}_fence"
)

_LEASE_ACQUIRE: Final = (
    f"WITH free AS (SELECT s FROM generate_series(0, $2 - 1) AS s"
    f" WHERE NOT EXISTS (SELECT 1 FROM {LEASE_TABLE} AS l WHERE l.name = $1"
    "  AND l.slot = s AND l.expires_at > clock_timestamp())"
    " ORDER BY s LIMIT 1)"
    f" INSERT INTO {LEASE_TABLE} AS l"
    " SELECT $1, s, $3, clock_timestamp() + make_interval(secs => $4 / 1000.0),"
    f" nextval('{LEASE_TABLE}_fence') FROM free"
    " ON CONFLICT (name, slot) DO UPDATE SET holder = excluded.holder,"
    " expires_at = excluded.expires_at, fence = excluded.fence"
    " WHERE l.expires_at <= clock_timestamp()"
    " RETURNING fence"
)
"""A free one of $2 slots of lease $1 for holder $3, for $4 ms by the server's
clock: its fencing token, or no row. Two processes that pick the same slot
meet on its key: the second finds it held and gets no row."""

_LEASE_RENEW: Final = (
    f"UPDATE {LEASE_TABLE} SET expires_at = clock_timestamp()"
    " + make_interval(secs => $3 / 1000.0)"
    " WHERE name = $1 AND holder = $2 AND expires_at > clock_timestamp()"
    " RETURNING fence"
)

_LEASE_RELEASE: Final = f"DELETE FROM {LEASE_TABLE} WHERE name = $1 AND holder = $2"


class TableLeases:
    """Call-limit leases in a table of the broker's database (`batchtask._fleet`).

    One row per held slot (``batchtask_leases``: lease name, slot, holder,
    expiry by the server's clock, fencing token from a sequence), as the
    Redis families keep them in sorted sets: a slot is free once its expiry
    has passed, so a dead holder's slot comes free a lease time after its
    last renewal, and a holder cut off from the server stops its call
    (`batchtask._fleet`) before the server could give its slot away.

    Why not advisory locks: PostgreSQL releases a session's advisory locks
    the moment the session ends, and a dropped connection ends it, while the
    holder's call may run on until it notices. A lock released before its
    holder has stopped is no fence; an expiry the holder can count down to
    is. Queries borrow a connection of the broker's write pool (a connection
    of this process's own, its queries one at a time, if the broker has no
    pool); the table and sequence are made at first use. No queue of waiters: a
    slot goes to whichever process asks first after it comes free.
    """

    def __init__(self, broker: AsyncBroker) -> None:
        """Keep leases on `broker`'s database."""
        self.broker = broker
        self._asyncpg: Any = importlib.import_module("asyncpg")
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._made = False

    async def _session(self) -> Any:
        conn = self._conn
        if conn is None or conn.is_closed():
            options: dict[str, Any] = {
                "timeout": CONNECT_TIMEOUT,
                **getattr(self.broker, "read_kwargs", {}),
            }
            dsn: Any = getattr(self.broker, "dsn", None)
            conn = self._conn = await self._asyncpg.connect(dsn, **options)
        if not self._made:
            await self._make(conn)
        return conn

    async def _make(self, conn: Any) -> None:
        """Make the table and sequence if they are missing."""
        async with conn.transaction():
            # Processes starting at once would race on CREATE ... IF NOT
            # EXISTS; one at a time, by a lock held to the commit.
            await conn.execute("SELECT pg_advisory_xact_lock(7427751)")
            await conn.execute(_LEASES_DDL)
        self._made = True

    async def _query(self, sql: str, *args: object) -> Any:
        pool: Any = getattr(self.broker, "_write_pool", None)
        if pool is not None:
            # The broker's own pool: no connection more per worker process.
            async with pool.acquire() as conn:
                if not self._made:
                    await self._make(conn)
                return await conn.fetchval(sql, *args)
        async with self._lock:
            conn = await self._session()
            try:
                return await conn.fetchval(sql, *args)
            except BaseException:
                # Unknown whether it ran: a fresh connection next time (a
                # lease it may have granted expires unrenewed).
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.terminate()
                raise

    async def acquire(self, name: str, limit: int, holder: str, ttl_ms: int) -> int:
        """A free one of `limit` slots of `name`: a fencing token, 0 if all are held."""
        fence = await self._query(_LEASE_ACQUIRE, name, limit, holder, ttl_ms)
        return 0 if fence is None else int(fence)

    async def renew(self, name: str, holder: str, ttl_ms: int) -> bool:
        """Extend `holder`'s lease of `name`; False if it expired or is gone."""
        return await self._query(_LEASE_RENEW, name, holder, ttl_ms) is not None

    async def release(self, name: str, holder: str) -> None:
        """Give the slot back at once."""
        await self._query(_LEASE_RELEASE, name, holder)

    async def close(self) -> None:
        """Close the connection (held slots expire unless released)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5.0)


class Postgres(PerMessage):
    """taskiq-postgres's ``AsyncpgBroker``: `PostgresRedelivery` beside the receiver."""

    family: ClassVar[str] = "postgres"
    private_names: ClassVar[tuple[str, ...]] = PRIVATE_NAMES

    def __init__(self, broker: AsyncBroker, options: Options = DEFAULTS) -> None:
        """Serve `broker`; redelivery runs while a `BatchReceiver` listens."""
        super().__init__(broker, options)
        self.redelivery = PostgresRedelivery.for_broker(broker)
        self.leases: TableLeases | None = None

    def lease_server(self) -> TableLeases | None:
        """Leases in the broker's database, unless the worker asked for none."""
        if not self.options.fleet or not hasattr(self.broker, "dsn"):
            return None
        if self.leases is None:
            self.leases = TableLeases(self.broker)
        return self.leases

    def listen(self) -> AsyncIterator[Delivery]:
        """`PostgresRedelivery.listen`: claims tagged in the claim itself."""
        redelivery = self.redelivery
        if redelivery is None or not redelivery.can_listen():
            return aiter(self.broker.listen())
        return aiter(redelivery.listen())

    def noted(self, data: Delivery) -> None:
        """Tag the delivery's row as this worker's."""
        if self.redelivery is not None:
            self.redelivery.noted(data)

    async def start(self) -> None:
        """Start tagging and sweeping."""
        if self.redelivery is not None:
            self.redelivery.start()

    async def stop(self) -> None:
        """Stop sweeping; this worker's rows become reclaimable; end the leases."""
        if self.redelivery is not None:
            await self.redelivery.stop()
        if self.leases is not None:
            await self.leases.close()

    def changes(self) -> list[str]:
        """What redelivery needs and did not find."""
        return [
            f"AsyncpgBroker.{name}"
            for name in ("_notification_handler", "_read_conn")
            if not hasattr(self.broker, name)
        ]
