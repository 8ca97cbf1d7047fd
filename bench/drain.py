"""Worker drain rate: taskiq's own no-op task vs a batchtask no-op, real workers.

    .venv/bin/python bench/drain.py [--items 20000] [--rounds 3]
        [--brokers stream,rabbitmq,nats[,postgres]] [--json bench/results/drain.json]
        [--modes plain,batched,lean,plain_lock,batched_lock] [--profile DIR]

Never part of the test run. Needs Redis (127.0.0.1:6379, also the result
backend and the completion counter for every broker), and RabbitMQ
(127.0.0.1:5672, guest/guest), NATS JetStream (127.0.0.1:4222) and
PostgreSQL (127.0.0.1:5432, database ``test``) for those brokers; a missing
server, a worker that does not start, or a run that stops making progress
exits nonzero with a message.

``postgres`` (taskiq-postgres ``AsyncpgBroker``, a table and ``LISTEN``
channel of the run's own; named in ``--brokers``, not run by default) drains
only on ``--receiver batchtask:BatchReceiver`` workers: the prefilled rows'
``NOTIFY``s went out before any worker listened, so a stock worker never sees
them (modes without the receiver are skipped with a note), while
``BatchReceiver`` takes up the pending rows as it starts (`batchtask._postgres`).

Modes (one task registered per worker, the same for producer and worker):

- ``plain``: ``@broker.task async def noop(item: int) -> None``;
- ``batched``: ``@batch_task(broker, batch_size=100, batch_timeout=0.5)``
  ``async def noop_batch(items: list[int]) -> None``;
- ``lean`` (``stream`` only; skipped with a note for the other brokers): no
  taskiq worker but ``bench/lean.py``, a page of redis-py in 2 processes that
  reads the stream 100 messages at a time, parses them, stores their results
  in one pipeline and acks them with one XACK: how close a worker comes to a
  lean Python consumer of the same queue. Prefilled as ``batched``;
- ``plain_lock`` / ``batched_lock``: the same, but each *call* holds a
  process-wide ``asyncio.Lock`` for 2 ms (one DB connection, a rate-limited
  API): per item for plain, per batch for batched;
- ``plain_pg`` / ``batched_pg`` / ``batched_pg_many`` (named in ``--modes``;
  need PostgreSQL on 127.0.0.1:5432, database ``test``, and asyncpg): each
  worker process opens an asyncpg pool of 4 connections at startup; plain
  INSERTs one row per item, batched writes a batch with one COPY
  (``copy_records_to_table``) or one ``executemany`` INSERT. Each run gets its
  own table, counted (rows and distinct ids must equal N) and dropped after;
- not run unless named in ``--modes`` (``bench/run.py`` names
  ``batched_defaults`` for every broker): ``batched_defaults``, the batched
  task (batch_size 100) on a worker started *without* ``--receiver`` and
  with default flags (``--max-async-tasks 100``): what batching gives on a
  stock worker; ``batched_stock``, the same with ``--max-async-tasks 500``;
  and ``plain_async500``, ``plain`` with ``--max-async-tasks 500``; they
  separate the flag's and the receiver's effects from batching's;
  ``batched_solo`` (``--receiver_arg fleet=false``) and ``batched_unfrozen``
  (``--receiver_arg gc_freeze=false``): ``batched`` without fleet
  membership, or without its start-up heap frozen, to show what each costs
  or gives.

Every worker is ``taskiq worker drain:broker --workers 2`` with default flags
(INFO logging to a file included), plus ``--receiver batchtask:BatchReceiver``
for the batched modes (not for ``batched_defaults`` and ``batched_stock``,
which run on taskiq's stock receiver); ``lean`` is ``bench/lean.py --workers 2``
instead, writing the same result keys and values. Results go to taskiq-redis's
``RedisAsyncResultBackend`` for every broker. Brokers: ``stream``
(``RedisStreamBroker``), ``rabbitmq`` (``AioPikaBroker``, ``qos=1000``) and
``nats`` (``PullBasedJetStreamBroker``, ``pull_consume_batch=100``,
``max_ack_pending=5000``), each run on its own queue/stream/subject, deleted
afterwards with its result keys.

Method, per (broker, mode, round); rounds alternate the order of the modes:

1. Prefill: the producer (this process) sends N items to a fresh queue
   (``kiq_many(range(N))`` for batched modes and ``lean``, pipelined on Redis;
   concurrent ``kiq`` in chunks of 200 for plain) and checks the queue holds N
   messages.
2. Start the worker; it begins draining as soon as one of its two processes
   listens.
3. The measured window starts when *both* processes have logged "Listening
   started." (t0; the c0 items done by then are left out) and ends when the
   N-th item is done. Drain rate = (N - c0) / (t_end - t0). "Steady" is the
   rate between 10 % and 90 % of those items: no warm-up (first batch, first
   connections) and no tail (the last partial batches wait out
   ``batch_timeout``, one process may finish first).
   Worker CPU = user + sys of every process in the worker's process group
   (``/proc/<pid>/stat``) over the same window, divided by N - c0. The CPU of
   redis-server, beam.smp and nats-server ("server cores") and of everything
   else on the machine (``/proc/stat``, "other cores": other users' load) over
   the window are recorded too, to tell a slow run from a noisy machine.

Why this method and not "start on an empty queue, then prefill": the
producer would then share the 2 cores with the workers while they drain, and
for concurrent ``kiq`` (plain, and every mode on RabbitMQ and NATS) it is not
much faster than the drain, so the rate would partly be the producer's.
Timing from the worker's start would instead include interpreter start,
imports and broker startup (0.3 s on a quiet machine, seconds on a busy one,
and the two processes need not be ready together), which is not throughput.
Starting at "both listen" keeps a full queue and both consumers for the whole
window; c0 is 0 in nearly every run.

Completions are counted without adding a Redis round trip per item: each
call adds its number of items to a counter in the worker process, and a
background task there adds the counter to a Redis key every 10 ms; this
process polls the key every 10 ms. Every mode pays the same for it. An item
counts as done when its call returns; its result write and ack follow within
milliseconds (``lean`` counts a batch after its XACK).

The default run (3 rounds x 3 brokers x 4 modes, and ``lean`` on the stream;
20,000 items) takes about 7-8 minutes on the 2-core machine; the lock-bound
``plain_lock`` runs (about 27 s each) are most of it.

``--profile DIR`` attaches ``py-spy record --nonblocking --format raw`` to
each worker process for the measured window (a profiled run's rate is not
representative), writes the collapsed stacks to DIR and prints the CPU share
and µs per item by activity, and the top functions by own samples.
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from taskiq import AsyncBroker, TaskiqEvents, TaskiqState

HERE = Path(__file__).resolve().parent
REDIS_URL = "redis://127.0.0.1:6379"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
NATS_URL = "nats://127.0.0.1:4222"

ENV_BROKER = "BENCH_DRAIN_BROKER"
ENV_QUEUE = "BENCH_DRAIN_QUEUE"
ENV_MODE = "BENCH_DRAIN_MODE"

BATCH_SIZE = 100
BATCH_TIMEOUT = 0.5
LOCK_SECONDS = 0.002
WORKERS = 2
FLUSH_EVERY = 0.01
POLL_EVERY = 0.01
PLAIN_KICK_CHUNK = 200
STARTUP_LIMIT = 90.0
STALL_LIMIT = 30.0
RESULT_EX_TIME = 900
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_POOL = 4

BROKERS = {
    "stream": "Redis stream (RedisStreamBroker)",
    "rabbitmq": "RabbitMQ (AioPikaBroker, qos=1000)",
    "nats": "NATS JetStream (PullBasedJetStreamBroker, pull batch 100)",
    "postgres": "PostgreSQL (taskiq-postgres AsyncpgBroker, LISTEN/NOTIFY)",
}
DEFAULT_BROKERS = ["stream", "rabbitmq", "nats"]
SERVERS = {
    "stream": [("Redis", 6379)],
    "rabbitmq": [("Redis", 6379), ("RabbitMQ", 5672)],
    "nats": [("Redis", 6379), ("NATS", 4222)],
    "postgres": [("Redis", 6379), ("PostgreSQL", 5432)],
}


@dataclass(frozen=True)
class Mode:
    """One way of draining: which task, its work, and the worker's extra flags.

    work: ``noop``; ``lock`` (2 ms under a process-wide lock per call);
    ``pg`` (PostgreSQL: one INSERT per item, or one COPY per batch);
    ``pg_many`` (one ``executemany`` INSERT per batch). lean: drained by
    ``bench/lean.py`` instead of a taskiq worker (``flags`` unused).
    """

    batched: bool
    flags: tuple[str, ...]
    work: str = "noop"
    lean: bool = False

    @property
    def lock(self) -> bool:
        """Whether each call holds the process-wide lock."""
        return self.work == "lock"


RECEIVER = ("--receiver", "batchtask:BatchReceiver")
MODES = {
    "plain": Mode(batched=False, flags=()),
    "batched": Mode(batched=True, flags=RECEIVER),
    # The same receiver out of its fleet: what fleet membership costs.
    "batched_solo": Mode(
        batched=True, flags=(*RECEIVER, "--receiver_arg", "fleet=false")
    ),
    # The same receiver without its start-up heap frozen: what freezing gives.
    "batched_unfrozen": Mode(
        batched=True, flags=(*RECEIVER, "--receiver_arg", "gc_freeze=false")
    ),
    # Prefilled as batched (kiq_many of the batched task), drained by lean.py.
    "lean": Mode(batched=True, flags=(), lean=True),
    "plain_lock": Mode(batched=False, flags=(), work="lock"),
    "batched_lock": Mode(batched=True, flags=RECEIVER, work="lock"),
    "plain_pg": Mode(batched=False, flags=(), work="pg"),
    "batched_pg": Mode(batched=True, flags=RECEIVER, work="pg"),
    "batched_pg_many": Mode(batched=True, flags=RECEIVER, work="pg_many"),
    "batched_stock": Mode(batched=True, flags=("--max-async-tasks", "500")),
    "batched_defaults": Mode(batched=True, flags=()),
    "plain_async500": Mode(batched=False, flags=("--max-async-tasks", "500")),
}
DEFAULT_MODES = ["plain", "batched", "lean", "plain_lock", "batched_lock"]
LEAN_BROKERS = ["stream"]
"""Brokers lean.py can drain (it speaks the Redis stream protocol only)."""
PG_MODES = ["plain_pg", "batched_pg", "batched_pg_many"]


class DrainError(Exception):
    """A run that could not be measured (a server, a worker, a stall)."""


# --- the app: the same code builds the worker's broker and the producer's ---


class Completions:
    """What this worker process finished, added to a Redis hash every 10 ms.

    Fields: ``items`` (items done), ``calls`` (function calls) and ``lock_s``
    (seconds the calls held the lock, waiting for it not included).
    """

    def __init__(self, key: str, url: str = REDIS_URL) -> None:
        """Count into the Redis hash `key` on the server at `url`."""
        self.key = key
        self.url = url
        self.items = 0
        self.calls = 0
        self.lock_s = 0.0
        self._flusher: asyncio.Task[None] | None = None

    def add(self, items: int, lock_s: float = 0.0) -> None:
        """Record one call of `items` items (no I/O)."""
        self.items += items
        self.calls += 1
        self.lock_s += lock_s

    async def start(self, state: TaskiqState) -> None:
        """Start the flusher (a WORKER_STARTUP handler)."""
        self._flusher = asyncio.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        client = redis.from_url(self.url)
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            if self.calls:
                items, calls, lock_s = self.items, self.calls, self.lock_s
                self.items, self.calls, self.lock_s = 0, 0, 0.0
                async with client.pipeline(transaction=False) as pipe:
                    pipe.hincrby(self.key, "items", items)
                    pipe.hincrby(self.key, "calls", calls)
                    pipe.hincrbyfloat(self.key, "lock_s", lock_s)
                    await pipe.execute()


class Rows:
    """A PostgreSQL table of the run, written through a small asyncpg pool.

    The pool (``PG_POOL`` connections per worker process) opens at worker
    startup, before the measured window.
    """

    def __init__(self, table: str) -> None:
        """Write to `table` (created and dropped by the benchmark)."""
        self.table = table
        self.pool: Any = None

    async def start(self, state: TaskiqState) -> None:
        """Open the pool (a WORKER_STARTUP handler)."""
        import asyncpg

        self.pool = await asyncpg.create_pool(
            PG_DSN, min_size=PG_POOL, max_size=PG_POOL
        )

    async def insert_one(self, item: int) -> None:
        """One INSERT for one item."""
        await self.pool.execute(
            f"INSERT INTO {self.table} (id, payload) VALUES ($1, $2)",
            item,
            f"item {item}",
        )

    async def copy(self, items: list[int]) -> None:
        """One COPY for a batch."""
        await self.pool.copy_records_to_table(
            self.table,
            records=[(item, f"item {item}") for item in items],
            columns=["id", "payload"],
        )

    async def insert_many(self, items: list[int]) -> None:
        """One executemany INSERT for a batch."""
        await self.pool.executemany(
            f"INSERT INTO {self.table} (id, payload) VALUES ($1, $2)",
            [(item, f"item {item}") for item in items],
        )


def table_name(queue: str) -> str:
    """The run's PostgreSQL table."""
    return queue.replace("-", "_")


