"""Call limits across a fleet: one writer per key on every machine at once.

Two ``taskiq worker --workers 2`` commands (two machines of two processes)
serve ``app:one_writer`` (``max_concurrent_calls_per_key=1``, 50 ms calls)
on one Redis stream under `BatchReceiver`. Each call lists its start and end
(one machine, one clock); no two calls of one key may overlap. With
``--receiver_arg fleet=false`` the limit holds per process only, and the run
prints how often calls of one key overlapped then (the reference).
"""

import asyncio
import itertools
import os
from collections import defaultdict

import pytest
import redis.asyncio as redis

from tests.faults import Proxy
from tests.workers import (
    RECEIVER,
    REDIS_URL,
    app_env,
    explain,
    kill,
    new_queue,
    processed,
    producer,
    require_broker,
    start_worker,
    until,
    wait_listening,
    worker_log,
)

pytestmark = pytest.mark.workers

KEYS = 10
PER_KEY = 20
SETTINGS = {
    "BATCHTASK_BROKER": "stream",
    "BATCHTASK_BATCH_SIZE": "5",
    "BATCHTASK_BATCH_TIMEOUT": "0.2",
    "BATCHTASK_REDELIVER_AFTER": "5",
    "BATCHTASK_FLEET_TASKS": "1",
}


async def listed(queue: str) -> list[tuple[str, float, float, str, str, str]]:
    """Each call as ``app:one_writer`` lists it: key, start, end (or when it
    was stopped), pid, values, and whether it was done or stopped."""
    client = redis.from_url(REDIS_URL)
    try:
        raw = await client.lrange(f"{queue}:spans", 0, -1)
    finally:
        await client.aclose()
    calls = []
    for entry in raw:
        key, start, end, pid, values, how = entry.decode().split(":")
        calls.append((key, float(start), float(end), pid, values, how))
    return calls


async def spans(queue: str) -> list[tuple[str, float, float, str]]:
    """Each call: its key, start, end (or when it was stopped) and values."""
    return [(k, s, e, values) for k, s, e, _, values, _ in await listed(queue)]


def overlaps(calls: list[tuple[str, float, float, str]]) -> int:
    """Calls that started while an earlier call of their key still ran."""
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, start, end, _ in calls:
        by_key[key].append((start, end))
    found = 0
    for runs in by_key.values():
        runs.sort()
        latest_end = -1.0
        for start, end in runs:
            if start < latest_end:
                found += 1
            latest_end = max(latest_end, end)
    return found


async def run_fleet(
    *flags: str, kill_one: bool = False, kind: str = "stream"
) -> dict[str, object]:
    """Two machines of two processes; traffic of KEYS keys, interleaved.

    With `kill_one`, the first machine is SIGKILLed halfway through the
    traffic, while calls run.
    """
    queue = new_queue()
    settings = {**SETTINGS, "BATCHTASK_BROKER": kind}
    with app_env(queue, **settings) as env:
        machines = [
            start_worker(env, "--workers", "2", *RECEIVER, *flags) for _ in range(2)
        ]
    try:
        for machine in machines:
            await wait_listening(machine)
        with app_env(queue, **settings):
            async with producer(queue) as app:
                tasks = []
                for round_ in range(PER_KEY):
                    for key in range(KEYS):
                        value = round_ * KEYS + key
                        tasks.append(await app.one_writer.kiq(value, f"k{key}"))
                    await asyncio.sleep(0.02)
                    if kill_one and round_ == PER_KEY // 2:
                        running = len(await spans(queue))
                        kill(machines[0])

                async def all_processed() -> bool:
                    return len(await processed(queue)) >= KEYS * PER_KEY

                try:
                    await until(all_processed, 120, "every item processed")
                except AssertionError:
                    await explain(queue, kind, KEYS * PER_KEY, machines)
                    raise
                await asyncio.sleep(1.0)  # a late call would show now
                calls = await spans(queue)
                counts = await processed(queue)
                results = [await t.wait_result(timeout=60) for t in tasks]
                log = worker_log(machines[1])
    finally:
        for machine in machines:
            kill(machine)
    return {
        "calls": calls,
        "counts": counts,
        "results": results,
        "log": log,
        "calls_before_kill": running if kill_one else None,
    }


