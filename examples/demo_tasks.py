"""The demo's broker and tasks: the same rows written one per task, or batched.

Imported by `demo.py` in-process (InMemoryBroker) or by a `taskiq worker`
process (``taskiq worker demo_tasks:broker --app-dir examples``), configured by
environment variables: DEMO_BROKER (empty for InMemoryBroker, or a redis://
URL), DEMO_DB (the SQLite file), DEMO_BATCH_SIZE, DEMO_BATCH_TIMEOUT.
"""

import os
import sqlite3
import threading

from pydantic import BaseModel
from taskiq import AsyncBroker, InMemoryBroker

from batchtask import batch_task

BROKER_URL = os.environ.get("DEMO_BROKER", "")
DB_PATH = os.environ.get("DEMO_DB", "demo.sqlite3")
BATCH_SIZE = int(os.environ.get("DEMO_BATCH_SIZE", "100"))
BATCH_TIMEOUT = float(os.environ.get("DEMO_BATCH_TIMEOUT", "0.5"))


class Row(BaseModel):
    id: int
    payload: str


def make_broker() -> AsyncBroker:
    if not BROKER_URL:
        return InMemoryBroker(max_stored_results=-1)
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

    backend: RedisAsyncResultBackend[object] = RedisAsyncResultBackend(
        BROKER_URL, result_ex_time=600
    )
    return ListQueueBroker(BROKER_URL, queue_name="batchtask-demo").with_result_backend(
        backend
    )


broker = make_broker()

# One connection, used by one thread at a time: the per-call cost batching removes
# is a durable commit on it.
_lock = threading.Lock()
_connection: sqlite3.Connection | None = None


def connect(path: str = DB_PATH) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


def create_tables(path: str = DB_PATH) -> None:
    with connect(path) as connection:
        connection.execute("DROP TABLE IF EXISTS events")
        connection.execute("DROP TABLE IF EXISTS calls")
        connection.execute("CREATE TABLE events (id INTEGER, mode TEXT, payload TEXT)")
        connection.execute("CREATE TABLE calls (mode TEXT, size INTEGER)")


def _write(mode: str, rows: list[Row]) -> None:
    global _connection
    with _lock:
        if _connection is None:
            _connection = connect()
        cursor = _connection.cursor()
        cursor.execute("BEGIN")
        cursor.executemany(
            "INSERT INTO events VALUES (?, ?, ?)",
            [(row.id, mode, row.payload) for row in rows],
        )
        cursor.execute("INSERT INTO calls VALUES (?, ?)", (mode, len(rows)))
        cursor.execute("COMMIT")


@broker.task(task_name="demo:insert_one")
def insert_one(row: Row) -> None:
    """Unbatched: one task, one INSERT, one commit per row."""
    _write("unbatched", [row])


@batch_task(
    broker,
    batch_size=BATCH_SIZE,
    batch_timeout=BATCH_TIMEOUT,
    task_name="demo:insert_many",
)
def insert_many(rows: list[Row]) -> int:
    """Batched: one call, one executemany, one commit per batch of rows."""
    _write("batched", rows)
    return len(rows)