def broker_table(queue: str) -> str:
    """The ``postgres`` broker's table and channel (not the rows' table)."""
    return f"{table_name(queue)}_messages"


def drains_on(kind: str, mode_name: str) -> bool:
    """Whether `mode_name` can drain a prefilled queue of `kind`."""
    mode = MODES[mode_name]
    if mode.lean:
        return kind in LEAN_BROKERS
    return kind != "postgres" or "batchtask:BatchReceiver" in mode.flags


async def held(lock: asyncio.Lock) -> float:
    """Hold `lock` for LOCK_SECONDS; return how long it was actually held."""
    async with lock:
        began = time.perf_counter()
        await asyncio.sleep(LOCK_SECONDS)
        return time.perf_counter() - began


def make_broker(kind: str, queue: str) -> AsyncBroker:
    """A broker of `kind` on its own queue, with Redis results."""
    from taskiq_redis import RedisAsyncResultBackend

    backend: RedisAsyncResultBackend[object] = RedisAsyncResultBackend(
        REDIS_URL, result_ex_time=RESULT_EX_TIME
    )
    broker: AsyncBroker
    if kind == "stream":
        from taskiq_redis import RedisStreamBroker

        # consumer_id="0": the group (created by whichever side starts first)
        # reads the stream from its beginning, so a prefilled stream drains.
        broker = RedisStreamBroker(
            REDIS_URL, queue_name=queue, consumer_group_name=queue, consumer_id="0"
        )
    elif kind == "rabbitmq":
        from taskiq_aio_pika import AioPikaBroker, Exchange, Queue

        broker = AioPikaBroker(
            AMQP_URL,
            qos=1000,
            exchange=Exchange(name=queue),
            task_queues=[Queue(name=queue)],
            dead_letter_queue=Queue(name=f"{queue}.dead"),
        )
    elif kind == "nats":
        from nats.js.api import ConsumerConfig, StreamConfig
        from taskiq_nats import PullBasedJetStreamBroker

        broker = PullBasedJetStreamBroker(
            NATS_URL,
            subject=queue,
            stream_name=queue,
            durable=queue,
            stream_config=StreamConfig(name=queue, subjects=[queue]),
            consumer_config=ConsumerConfig(durable_name=queue, max_ack_pending=5000),
            pull_consume_batch=100,
            pull_consume_timeout=0.5,
        )
    elif kind == "postgres":
        from taskiq_pg.asyncpg import AsyncpgBroker

        broker = AsyncpgBroker(
            dsn=PG_DSN,
            channel_name=broker_table(queue),
            table_name=broker_table(queue),
        )
    else:
        raise DrainError(f"unknown broker {kind!r}; choose from {', '.join(BROKERS)}")
    return broker.with_result_backend(backend)


