"""examples/service/ end to end: real API and worker processes on the local servers.

The API (uvicorn) and the worker (``taskiq worker ... --receiver
batchtask:BatchReceiver``) run as `examples/service/run` starts them, on a
free port, a private Redis stream and private PostgreSQL tables
(``service_<hex>_*``). The first test posts 10,000 events over HTTP and checks
that each is stored exactly once; the second runs the `run` script itself and
stops it as a Ctrl-C in its terminal would.
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import require_server
from tests.workers import until

pytestmark = pytest.mark.workers

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "examples" / "service"
REDIS_URL = "redis://127.0.0.1:6379"
DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"

EVENTS = 10_000
CLIENTS = 16
CONNECTIONS = 4
"""Requests in flight at once: `CONNECTIONS` on each of `CLIENTS` clients.

Not one client with 64 connections: httpx's connection pool spends time
quadratic in its waiting requests, which made the client, not the service,
the bottleneck (88 instead of 309 events/s on the 2-core development machine).
"""
CONCURRENCY = CLIENTS * CONNECTIONS
BATCH_SIZE = 500
HANG = 120.0
"""Seconds after which waiting for the stored events is a hang, not slowness."""

WORKER = [
    "-m",
    "taskiq",
    "worker",
    "app.broker:broker",
    "app.tasks",
    "--receiver",
    "batchtask:BatchReceiver",
    "--workers",
    "2",
]
"""The worker as `examples/service/run` starts it (with this interpreter)."""


def api_command(port: int) -> list[str]:
    """The API as `examples/service/run` starts it, on `port`."""
    return ["-m", "uvicorn", "app.api:app", "--host", "127.0.0.1", "--port", str(port)]


@pytest.fixture(autouse=True)
def _servers() -> None:
    require_server("Redis", 6379)
    require_server("PostgreSQL", 5432)


@dataclass
class Names:
    """One test's private stream and tables, and the environment naming them."""

    stream: str
    prefix: str

    @property
    def events_table(self) -> str:
        return f"{self.prefix}events_clicks"

    @property
    def batches_table(self) -> str:
        return f"{self.prefix}event_batches"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": REDIS_URL,
            "DATABASE_URL": DATABASE_URL,
            "SERVICE_STREAM": self.stream,
            "SERVICE_TABLE_PREFIX": self.prefix,
            "SERVICE_BATCH_SIZE": str(BATCH_SIZE),
            "SERVICE_RESULT_TTL": "600",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }


@pytest.fixture
async def names() -> AsyncIterator[Names]:
    """Private names; their tables, stream and result keys are removed after."""
    tag = uuid.uuid4().hex[:8]
    found = Names(stream=f"service-test-{tag}", prefix=f"service_{tag}_")
    try:
        yield found
    finally:
        connection = await asyncpg.connect(DATABASE_URL)
        try:
            await connection.execute(
                f'DROP TABLE IF EXISTS "{found.events_table}", "{found.batches_table}"'
            )
        finally:
            await connection.close()
        client = redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(f"{found.stream}:*", 1000)]
            for start in range(0, len(keys), 1000):
                await client.delete(*keys[start : start + 1000])
            await client.delete(
                found.stream, f"autoclaim:{found.stream}:{found.stream}"
            )
        finally:
            await client.aclose()