@pytest.mark.parametrize("kind", ["stream", "postgres", "rabbitmq", "nats"])
async def test_one_writer_per_key_holds_across_two_machines(kind: str) -> None:
    """Leases on the stream's server; on PostgreSQL, in a table; on RabbitMQ,
    on the Redis of its result backend."""
    require_broker(kind)
    fleet = await run_fleet(kind=kind)
    per_process = await run_fleet("--receiver_arg", "fleet=false", kind=kind)
    calls, counts = fleet["calls"], fleet["counts"]
    assert isinstance(calls, list)
    assert isinstance(counts, dict)
    reference = per_process["calls"]
    assert isinstance(reference, list)
    print(
        f"one writer per key on {kind}, 2 machines x 2 processes, "
        f"{KEYS} keys x {PER_KEY}: "
        f"fleet: {len(calls)} calls, {overlaps(calls)} overlapping; per process "
        f"(fleet=false): {len(reference)} calls, {overlaps(reference)} overlapping"
    )
    assert overlaps(calls) == 0
    assert counts == dict.fromkeys(range(KEYS * PER_KEY), 1), "each item once"
    results = fleet["results"]
    assert isinstance(results, list)
    assert [r.return_value for r in results] == [2 * v for v in range(KEYS * PER_KEY)]


@pytest.mark.parametrize("kind", ["stream", "postgres", "rabbitmq"])
async def test_one_writer_per_key_holds_when_a_machine_is_killed(kind: str) -> None:
    """One machine SIGKILLed mid-traffic: its leases expire (on PostgreSQL its
    session ends, and its locks with it), its items come back (claimed once
    idle; on PostgreSQL its rows are handed out again); still no two calls of
    one key at once, nothing lost."""
    require_broker(kind)
    fleet = await run_fleet(kill_one=True, kind=kind)
    calls, counts = fleet["calls"], fleet["counts"]
    assert isinstance(calls, list)
    assert isinstance(counts, dict)
    print(
        f"one writer per key on {kind}, a machine killed halfway through the traffic "
        f"({fleet['calls_before_kill']} calls done by then): {len(calls)} calls, "
        f"{overlaps(calls)} overlapping, {sum(counts.values())} runs of "
        f"{KEYS * PER_KEY} items"
    )
    assert overlaps(calls) == 0
    assert sorted(counts) == list(range(KEYS * PER_KEY)), "nothing lost"


def server_port(kind: str) -> int:
    """The port of broker `kind`'s server."""
    return 5432 if kind == "postgres" else 6379


def proxied_url(proxy: Proxy, kind: str) -> str:
    """Broker `kind`'s URL through `proxy`."""
    if kind == "postgres":
        return proxy.url("postgresql", "postgres@") + "/test"
    return proxy.url("redis")


async def stopped_and_done(queue: str) -> list[tuple[str, float, float, str, str]]:
    """Each call: its pid, start, end, values, and done or stopped."""
    return [(p, s, e, v, how) for _, s, e, p, v, how in await listed(queue)]


