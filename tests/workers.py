"""Real `taskiq worker` processes for the broker tests, and what they record.

The worker serves ``tests.worker_app.app:broker``, configured through the
environment (see that module). Each test uses its own queue name; `producer`
imports the app afresh in the test process with the same settings, so the
test kicks through the same broker kind, and removes the queue afterwards.
"""

import asyncio
import contextlib
import importlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import redis.asyncio as redis

from tests.conftest import require_server

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379"
APP = "tests.worker_app.app"
RECEIVER = ("--receiver", "batchtask:BatchReceiver")
"""Worker flags that start the worker with batchtask's receiver."""

SERVERS = {
    "list": [("Redis", 6379)],
    "stream": [("Redis", 6379)],
    "rabbitmq": [("Redis", 6379), ("RabbitMQ", 5672)],
    "nats": [("Redis", 6379), ("NATS", 4222)],
    "postgres": [("Redis", 6379), ("PostgreSQL", 5432)],
    "cluster": [("Redis", 6379), ("Redis Cluster", 7001)],
    "sentinel": [("Redis", 6379), ("Redis Sentinel", 26379)],
}


def require_broker(kind: str) -> None:
    """Skip, or fail under CI=true, unless the servers `kind` needs answer."""
    for name, port in SERVERS[kind]:
        require_server(name, port)


def new_queue() -> str:
    return f"batchtask-test-{uuid.uuid4().hex[:8]}"


@contextmanager
def app_env(queue: str, **settings: str) -> Iterator[dict[str, str]]:
    """The environment that configures the app, also set in this process."""
    env = dict(os.environ)
    env.update({"BATCHTASK_QUEUE": queue, **settings})
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield env
    finally:
        os.environ.clear()
        os.environ.update(saved)


_logs: dict[int, str] = {}


def worker_log(worker: subprocess.Popen[bytes]) -> str:
    return Path(_logs[worker.pid]).read_text(errors="replace")