def build_app(kind: str, queue: str, mode_name: str) -> tuple[AsyncBroker, Any]:
    """The broker for one run and the one task `mode_name` drains."""
    from batchtask import batch_task

    mode = MODES[mode_name]
    broker = make_broker(kind, queue)
    done = Completions(f"{queue}:done")
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, done.start)
    lock = asyncio.Lock()
    task: Any
    rows = Rows(table_name(queue))
    if mode.work.startswith("pg"):
        broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, rows.start)
    if mode.batched and mode.work.startswith("pg"):
        # One COPY ("pg") or one executemany INSERT ("pg_many") per batch.
        write = rows.copy if mode.work == "pg" else rows.insert_many
        name = "b:pg" if mode.work == "pg" else "b:pm"

        @batch_task(
            broker, batch_size=BATCH_SIZE, batch_timeout=BATCH_TIMEOUT, task_name=name
        )
        async def write_batch(items: list[int]) -> None:
            await write(items)
            done.add(len(items))

        task = write_batch
    elif mode.work == "pg":

        @broker.task(task_name="p:pg")
        async def insert(item: int) -> None:
            await rows.insert_one(item)
            done.add(1)

        task = insert
    elif mode.batched and mode.lock:

        @batch_task(
            broker, batch_size=BATCH_SIZE, batch_timeout=BATCH_TIMEOUT, task_name="b:nl"
        )
        async def noop_batch_lock(items: list[int]) -> None:
            done.add(len(items), await held(lock))

        task = noop_batch_lock
    elif mode.batched:

        @batch_task(
            broker, batch_size=BATCH_SIZE, batch_timeout=BATCH_TIMEOUT, task_name="b:n"
        )
        async def noop_batch(items: list[int]) -> None:
            done.add(len(items))

        task = noop_batch
    elif mode.lock:

        @broker.task(task_name="p:nl")
        async def noop_lock(item: int) -> None:
            done.add(1, await held(lock))

        task = noop_lock
    else:

        @broker.task(task_name="p:n")
        async def noop(item: int) -> None:
            done.add(1)

        task = noop
    return broker, task