@pytest.mark.parametrize("kind", ["stream", "postgres"])
async def test_a_holder_cut_off_from_the_server_stops_its_call_in_time(
    kind: str,
) -> None:
    """A holder that cannot renew stops its call before the slot can pass on.

    Worker A (behind a proxy) runs an 8 s call of key k holding its lease;
    the proxy then cuts A off from Redis. A cannot renew: it stops its call
    before the lease can expire on the server. Worker B, started then, gets
    the slot only after that, runs A's items again (claimed once idle) and
    its own; no two calls of k overlap, nothing is lost.
    """
    require_broker(kind)
    queue = new_queue()
    settings = {**SETTINGS, "BATCHTASK_BROKER": kind, "BATCHTASK_WRITE_SECONDS": "8"}
    async with Proxy(server_port(kind)) as proxy:
        through = {"BATCHTASK_BROKER_URL": proxied_url(proxy, kind)}
        with app_env(queue, **settings, **through) as env:
            cut_off = start_worker(env, "--workers", "1", *RECEIVER)
        other = None
        try:
            await wait_listening(cut_off)
            with app_env(queue, **settings):
                async with producer(queue) as app:
                    first = [await app.one_writer.kiq(v, "k") for v in range(5)]
                    await asyncio.sleep(1.0)  # A's call of 0..4 runs (8 s)
                    proxy.refuse(60)
                    with app_env(
                        queue, **{**settings, "BATCHTASK_WRITE_SECONDS": "0.5"}
                    ) as env:
                        other = start_worker(env, "--workers", "1", *RECEIVER)
                    await wait_listening(other)
                    second = [await app.one_writer.kiq(v, "k") for v in range(5, 10)]

                    async def all_processed() -> bool:
                        return len(await processed(queue)) >= 10

                    await until(all_processed, 90, "every item processed by B")
                    calls = await stopped_and_done(queue)
                    results = [await t.wait_result(timeout=60) for t in first + second]
                    log = worker_log(cut_off)
        finally:
            kill(cut_off)
            if other is not None:
                kill(other)
    zero = min(start for _, start, _, _, _ in calls)
    print(
        "a holder cut off (s from its call's start): "
        + "; ".join(
            f"pid {pid} {how} {start - zero:.1f}-{end - zero:.1f} [{values}]"
            for pid, start, end, values, how in sorted(calls, key=lambda c: c[1])
        )
    )
    runs = sorted((start, end) for _, start, end, _, _ in calls)
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(runs)), "no overlap"
    stopped = [call for call in calls if call[4] == "stopped"]
    assert len(stopped) == 1, "A's call was stopped"
    assert stopped[0][2] - stopped[0][1] < 6, "well before its 8 s were up"
    assert [r.return_value for r in results] == [2 * v for v in range(10)]
    assert "could not be kept" in log


@pytest.mark.parametrize("kind", ["stream", "postgres"])
async def test_a_call_is_not_made_without_its_lease(kind: str) -> None:
    """The server stops answering worker A while it holds a batch: A waits a
    lease's lifetime, then gives the batch back unmade (a warning); worker B
    claims the items once idle and runs each once."""
    require_broker(kind)
    queue = new_queue()
    settings = {**SETTINGS, "BATCHTASK_BROKER": kind, "BATCHTASK_BATCH_TIMEOUT": "2"}
    async with Proxy(server_port(kind)) as proxy:
        through = {"BATCHTASK_BROKER_URL": proxied_url(proxy, kind)}
        with app_env(queue, **settings, **through) as env:
            cut_off = start_worker(env, "--workers", "1", *RECEIVER)
        other = None
        try:
            await wait_listening(cut_off)
            with app_env(queue, **settings):
                async with producer(queue) as app:
                    tasks = [await app.one_writer.kiq(v, "k") for v in range(3)]
                    await asyncio.sleep(1.0)  # buffered in A, its batch not due
                    proxy.refuse(60)
                    with app_env(queue, **settings) as env:
                        other = start_worker(env, "--workers", "1", *RECEIVER)
                    await wait_listening(other)

                    async def all_processed() -> bool:
                        return len(await processed(queue)) >= 3

                    await until(all_processed, 90, "every item processed by B")

                    async def a_gave_up() -> bool:
                        return "has not answered" in worker_log(cut_off)

                    await until(a_gave_up, 60, "A giving its batch back")
                    await asyncio.sleep(1.0)
                    calls = await stopped_and_done(queue)
                    groups = {os.getpgid(int(pid)) for pid, *_ in calls}
                    counts = await processed(queue)
                    results = [await t.wait_result(timeout=60) for t in tasks]
                    log = worker_log(cut_off)
        finally:
            kill(cut_off)
            if other is not None:
                kill(other)
    print(
        f"no lease: A warned {log.count('has not answered')} time(s); "
        f"{len(calls)} call(s), all by B: {groups == {other.pid}}"
    )
    assert "has not answered" in log
    assert groups == {other.pid}, "A made no call; B made them all"
    assert all(how == "done" for *_, how in calls)
    assert counts == {0: 1, 1: 1, 2: 1}
    assert [r.return_value for r in results] == [0, 2, 4]