def start_worker(env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    """Start ``taskiq worker`` in its own process group; its log goes to a file."""
    # A file, not a pipe: an unread pipe would fill up and stall the worker.
    log = tempfile.NamedTemporaryFile(
        prefix="batchtask-worker-", suffix=".log", delete=False
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "taskiq", "worker", f"{APP}:broker", *extra],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _logs[worker.pid] = log.name
    return worker


def kill(worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker and its worker processes, whatever state they are in."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)


async def wait_exit(worker: subprocess.Popen[bytes], seconds: float = 60) -> int:
    """The worker's exit code; a hang becomes a failure after `seconds`."""
    return await asyncio.wait_for(asyncio.to_thread(worker.wait), timeout=seconds)


async def wait_listening(worker: subprocess.Popen[bytes]) -> str:
    """Wait until every worker process of `worker` listens; return the log."""
    text = ""
    for _ in range(600):
        text = worker_log(worker)
        if "Listening started" in text:
            return text
        if worker.poll() is not None:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"the worker never started listening:\n{text}")


@asynccontextmanager
async def producer(queue: str) -> AsyncIterator[ModuleType]:
    """The app imported in this process (environment from `app_env`), started."""
    sys.modules.pop(APP, None)
    app = importlib.import_module(APP)
    await app.broker.startup()
    if app.KIND == "cluster":
        # RedisStreamClusterBroker.startup() ends by closing its RedisCluster
        # client (`async with self.redis`). Hundreds of kicks at once on a
        # closed client race to set it up again; redis-py 8.1 then drops
        # connections under commands in flight and retries them: duplicate
        # XADDs (one message delivered twice), or a kick failing with
        # SendTaskError. Set the client up before any kick.
        await app.broker.redis.initialize()
    try:
        yield app
    finally:
        await app.broker.shutdown()
        await remove_queue(app, queue)
        sys.modules.pop(APP, None)


@asynccontextmanager
async def serving(
    queue: str,
    *flags: str,
    worker_only: dict[str, str] | None = None,
    **settings: str,
) -> AsyncIterator[tuple[subprocess.Popen[bytes], ModuleType]]:
    """One listening worker process (``--workers 1`` plus `flags`) serving the
    app configured by `settings` (and `worker_only`, such as a fault test's
    proxy addresses) on `queue`, and the app on the producer side; the
    worker is killed on the way out, whatever state it is in."""
    with app_env(queue, **settings, **(worker_only or {})) as env:
        worker = start_worker(env, "--workers", "1", *flags)
    try:
        await wait_listening(worker)
        with app_env(queue, **settings):
            async with producer(queue) as app:
                yield worker, app
    finally:
        kill(worker)


STREAM_KINDS = ("stream", "cluster", "sentinel")
"""The kinds whose queue is a Redis stream: on Redis, a Cluster, a Sentinel master."""

CLAIM_FLAGS = {
    "cluster": ("--receiver_arg", "idle_timeout=5000"),
    "sentinel": ("--receiver_arg", "idle_timeout=5000"),
}
"""BatchReceiver flags for the stream brokers without an ``idle_timeout``."""


def stream_client(kind: str) -> Any:
    """A client of the server holding the `kind` stream's keys (close it)."""
    if kind == "cluster":
        return redis.RedisCluster.from_url("redis://127.0.0.1:7001")
    if kind == "sentinel":
        return redis.Sentinel([("127.0.0.1", 26379)]).master_for("batchtask")
    return redis.from_url(REDIS_URL)


async def remove_queue(app: ModuleType, queue: str) -> None:
    """Delete the test's queue on its broker and its Redis keys.

    The list and stream kinds' queue is the key `queue` on Redis itself; the
    cluster and sentinel kinds' is that key in the cluster or on the master
    the Sentinel names (their results stay there until they expire).
    """
    client = redis.from_url(REDIS_URL)
    await client.delete(
        queue,
        f"{queue}:calls",
        f"{queue}:processed",
        f"{queue}:received",
        f"{queue}:tried",
        f"{queue}:retried",
        f"{queue}:spans",
    )
    await client.aclose()
    if app.KIND == "rabbitmq":
        import aio_pika

        connection = await aio_pika.connect(app.AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue)
            await channel.exchange_delete(queue)
    elif app.KIND == "nats":
        import nats

        client_nats = await nats.connect(app.NATS_URL)
        with contextlib.suppress(Exception):
            await client_nats.jetstream().delete_stream(queue)
        await client_nats.close()
    elif app.KIND == "cluster":
        cluster = redis.RedisCluster.from_url(app.CLUSTER_URL)
        try:
            await cluster.delete(queue)
        finally:
            await cluster.aclose()
    elif app.KIND == "sentinel":
        sentinel = redis.Sentinel([app.SENTINEL])
        try:
            async with sentinel.master_for(app.SENTINEL_MASTER) as master:
                await master.delete(queue)
        finally:
            for client_sentinel in sentinel.sentinels:
                await client_sentinel.aclose()
    elif app.KIND == "postgres":
        import asyncpg

        connection = await asyncpg.connect(app.PG_URL)
        try:
            await connection.execute(f"DROP TABLE IF EXISTS {app.PG_TABLE}")
        finally:
            await connection.close()


async def explain(
    queue: str,
    kind: str,
    total: int,
    workers: list[subprocess.Popen[bytes]],
    since: float | None = None,
) -> str:
    """Print what a stuck run holds: the items not processed, what the
    queue's consumers (and the fleet's inboxes, on Redis and RabbitMQ) still
    hold, the rows left in a PostgreSQL queue's table (and whose sessions are
    alive), what RabbitMQ's log said since `since`, and the end of each
    worker's log. A diagnosis only: it never raises. Returns its first lines
    in one (for an assertion's message, which CI shows whole)."""
    counts = await processed(queue)
    missing = sorted(set(range(total)) - set(counts))
    summary = [f"not processed: {len(missing)} of {total}, first {missing[:20]}"]
    print(summary[0])
    try:
        if kind in ("stream", "cluster", "sentinel"):
            await _explain_streams(queue, kind)
        elif kind == "postgres":
            await _explain_table(queue)
        elif kind == "rabbitmq":
            summary += _explain_amqp(queue)
    except Exception as exc:
        print(f"could not read what the broker holds: {exc!r}")
    if kind == "rabbitmq" and since is not None:
        summary += rabbitmq_trouble(since)
    for worker in workers:
        tail = worker_log(worker).splitlines()[-40:]
        print(f"--- worker {worker.pid} (exit {worker.poll()}):", *tail, sep="\n")
    return "; ".join(summary)


def _explain_amqp(queue: str) -> list[str]:
    """The RabbitMQ queues of `queue` (the queue, the fleet's inboxes): ready,
    unacknowledged, consumers."""
    found = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    lines = [
        "{} ready {} unacked {} consumers {}".format(*line.split()[:4])
        for line in found.stdout.splitlines()
        if queue in line and len(line.split()) >= 4
    ]
    print(*lines, sep="\n")
    return lines


RABBITMQ_LOGS = Path("/var/log/rabbitmq")
TROUBLE = ("channel exception", "alarm set", "resource limit")
"""What RabbitMQ logs when it closes a channel or holds publishers back."""


def rabbitmq_trouble(since: float) -> list[str]:
    """RabbitMQ's log lines since `since` (``time.time()``) that say it
    closed a channel or held publishers back, counted by text; [] where its
    log is not readable here."""
    counted: dict[str, int] = {}
    try:
        logs = [p for p in RABBITMQ_LOGS.glob("*.log") if "upgrade" not in p.name]
        for log in logs:
            with log.open(errors="replace") as lines:
                for line in lines:
                    if not any(text in line for text in TROUBLE) or not any(
                        level in line[:48] for level in ("[error]", "[warning]")
                    ):
                        continue
                    try:
                        at = datetime.fromisoformat(line.split(" [", 1)[0])
                    except ValueError:
                        continue
                    if at.timestamp() < since - 1:
                        continue
                    text = line.split("> ", 1)[-1].strip()
                    text = re.sub(r"batchtask-test-[0-9a-f]{8}", "<a test queue>", text)
                    counted[text] = counted.get(text, 0) + 1
    except OSError:
        return []
    found = [f"rabbitmq log: {n} x {text}" for text, n in counted.items()]
    print(*found, sep="\n")
    return found[:5]


async def _explain_streams(queue: str, kind: str) -> None:
    client = stream_client(kind)
    try:
        names = [queue]
        async for name in client.scan_iter(match=f"*{queue}*:batchtask:inbox:*"):
            names.append(name.decode() if isinstance(name, bytes) else name)
        for name in names:
            length = await client.xlen(name)
            pending = await client.xpending(name, queue)
            print(f"{name}: length {length}, pending {pending}")
    finally:
        await client.aclose()


async def _explain_table(queue: str) -> None:
    import asyncpg

    table = queue.replace("-", "_")
    connection = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        rows = await connection.fetch(
            f"SELECT id, status, created_at, message::json->'args'->>0 AS value "
            f"FROM {table} ORDER BY id LIMIT 40"
        )
        live = await connection.fetch(
            "SELECT pid, backend_start, state FROM pg_stat_activity "
            "WHERE datname = 'test'"
        )
    finally:
        await connection.close()
    print(f"{table}: {len(rows)} row(s) left (first 40):")
    for row in rows:
        print(f"  id {row['id']} value {row['value']}: {row['status']}")
    print("sessions on test:", ", ".join(f"{r['pid']} ({r['state']})" for r in live))


async def recorded_calls(queue: str) -> list[tuple[int, list[int]]]:
    """Every call of the batch function: (worker pid, its values)."""
    client = redis.from_url(REDIS_URL)
    raw = await client.lrange(f"{queue}:calls", 0, -1)
    await client.aclose()
    calls = []
    for entry in raw:
        pid, values = entry.decode().split(":")
        calls.append((int(pid), [int(v) for v in values.split(",") if v]))
    return calls


async def processed(queue: str) -> dict[int, int]:
    """How many calls included each item value."""
    client = redis.from_url(REDIS_URL)
    raw = await client.hgetall(f"{queue}:processed")
    await client.aclose()
    return {int(k): int(v) for k, v in raw.items()}


async def received(queue: str) -> int:
    """How many messages the workers' receivers started."""
    client = redis.from_url(REDIS_URL)
    value = await client.get(f"{queue}:received")
    await client.aclose()
    return int(value or 0)


async def until(
    check: Callable[[], Awaitable[bool]],
    seconds: float,
    what: str,
    *,
    every: float = 0.1,
    meanwhile: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Poll `check` until true; fail naming `what` after `seconds` (a hang)."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        if meanwhile is not None:
            await meanwhile()
        await asyncio.sleep(every)