if os.environ.get(ENV_QUEUE):
    # Imported by `taskiq worker drain:broker`, configured by the environment.
    broker, _task = build_app(
        os.environ[ENV_BROKER], os.environ[ENV_QUEUE], os.environ[ENV_MODE]
    )


# --- servers, queues, processes ---


def require_pg() -> None:
    """Exit with a message unless PostgreSQL answers and asyncpg is installed."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        raise SystemExit(
            "drain.py: the PostgreSQL modes need asyncpg: ./scripts/bench installs it"
        ) from None
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        raise SystemExit(
            "drain.py: PostgreSQL not reachable on 127.0.0.1:5432"
        ) from None


def require_servers(kinds: list[str]) -> None:
    """Exit with a message unless every server the brokers need answers."""
    missing = set()
    for kind in kinds:
        for name, port in SERVERS[kind]:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except OSError:
                missing.add(f"{name} (127.0.0.1:{port}, needed by {kind})")
    if missing:
        raise SystemExit(
            "drain.py: server not reachable: " + "; ".join(sorted(missing))
        )


async def queued(kind: str, queue: str) -> int:
    """How many messages wait in the queue of the run."""
    if kind == "stream":
        client = redis.from_url(REDIS_URL)
        try:
            return int(await client.xlen(queue))
        finally:
            await client.aclose()
    if kind == "rabbitmq":
        import aio_pika

        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
    if kind == "postgres":
        import asyncpg

        connection = await asyncpg.connect(PG_DSN)
        try:
            return int(
                await connection.fetchval(
                    f"SELECT count(*) FROM {broker_table(queue)} "
                    "WHERE status = 'pending'"
                )
            )
        finally:
            await connection.close()
    import nats

    client_nats = await nats.connect(NATS_URL)
    try:
        info = await client_nats.jetstream().stream_info(queue)
        return int(info.state.messages)
    finally:
        await client_nats.close()


async def remove_queue(kind: str, queue: str, task_ids: list[str]) -> None:
    """Delete the run's queue, its counter and its results."""
    client = redis.from_url(REDIS_URL)
    try:
        await client.delete(queue, f"{queue}:done")
        for start in range(0, len(task_ids), 1000):
            await client.unlink(*task_ids[start : start + 1000])
    finally:
        await client.aclose()
    if kind == "rabbitmq":
        import aio_pika

        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue)
            await channel.queue_delete(f"{queue}.dead")
            await channel.exchange_delete(queue)
    elif kind == "nats":
        import nats

        client_nats = await nats.connect(NATS_URL)
        try:
            with contextlib.suppress(Exception):
                await client_nats.jetstream().delete_stream(queue)
        finally:
            await client_nats.close()
    elif kind == "postgres":
        import asyncpg

        connection = await asyncpg.connect(PG_DSN)
        try:
            await connection.execute(f"DROP TABLE IF EXISTS {broker_table(queue)}")
        finally:
            await connection.close()


async def prefill(kind: str, queue: str, mode_name: str, items: int) -> list[str]:
    """Send `items` items to the run's queue; return their task ids."""
    producer, task = build_app(kind, queue, mode_name)
    await producer.startup()
    try:
        if MODES[mode_name].batched:
            sent = await task.kiq_many(range(items))
        else:
            sent = []
            for first in range(0, items, PLAIN_KICK_CHUNK):
                chunk = range(first, min(first + PLAIN_KICK_CHUNK, items))
                sent += await asyncio.gather(*(task.kiq(i) for i in chunk))
    finally:
        await producer.shutdown()
    return [each.task_id for each in sent]


