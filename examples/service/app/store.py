"""The events' tables in PostgreSQL, written a batch at a time with ``COPY``."""

import logging
import os
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, cast

import asyncpg  # type: ignore[import-untyped]  # no type hints: see Pool below

from .models import Event

logger = logging.getLogger(__name__)

COLUMNS = ("id", "user_id", "kind", "value", "at")
"""The columns ``COPY`` fills, in the order of `Event`'s fields."""

_EVENTS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id uuid NOT NULL UNIQUE,
    user_id bigint NOT NULL,
    kind text NOT NULL,
    value double precision NOT NULL,
    at timestamptz NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now()
)
"""

_BATCHES_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id bigserial PRIMARY KEY,
    table_name text NOT NULL,
    size integer NOT NULL,
    duplicates integer NOT NULL,
    pid integer NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now()
)
"""

_INSERT_NEW = """
INSERT INTO {name} (id, user_id, kind, value, at)
SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[],
                     $4::double precision[], $5::timestamptz[])
ON CONFLICT (id) DO NOTHING
"""


class Connection(Protocol):
    """The part of ``asyncpg.Connection`` the store uses, typed."""

    def transaction(self) -> AbstractAsyncContextManager[object]:
        """A transaction, or a savepoint inside one."""
        ...

    async def execute(self, query: str, *args: object) -> str:
        """Run `query`; its status (``INSERT 0 12``)."""
        ...

    async def copy_records_to_table(
        self,
        table_name: str,
        *,
        records: Iterable[Sequence[object]],
        columns: Sequence[str],
    ) -> str:
        """``COPY`` `records` into `table_name`'s `columns`."""
        ...


class Pool(Protocol):
    """The part of ``asyncpg.Pool`` the store uses, typed."""

    def acquire(self) -> AbstractAsyncContextManager[Connection]:
        """A connection of the pool, back in it on the way out."""
        ...

    async def close(self) -> None:
        """Close every connection, once each is back."""
        ...


async def create_pool(dsn: str, size: int) -> Pool:
    """An asyncpg pool of up to `size` connections to `dsn`."""
    pool = await asyncpg.create_pool(  # pyright: ignore[reportUnknownMemberType]
        dsn, min_size=1, max_size=size
    )
    return cast(Pool, pool)


@dataclass(frozen=True)
class Written:
    """What one batch did to its table."""

    size: int
    """Events in the batch."""
    duplicates: int
    """Events whose id the table held already (not written again)."""


class EventStore:
    """One asyncpg pool and the tables it writes: ``<prefix>events_<table>``.

    Each batch is one transaction: a ``COPY`` of its rows and one row in
    ``<prefix>event_batches`` (its size, for the record). Ids are unique: a
    batch with an id the table holds already (a message the broker delivered
    again, a client that retried its POST) falls back to an
    ``INSERT ... ON CONFLICT DO NOTHING`` and counts the duplicates it skipped.
    """

    def __init__(self, pool: Pool, prefix: str) -> None:
        """Write through `pool`; see `open`."""
        self._pool = pool
        self._prefix = prefix
        self._ready: set[str] = set()
        self.batches_table = f"{prefix}event_batches"

    @classmethod
    async def open(cls, dsn: str, prefix: str, pool_size: int) -> "EventStore":
        """Connect a pool of `pool_size` connections; create the batch log table."""
        store = cls(await create_pool(dsn, pool_size), prefix)
        await store._create(store.batches_table, _BATCHES_TABLE)
        return store

    async def close(self) -> None:
        """Close the pool, once every connection is back."""
        await self._pool.close()

    def table_name(self, table: str) -> str:
        """The PostgreSQL table of the events of `table`."""
        return f"{self._prefix}events_{table}"

    async def write(self, table: str, events: Sequence[Event]) -> Written:
        """Store `events` in `table`'s table in one transaction."""
        name = self.table_name(table)
        if name not in self._ready:
            await self._create(name, _EVENTS_TABLE)
        rows = [(e.id, e.user_id, e.kind, e.value, e.at) for e in events]
        try:
            written = await self._write(name, rows)
        except asyncpg.UndefinedTableError:
            self._ready.discard(name)  # dropped meanwhile: created on the retry
            raise
        return Written(size=len(rows), duplicates=len(rows) - written)

    async def _write(self, name: str, rows: Sequence[tuple[object, ...]]) -> int:
        """Store `rows` in table `name` and log the batch; the rows written."""
        async with self._pool.acquire() as connection, connection.transaction():
            try:
                async with connection.transaction():  # a savepoint
                    await connection.copy_records_to_table(
                        name, records=rows, columns=COLUMNS
                    )
                written = len(rows)
            except asyncpg.UniqueViolationError:
                status = await connection.execute(
                    _INSERT_NEW.format(name=_quoted(name)),
                    *(list(column) for column in zip(*rows, strict=True)),
                )
                written = int(status.rsplit(" ", 1)[1])
            await connection.execute(
                f"INSERT INTO {_quoted(self.batches_table)}"
                " (table_name, size, duplicates, pid) VALUES ($1, $2, $3, $4)",
                name,
                len(rows),
                len(rows) - written,
                os.getpid(),
            )
        return written

    async def _create(self, name: str, ddl: str) -> None:
        """Create table `name` unless it exists (one process at a time)."""
        async with self._pool.acquire() as connection, connection.transaction():
            # CREATE TABLE IF NOT EXISTS races with itself across processes.
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)
            await connection.execute(ddl.format(name=_quoted(name)))
        self._ready.add(name)
        logger.info("table %s is ready", name)


def _quoted(name: str) -> str:
    """`name` as a PostgreSQL identifier."""
    return '"' + name.replace('"', '""') + '"'