def _default_interrupts() -> None:
    """In the child: SIGINT and SIGQUIT back to their default actions."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


class Process:
    """A subprocess in its own session, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        # A file, not a pipe: an unread pipe would fill up and stall it.
        with tempfile.NamedTemporaryFile(
            prefix=f"service-{name}-", suffix=".log", delete=False
        ) as log:
            self.log = Path(log.name)
            self.popen = subprocess.Popen(
                args,
                cwd=SERVICE,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # As a terminal starts it: a suite started in the background
                # (``cmd &`` without job control) ignores SIGINT, which a
                # child would inherit and bash could then not trap.
                preexec_fn=_default_interrupts,
            )
        self.name = name
        self.pid = self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def session(self) -> list[int]:
        """Every live process of its session (the `run` script's children too)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                # "pid (comm) state ppid pgrp session ...": comm may hold spaces.
                fields = stat.read_text().rpartition(")")[2].split()
                if int(fields[3]) == self.pid and fields[0] != "Z":
                    found.append(int(stat.parent.name))
        return found

    def kill(self) -> None:
        """SIGKILL it and every process of its session, whatever their state."""
        for pid in self.session():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=30)

    async def stop(self, signum: int = signal.SIGINT, *, group: bool = False) -> int:
        """Send `signum` (to its process group with `group`); its exit code."""
        if group:
            os.killpg(self.pid, signum)
        else:
            self.popen.send_signal(signum)
        deadline = time.monotonic() + 60
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not stop:\n{self.text()}")
            await asyncio.sleep(0.1)
        return self.popen.returncode


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Processes a test starts, killed on the way out; a log is kept unless its
    process exited with status 0."""
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()
        if process.popen.returncode == 0:
            process.log.unlink(missing_ok=True)
        else:
            print(f"{process.name} log kept: {process.log}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def listening(process: Process, workers: int) -> None:
    """Wait until `workers` worker processes of `process` listen."""

    async def check() -> bool:
        if process.popen.poll() is not None:
            raise AssertionError(f"{process.name} exited:\n{process.text()}")
        return process.text().count("Listening started") >= workers

    await until(check, 60, f"{process.name} to listen")


async def answering(client: httpx.AsyncClient, process: Process) -> None:
    """Wait until the API answers ``GET /health``."""

    async def check() -> bool:
        if process.popen.poll() is not None:
            raise AssertionError(f"{process.name} exited:\n{process.text()}")
        try:
            return (await client.get("/health")).status_code == 200
        except httpx.TransportError:
            return False

    await until(check, 60, f"{process.name} to answer")


def event(i: int) -> dict[str, Any]:
    """Event number `i` as the API takes it, with a fresh id."""
    return {
        "table": "clicks",
        "id": str(uuid.uuid4()),
        "user_id": i,
        "kind": "click",
        "value": i / 10,
        "at": datetime.now(UTC).isoformat(),
    }


async def concurrently(
    base_url: str, work: Callable[[httpx.AsyncClient], Awaitable[None]]
) -> None:
    """`work` on `CLIENTS` clients of `CONNECTIONS` connections, each used
    `CONNECTIONS` times at once (`CONCURRENCY` requests in flight)."""

    async def run_client() -> None:
        limits = httpx.Limits(max_connections=CONNECTIONS)
        async with httpx.AsyncClient(
            base_url=base_url, limits=limits, timeout=30
        ) as client:
            await asyncio.gather(*(work(client) for _ in range(CONNECTIONS)))

    await asyncio.gather(*(run_client() for _ in range(CLIENTS)))


async def post_all(base_url: str, events: list[dict[str, Any]]) -> list[str]:
    """POST each event to ``/events``, `CONCURRENCY` at a time; their task ids."""
    pending = iter(events)
    task_ids: list[str] = []

    async def poster(client: httpx.AsyncClient) -> None:
        for body in pending:
            answer = await client.post("/events", json=body)
            assert answer.status_code == 202, answer.text
            task_ids.append(answer.json()["task_id"])

    await concurrently(base_url, poster)
    return task_ids


async def health_rate(base_url: str, requests: int) -> float:
    """Requests/s of ``GET /health`` (no work) through clients like `post_all`'s.

    The reference for the posting rate: what the HTTP layer alone takes.
    """
    left = iter(range(requests))

    async def getter(client: httpx.AsyncClient) -> None:
        for _ in left:
            answer = await client.get("/health")
            assert answer.status_code == 200, answer.text

    started = time.perf_counter()
    await concurrently(base_url, getter)
    return requests / (time.perf_counter() - started)


async def stored(names: Names) -> tuple[list[uuid.UUID], list[tuple[int, int, int]]]:
    """The stored event ids and the batch log: (size, duplicates, worker pid)."""
    connection = await asyncpg.connect(DATABASE_URL)
    try:
        rows = await connection.fetch(f'SELECT id FROM "{names.events_table}"')
        batches = await connection.fetch(
            f'SELECT size, duplicates, pid FROM "{names.batches_table}" ORDER BY id'
        )
    finally:
        await connection.close()
    return [row["id"] for row in rows], [tuple(row) for row in batches]


async def count_rows(names: Names) -> int:
    connection = await asyncpg.connect(DATABASE_URL)
    try:
        exists = await connection.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", names.events_table
        )
        if not exists:
            return 0
        count: int = await connection.fetchval(
            f'SELECT count(*) FROM "{names.events_table}"'
        )
        return count
    finally:
        await connection.close()


async def stream_state(names: Names, task_ids: list[str]) -> tuple[int, int, int]:
    """Messages in the stream, of them unacknowledged, and results stored."""
    client = redis.from_url(REDIS_URL)
    try:
        length = await client.xlen(names.stream)
        pending = (await client.xpending(names.stream, names.stream))["pending"]
        results = 0
        for start in range(0, len(task_ids), 1000):
            chunk = task_ids[start : start + 1000]
            results += await client.exists(*(f"{names.stream}:{t}" for t in chunk))
        return length, pending, results
    finally:
        await client.aclose()


