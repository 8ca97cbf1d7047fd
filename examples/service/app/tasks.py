"""The batch task: events in, one ``COPY`` per batch and table out.

The API sends one message per event (``await insert.kiq(event, table)``);
the worker calls `insert` once per batch of up to ``SERVICE_BATCH_SIZE``
events of one table, at the latest ``SERVICE_BATCH_TIMEOUT`` seconds after the
batch's first event. The asyncpg pool opens at worker startup and closes at
worker shutdown (`open_store`, `close_store`).
"""

import logging
import time

from taskiq import TaskiqDepends, TaskiqEvents, TaskiqState

from batchtask import batch_task

from .broker import broker
from .models import Event
from .settings import settings
from .store import EventStore

logger = logging.getLogger(__name__)


def store(state: TaskiqState = TaskiqDepends()) -> EventStore:
    """The worker's `EventStore`, opened by `open_store` (a taskiq dependency)."""
    event_store: EventStore = state.event_store
    return event_store


@batch_task(
    broker,
    batch_size=settings.batch_size,
    batch_timeout=settings.batch_timeout,
    retry_on_error=True,
)
async def insert(
    events: list[Event],
    table: str,
    db: EventStore = TaskiqDepends(store),
) -> int:
    """Write a batch of `table`'s events; returns the batch's size.

    Every event's result is that size. When a call raises (PostgreSQL went
    away), each of its events is sent again (``retry_on_error``, see
    `app.broker`) and joins a later batch; ids stored already are skipped.
    """
    started = time.perf_counter()
    written = await db.write(table, events)
    logger.info(
        "stored a batch of %d events in %s (%d duplicates) in %.1f ms",
        written.size,
        db.table_name(table),
        written.duplicates,
        (time.perf_counter() - started) * 1000,
    )
    return written.size


# Registered after `insert`: at worker shutdown, batchtask's own handler
# (registered by the decorator) first runs the batches still buffered, and only
# then does `close_store` close the pool they write through.
@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def open_store(state: TaskiqState) -> None:
    """Open this worker process's asyncpg pool."""
    state.event_store = await EventStore.open(
        settings.database_url, settings.table_prefix, settings.pool_size
    )


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def close_store(state: TaskiqState) -> None:
    """Close this worker process's asyncpg pool."""
    event_store: EventStore = state.event_store
    await event_store.close()