def start_worker(
    kind: str, queue: str, mode_name: str, log: Path
) -> subprocess.Popen[bytes]:
    """``taskiq worker drain:broker`` (or lean.py) in its own process group.

    Its output goes to `log`.
    """
    env = dict(os.environ)
    env.update({ENV_BROKER: kind, ENV_QUEUE: queue, ENV_MODE: mode_name})
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    mode = MODES[mode_name]
    command = [sys.executable]
    if mode.lean:
        command += [str(HERE / "lean.py"), queue, "--workers", str(WORKERS)]
        command += ["--redis", REDIS_URL, "--result-ex", str(RESULT_EX_TIME)]
        command += ["--flush-every", str(FLUSH_EVERY)]
    else:
        command += ["-m", "taskiq", "worker", "drain:broker"]
        command += ["--workers", str(WORKERS), *mode.flags]
    with log.open("wb") as out:  # a file, not a pipe that could fill up
        return subprocess.Popen(
            command,
            cwd=HERE,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill(worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's whole process group and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(timeout=30)


SERVER_PROCESSES = ("redis-server", "beam.smp", "nats-server", "postgres")
"""Server process names (/proc/<pid>/comm): Redis, RabbitMQ, NATS, PostgreSQL."""


def server_pids() -> list[int]:
    """The pids of the local Redis, RabbitMQ, NATS and PostgreSQL servers."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() in SERVER_PROCESSES:
                    pids.append(int(entry.name))
    return pids


def group_pids(pgid: int) -> list[int]:
    """Every live process whose process group is `pgid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by `pids` (their threads included)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def log_tail(log: Path, lines: int = 25) -> str:
    """The last `lines` lines of a worker log, for an error message."""
    text = log.read_text(errors="replace").splitlines()
    return "\n".join(["--- worker log (tail) ---", *text[-lines:]])


class LogWatcher:
    """Counts "Listening started." lines as a worker log grows."""

    def __init__(self, log: Path) -> None:
        """Watch `log` from its start."""
        self.log = log
        self.offset = 0
        self.partial = b""
        self.listening = 0

    def poll(self) -> int:
        """Read what was appended; return how many processes listen so far."""
        with self.log.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        self.listening += sum(b"Listening started" in line for line in lines)
        return self.listening


@dataclass
class Profiler:
    """py-spy attached to each worker process for the measured window."""

    out_dir: Path
    label: str
    spies: list[subprocess.Popen[bytes]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def attach(self, pids: list[int]) -> None:
        """Start ``py-spy record`` on every pid."""
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if spy is None:
            raise DrainError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for pid in pids:
            path = self.out_dir / f"{self.label}-{pid}.txt"
            self.files.append(path)
            command = [spy, "record", "--pid", str(pid), "--rate", "250"]
            command += ["--format", "raw", "--nonblocking", "--output", str(path)]
            self.spies.append(
                subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )

    def stop(self) -> None:
        """SIGINT every py-spy (it writes its output then) and wait for it."""
        for spy in self.spies:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)
        for spy in self.spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()


# --- one measured run ---


async def measure(
    kind: str, mode_name: str, items: int, profile_dir: Path | None
) -> dict[str, Any]:
    """Prefill, start the worker, time the drain; the run's raw numbers."""
    queue = f"bench-drain-{uuid.uuid4().hex[:10]}"
    counter = f"{queue}:done"
    task_ids: list[str] = []
    worker: subprocess.Popen[bytes] | None = None
    profiler = None
    log = Path(tempfile.gettempdir()) / f"{queue}.log"
    client = redis.from_url(REDIS_URL)
    failed = True
    try:
        began = time.perf_counter()
        task_ids = await prefill(kind, queue, mode_name, items)
        prefill_s = time.perf_counter() - began
        waiting = await queued(kind, queue)
        if waiting != items:
            raise DrainError(f"prefill left {waiting} messages queued, not {items}")

        if MODES[mode_name].work.startswith("pg"):
            await pg_table(table_name(queue), create=True)
        started = time.perf_counter()
        worker = start_worker(kind, queue, mode_name, log)
        watcher = LogWatcher(log)
        pids: list[int] = []
        while True:
            listening = watcher.poll()
            if listening and not pids:
                pids = group_pids(worker.pid)
            if listening >= WORKERS:
                break
            if worker.poll() is not None:
                raise DrainError(f"the worker exited ({worker.returncode}) at startup")
            if time.perf_counter() - started > STARTUP_LIMIT:
                raise DrainError(f"the worker did not listen within {STARTUP_LIMIT} s")
            await asyncio.sleep(POLL_EVERY)
        done_at_start = int(await client.hget(counter, "items") or 0)
        servers = server_pids()  # again: the workers' PostgreSQL backends too
        t0 = time.perf_counter()
        machine0 = machine_busy_seconds()
        servers0 = cpu_seconds(servers)
        pids = group_pids(worker.pid)
        cpu0 = cpu_seconds(pids)
        startup_s = t0 - started
        if profile_dir is not None:
            profiler = Profiler(profile_dir, f"{kind}-{mode_name}")
            profiler.attach([pid for pid in pids if pid != worker.pid])

        samples = [(0.0, done_at_start)]
        last_change = t0
        while samples[-1][1] < items:
            await asyncio.sleep(POLL_EVERY)
            done = int(await client.hget(counter, "items") or 0)
            now = time.perf_counter()
            if done != samples[-1][1]:
                last_change = now
            samples.append((now - t0, done))
            if worker.poll() is not None:
                raise DrainError(f"the worker exited ({worker.returncode}) mid-run")
            if now - last_change > STALL_LIMIT:
                raise DrainError(
                    f"no progress for {STALL_LIMIT} s: {done} of {items} items done"
                )
        cpu1 = cpu_seconds(pids)
        machine1 = machine_busy_seconds()
        servers1 = cpu_seconds(servers)
        elapsed = samples[-1][0]
        if profiler is not None:
            profiler.stop()
        failed = False
    finally:
        if profiler is not None and failed:
            profiler.stop()
        if worker is not None:
            kill(worker)
        final = {
            k.decode(): float(v) for k, v in (await client.hgetall(counter)).items()
        }
        await client.aclose()
        await remove_queue(kind, queue, task_ids)
        rows = None
        if MODES[mode_name].work.startswith("pg"):
            rows = await pg_table(table_name(queue), create=False)
        if failed and log.exists():
            print(log_tail(log), file=sys.stderr)
        log.unlink(missing_ok=True)

    measured = items - done_at_start
    worker_cpu = cpu1 - cpu0
    calls = final.get("calls", 0.0)
    step = max(1, len(samples) // 60)
    return {
        "broker": kind,
        "mode": mode_name,
        "items": items,
        "prefill_s": prefill_s,
        "startup_s": startup_s,
        "done_at_t0": done_at_start,
        "drain_s": elapsed,
        "items_per_s": measured / elapsed,
        "steady_items_per_s": steady_rate(samples, done_at_start, items),
        "worker_cpu_s": worker_cpu,
        "cpu_us_per_item": worker_cpu / measured * 1e6,
        "worker_cores": worker_cpu / elapsed,
        "server_cores": (servers1 - servers0) / elapsed,
        "other_cores": (machine1 - machine0 - worker_cpu - (servers1 - servers0))
        / elapsed,
        "worker_pids": len(pids),
        "done_final": int(final.get("items", 0)),
        "calls": int(calls),
        "mean_call_size": final.get("items", 0.0) / calls if calls else None,
        "mean_lock_hold_ms": (
            final.get("lock_s", 0.0) / calls * 1e3
            if calls and MODES[mode_name].lock
            else None
        ),
        "pg_rows": rows,
        "profiled": profiler is not None,
        "profile_files": [str(p) for p in profiler.files] if profiler else [],
        "progress": [[round(t, 3), c] for t, c in samples[::step] + samples[-1:]],
    }


async def pg_table(table: str, *, create: bool) -> tuple[int, int] | None:
    """Create the run's table, or count its (rows, distinct ids) and drop it."""
    import asyncpg

    connection = await asyncpg.connect(PG_DSN)
    try:
        if create:
            await connection.execute(
                f"CREATE TABLE {table} (id integer NOT NULL, payload text NOT NULL)"
            )
            return None
        counted = await connection.fetchrow(
            f"SELECT count(*) AS n, count(DISTINCT id) AS d FROM {table}"
        )
        await connection.execute(f"DROP TABLE {table}")
        return (int(counted["n"]), int(counted["d"]))
    finally:
        await connection.close()


def steady_rate(samples: list[tuple[float, int]], start: int, items: int) -> float:
    """Items/s between 10 % and 90 % of the items left at t0 (no warm-up, no tail)."""
    left = items - start
    low = next((t, c) for t, c in samples if c >= start + 0.1 * left)
    high = next((t, c) for t, c in samples if c >= start + 0.9 * left)
    if high[0] <= low[0]:
        return left / samples[-1][0]
    return (high[1] - low[1]) / (high[0] - low[0])


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent busy so far (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(value) for value in fields[:8]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


# --- profile summary ---

# A sample's activity: the first rule whose pattern occurs anywhere in its
# stack (py-spy raw frames read "Class.function (package/file.py:line)", root
# first). redis-py sends and reads through helper tasks (asyncio.wait_for,
# shield), whose stacks no longer show the caller: that part is "redis I/O".
ACTIVITIES = [
    ("logging (taskiq's INFO line per message)", r"\(logging/"),
    ("result backend set_result", r"\.set_result \(taskiq_redis/"),
    ("ack", r"_ack \(taskiq_redis/|AckController\.ack \(|\.ack \((aio_pika|nats)/"),
    ("broker listen / fetch", r"\.listen \(taskiq_(redis|aio_pika|nats)/"),
    ("message parse (formatter.loads, labels)", r"\.(loads|parse_labels) \(taskiq/"),
    ("receiver: params, dependencies", r"parse_params \(|\(taskiq_dependencies/"),
    (
        "BatchReceiver: a batch's results, one pipeline",
        r"write \(batchtask/(_grouping|brokers/redis_stream)",
    ),
    ("BatchReceiver: a batch's acks, one XACK", r"xack \(batchtask/brokers/_redis"),
    (
        "batchtask (bind, validate, batch, fan-out)",
        r"\(batchtask/_(task|batcher|signature|outcomes|lifecycle)",
    ),
    ("receiver: callback, run_task, prefetch", r"\(taskiq/(?!cli/|__main__)"),
    ("redis I/O in redis-py's helper tasks", r"\(redis/"),
    ("aio-pika / aiormq / nats I/O", r"\((aio_pika|aiormq|pamqp|nats)/"),
    ("completion counter (this benchmark)", r"_flush_forever \("),
    ("event loop (select, callbacks)", r"\(asyncio/|\(selectors\.py"),
]
# Where a sample's own (leaf) frame lives.
LAYERS = [
    ("redis-py", r"\(redis/"),
    ("asyncio + selectors", r"\(asyncio/|\(selectors\.py"),
    ("taskiq", r"\(taskiq/(?!cli/|__main__)"),
    ("taskiq_redis, taskiq_aio_pika, taskiq_nats", r"\(taskiq_(redis|aio_pika|nats)/"),
    ("aio-pika / aiormq / pamqp / nats-py", r"\((aio_pika|aiormq|pamqp|nats)/"),
    ("pydantic", r"\(pydantic"),
    ("logging", r"\(logging/"),
    ("batchtask", r"\(batchtask/"),
]
# Inclusive shares worth a line of their own.
HIGHLIGHTS = [
    ("Redis() client object built per command", r"Redis\.__init__ \(redis/asyncio/"),
    ("pydantic (anywhere in the stack)", r"\(pydantic"),
]


def first_match(rules: list[tuple[str, re.Pattern[str]]], text: str) -> str:
    """The name of the first rule whose pattern occurs in `text`, or "other"."""
    return next((name for name, rx in rules if rx.search(text)), "other")


def summarize_profile(paths: list[str], cpu_us_per_item: float) -> list[str]:
    """Lines: CPU share and µs/item by activity and layer; top own-time functions."""
    activities: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    highlights: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    rules = [(name, re.compile(rx)) for name, rx in ACTIVITIES]
    layer_rules = [(name, re.compile(rx)) for name, rx in LAYERS]
    highlight_rules = [(name, re.compile(rx)) for name, rx in HIGHLIGHTS]
    for path in paths:
        with contextlib.suppress(OSError), Path(path).open(errors="replace") as raw:
            for line in raw:
                stack, _, count_text = line.rstrip("\n").rpartition(" ")
                if not stack or not count_text.isdigit():
                    continue
                count = int(count_text)
                frames = stack.split(";")
                whole = ";".join(frames)

                activities[first_match(rules, whole)] += count
                layers[first_match(layer_rules, frames[-1])] += count
                for name, rx in highlight_rules:
                    if rx.search(whole):
                        highlights[name] += count
                functions[re.sub(r":\d+\)$", ")", frames[-1])] += count
    total = sum(activities.values())
    if not total:
        return ["  (no samples)"]

    def rows(counts: Counter[str]) -> list[str]:
        return [
            f"    {name:46} {count / total:6.1%} {count / total * cpu_us_per_item:6.0f}"
            for name, count in counts.most_common()
        ]

    return [
        f"  {total} samples (on-CPU only), {cpu_us_per_item:.0f} µs CPU per item",
        "  by activity, first match in the stack (share, µs/item):",
        *rows(activities),
        "  by layer of the sampled (innermost) frame:",
        *rows(layers),
        "  inclusive:",
        *rows(highlights),
        "  top functions by own samples:",
        *(f"    {n / total:6.1%}  {name}" for name, n in functions.most_common(10)),
    ]


# --- the whole benchmark ---


def ratio(rates: dict[str, list[float]], top: str, bottom: str) -> float | None:
    """median(top) / median(bottom), when both were measured."""
    if not rates.get(top) or not rates.get(bottom):
        return None
    return statistics.median(rates[top]) / statistics.median(rates[bottom])


def round_ratios(runs: list[dict[str, Any]], top: str, bottom: str) -> list[float]:
    """Items/s of `top` / `bottom` within each round that measured both."""
    by_round: dict[tuple[str, int], float] = {
        (run["mode"], run["round"]): run["items_per_s"] for run in runs
    }
    return [
        by_round[(top, number)] / by_round[(bottom, number)]
        for mode, number in sorted(by_round)
        if mode == top and (bottom, number) in by_round
    ]


LEGEND = """
items/s: (N - items done before both worker processes listened) / (time from
then to the last item); steady: the same between 10 % and 90 % of those items.
CPU µs/item: user+sys CPU of the worker's process group per item, same window.
cores: average cores busy in the window: the worker; the servers (redis-server,
beam.smp, nats-server, postgres); everything else on the machine (other load).
call size: mean items per function call; lock ms: mean time a call held the
lock; start: worker start to both processes listening. Medians over rounds.
Ratios: of the medians; "rounds": the lowest and highest ratio within a round.
lean: bench/lean.py, redis-py alone (XREADGROUP 100, one pipeline of results
and one XACK per batch) in 2 processes, draining the same stream.
"""


def table(kind: str, runs: list[dict[str, Any]], modes: list[str]) -> list[str]:
    """The printed table of one broker: medians over its rounds, and ratios."""
    mine = [run for run in runs if run["broker"] == kind and not run["profiled"]]
    if not mine:
        return []
    items = mine[0]["items"]
    rounds = max(Counter(run["mode"] for run in mine).values())
    lines = [
        f"{BROKERS[kind]}: {items} items, {rounds} rounds, {WORKERS} worker processes",
        f"  {'mode':16} {'items/s median (min-max)':>27} {'steady':>7}"
        f" {'CPU µs/item':>11} {'worker':>6} {'server':>6} {'other':>5}"
        f" {'call':>5} {'lock':>5} {'start':>5}",
        f"  {'':16} {'':>27} {'10-90%':>7} {'':>11} {'cores':>6} {'cores':>6}"
        f" {'cores':>5} {'size':>5} {'ms':>5} {'s':>5}",
    ]
    rates: dict[str, list[float]] = {}
    steadies: dict[str, list[float]] = {}

    def median(these: list[dict[str, Any]], key: str) -> float:
        values = [run[key] for run in these if run[key] is not None]
        return statistics.median(values) if values else float("nan")

    for mode in modes:
        these = [run for run in mine if run["mode"] == mode]
        if not these:
            continue
        rate = rates[mode] = [run["items_per_s"] for run in these]
        steadies[mode] = [run["steady_items_per_s"] for run in these]
        spread = f"({min(rate):,.0f}-{max(rate):,.0f})"
        lock = median(these, "mean_lock_hold_ms")
        lock_text = "-" if lock != lock else f"{lock:.1f}"
        lines.append(
            f"  {mode:16} {statistics.median(rate):>8,.0f} {spread:>18}"
            f" {statistics.median(steadies[mode]):>7,.0f}"
            f" {median(these, 'cpu_us_per_item'):>11,.0f}"
            f" {median(these, 'worker_cores'):>6.2f}"
            f" {median(these, 'server_cores'):>6.2f}"
            f" {median(these, 'other_cores'):>5.2f}"
            f" {median(these, 'mean_call_size'):>5.0f} {lock_text:>5}"
            f" {median(these, 'startup_s'):>5.1f}"
        )
    for top, bottom, note in [
        ("batched", "plain", ""),
        ("batched", "lean", " (batchtask worker vs a lean redis-py consumer)"),
        ("plain", "lean", " (taskiq's own task vs a lean redis-py consumer)"),
        ("batched_lock", "plain_lock", ""),
        ("batched_lock", "batched", " (2 ms lock per batch vs the no-op ceiling)"),
        ("batched_pg", "plain_pg", " (COPY per batch vs INSERT per item)"),
        ("batched_pg_many", "plain_pg", " (executemany per batch vs INSERT per item)"),
        ("batched_defaults", "plain", " (batch task, no --receiver, default flags)"),
        ("batched_defaults", "batched", " (no --receiver vs BatchReceiver)"),
        ("batched_stock", "batched", " (stock receiver, --max-async-tasks 500)"),
        ("plain_async500", "plain", " (--max-async-tasks 500 vs default 100)"),
        ("batched", "plain_async500", " (BatchReceiver vs plain at 500 tasks)"),
    ]:
        value = ratio(rates, top, bottom)
        if value is not None:
            paired = round_ratios(mine, top, bottom)
            rounds_text = (
                f", rounds {min(paired):.2f}-{max(paired):.2f}x" if paired else ""
            )
            lines.append(
                f"  {top} / {bottom}: {value:.2f}x "
                f"(steady {ratio(steadies, top, bottom):.2f}x{rounds_text}){note}"
            )
    odd = [
        f"{run['mode']} round {run['round']}: {run['done_final']} done"
        for run in mine
        if run["done_final"] != run["items"]
    ]
    odd += [
        f"{run['mode']} round {run['round']}: table has {run['pg_rows']} "
        "(rows, distinct ids)"
        for run in mine
        if run.get("pg_rows") is not None
        and tuple(run["pg_rows"]) != (run["items"], run["items"])
    ]
    if odd:
        lines.append(f"  completions != {items} (redelivery?): " + "; ".join(odd))
    late = [run for run in mine if run["done_at_t0"] > run["items"] / 4]
    if late:
        lines.append(
            f"  note: {len(late)} run(s) had > 25% done before both processes "
            "listened (a slow second process); their window is short"
        )
    return lines


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="worker drain rate: plain taskiq no-op vs batchtask no-op"
    )
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--brokers",
        default=",".join(DEFAULT_BROKERS),
        help=f"comma-separated, of {', '.join(BROKERS)}",
    )
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES))
    parser.add_argument("--json", type=Path, default=HERE / "results" / "drain.json")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="attach py-spy to the workers, write stacks to DIR, print a summary",
    )
    args = parser.parse_args()
    args.brokers = [b for b in args.brokers.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    for kind in args.brokers:
        if kind not in BROKERS:
            parser.error(f"unknown broker {kind!r}; choose from {', '.join(BROKERS)}")
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if args.items < BATCH_SIZE or args.rounds < 1:
        parser.error(f"--items must be >= {BATCH_SIZE} and --rounds >= 1")
    return args


async def main() -> int:
    """Run every (round, broker, mode), print the tables, write the JSON."""
    args = parse_args()
    require_servers(args.brokers)
    if any(MODES[mode].work.startswith("pg") for mode in args.modes):
        require_pg()
    runs: list[dict[str, Any]] = []
    error = None
    for kind in args.brokers:
        skipped = [m for m in args.modes if MODES[m].lean and kind not in LEAN_BROKERS]
        if skipped:
            print(
                f"note: {', '.join(skipped)} skipped for {kind}: lean.py reads "
                f"only a Redis stream ({', '.join(LEAN_BROKERS)})",
                flush=True,
            )
        stock = [m for m in args.modes if not MODES[m].lean and not drains_on(kind, m)]
        if stock:
            print(
                f"note: {', '.join(stock)} skipped for {kind}: a worker without "
                "BatchReceiver never sees rows notified before it listened",
                flush=True,
            )
    began = time.perf_counter()
    try:
        for round_ in range(args.rounds):
            for kind in args.brokers:
                order = args.modes if round_ % 2 == 0 else args.modes[::-1]
                for mode in order:
                    if not drains_on(kind, mode):
                        continue
                    error = f"{kind} {mode} round {round_ + 1}"
                    run = await measure(kind, mode, args.items, args.profile)
                    run["round"] = round_ + 1
                    runs.append(run)
                    print(progress_line(run, time.perf_counter() - began), flush=True)
        error = None
    except DrainError as exc:
        error = f"{error}: {exc}"
    except Exception as exc:
        traceback.print_exc()
        error = f"{error}: {type(exc).__name__}: {exc}"
    total = time.perf_counter() - began
    print(LEGEND)
    for kind in args.brokers:
        lines = table(kind, runs, args.modes)
        if lines:
            print("\n".join(lines), end="\n\n")
    if args.profile is not None:
        for run in runs:
            print(f"profile {run['broker']} {run['mode']} round {run['round']}:")
            lines = summarize_profile(run["profile_files"], run["cpu_us_per_item"])
            print("\n".join(lines))
    print(f"total time {total:.0f} s")
    write_json(args, runs, total, error)
    if error is not None:
        print(f"drain.py: FAILED: {error}", file=sys.stderr)
        return 1
    return 0


def progress_line(run: dict[str, Any], since_start: float) -> str:
    """One line per finished run, printed as the benchmark goes."""
    return (
        f"[{since_start:4.0f} s] round {run['round']} "
        f"{run['broker']:8} {run['mode']:16} {run['items_per_s']:7,.0f} items/s, "
        f"{run['cpu_us_per_item']:4,.0f} µs/item CPU, "
        f"calls of {run['mean_call_size'] or 0:.0f}, "
        f"servers {run['server_cores']:.2f} cores, "
        f"other load {run['other_cores']:.2f} cores, "
        f"startup {run['startup_s']:.1f} s, {run['done_at_t0']} done before t0"
    )


def write_json(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    total: float,
    error: str | None,
) -> None:
    """Write the settings and every run's raw numbers to ``--json``."""
    import taskiq

    try:
        from importlib.metadata import version

        versions = {
            name: version(name)
            for name in ("taskiq", "taskiq-redis", "taskiq-aio-pika", "taskiq-nats")
        }
    except Exception:
        versions = {"taskiq": getattr(taskiq, "__version__", "?")}
    report = {
        "command": sys.argv,
        "error": error,
        "settings": {
            "items": args.items,
            "rounds": args.rounds,
            "brokers": args.brokers,
            "modes": args.modes,
            "workers": WORKERS,
            "batch_size": BATCH_SIZE,
            "batch_timeout": BATCH_TIMEOUT,
            "lock_seconds": LOCK_SECONDS,
            "worker_flags": {mode: list(MODES[mode].flags) for mode in args.modes},
            "lean_brokers": LEAN_BROKERS,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "total_s": total,
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"raw numbers: {args.json}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