def describe(sizes: list[int]) -> str:
    common = ", ".join(f"{n}x{size}" for size, n in Counter(sizes).most_common(6))
    return (
        f"{len(sizes)} batches, sizes min {min(sizes)} / "
        f"mean {sum(sizes) / len(sizes):.1f} / max {max(sizes)}; most common: {common}"
    )


async def test_10000_events_posted_over_http_are_stored_exactly_once(
    names: Names, processes: list[Process]
) -> None:
    port = free_port()
    worker = Process("worker", [sys.executable, *WORKER], names.env())
    processes.append(worker)
    api = Process("api", [sys.executable, *api_command(port)], names.env())
    processes.append(api)
    await listening(worker, workers=2)
    base_url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base_url) as client:
        await answering(client, api)
    events = [event(i) for i in range(EVENTS)]

    started = time.perf_counter()
    task_ids = await post_all(base_url, events)
    posted = time.perf_counter() - started

    async def all_stored() -> bool:
        if worker.popen.poll() is not None:
            raise AssertionError(f"the worker exited:\n{worker.text()}")
        return await count_rows(names) >= EVENTS

    await until(all_stored, HANG, f"{EVENTS} events in the table", every=0.2)
    done = time.perf_counter() - started
    reference = await health_rate(base_url, EVENTS // 5)
    # Graceful stops: the worker acks what it stored, the API closes its broker.
    assert await worker.stop() == 0, worker.text()
    assert await api.stop() == 0, api.text()

    ids, batches = await stored(names)
    sizes = [size for size, _, _ in batches]
    per_pid = Counter(pid for _, _, pid in batches)
    length, pending, results = await stream_state(names, task_ids)
    print(
        f"\nservice: {EVENTS} events over HTTP, {CONCURRENCY} requests at a time\n"
        f"  posted: {EVENTS / posted:7.0f} events/s  ({posted:.2f} s)\n"
        f"  GET /health, same clients, same run: {reference:7.0f} requests/s "
        "(the HTTP layer alone)\n"
        f"  stored: {EVENTS / done:7.0f} events/s  ({done:.2f} s from the first "
        f"POST to the last row)\n"
        f"  {describe(sizes)}\n"
        f"  batches per worker process: {sorted(per_pid.values())}"
    )

    posted_ids = {uuid.UUID(body["id"]) for body in events}
    assert len(ids) == EVENTS, f"{len(ids)} rows for {EVENTS} events"
    assert len(set(ids)) == EVENTS, "an event is stored twice"
    assert set(ids) == posted_ids, "the stored ids are not the posted ones"
    assert len(set(task_ids)) == EVENTS, "each POST queued its own task"
    assert sum(sizes) == EVENTS, f"batches wrote {sum(sizes)} events, not {EVENTS}"
    assert sum(d for _, d, _ in batches) == 0, "a batch met an id stored already"
    assert max(sizes) <= BATCH_SIZE
    assert len(batches) < EVENTS / 10, "events were written in batches"
    assert (length, pending) == (EVENTS, 0), "one message per event, every one acked"
    assert results == EVENTS, "every event's result is stored"


async def test_ctrl_c_stops_the_run_script_after_storing_what_was_buffered(
    names: Names, processes: list[Process]
) -> None:
    # A batch timeout far longer than the test: only the shutdown flush can
    # store these events in time.
    env = names.env(
        SERVICE_NO_INSTALL="1",
        PORT=str(free_port()),
        WORKERS="1",
        SERVICE_BATCH_TIMEOUT="25",
    )
    run = Process("run", ["bash", str(SERVICE / "run")], env)
    processes.append(run)
    await listening(run, workers=1)
    events = [event(i) for i in range(20)]
    retried = events[0]  # a client that POSTs an event again: stored once
    base_url = f"http://127.0.0.1:{env['PORT']}"
    async with httpx.AsyncClient(base_url=base_url) as client:
        await answering(client, run)
    task_ids = await post_all(base_url, [*events, retried])

    async def buffered() -> bool:
        return (await stream_state(names, task_ids))[1] == len(task_ids)

    await until(buffered, 30, "the worker to read every event")
    assert await count_rows(names) == 0, "nothing is stored before the batch is due"

    stopping = time.monotonic()
    # What a terminal does on Ctrl-C: SIGINT to the foreground process group.
    assert await run.stop(signal.SIGINT, group=True) == 0, run.text()
    took = time.monotonic() - stopping
    assert run.session() == [], "the API and the worker are gone"
    ids, batches = await stored(names)
    assert sorted(ids) == sorted(uuid.UUID(body["id"]) for body in events)
    assert [(size, duplicates) for size, duplicates, _ in batches] == [(21, 1)]
    assert took < 20, f"stopping took {took:.1f} s: the batch waited for its timer"
    assert (await stream_state(names, task_ids))[1] == 0, "every event is acked"
    assert "run: stopping the API and the worker" in run.text()
