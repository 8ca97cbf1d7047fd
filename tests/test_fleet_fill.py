"""Batches that fill across a fleet as in one worker process.

The traffic of the fleets issue: ``app:one_writer`` (``batch_size=50``,
``batch_timeout=1.0``, ``max_concurrent_calls_per_key=1``, 50 ms calls), 40
keys of 50 items interleaved at about 500 items a second for 4 s, on one
Redis stream under `BatchReceiver`. One worker process makes batches of about
12.5 (each key brings 12.5 items a batch window); a fleet of two ``taskiq
worker --workers 2`` commands (two machines) made batches 0.29x as large
before, each process filling its own from a quarter of the traffic. Now
each delivery goes to the process that owns its key (`batchtask._fleet.Router`).
"""

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as redis

from tests.faults import Proxy
from tests.test_fleet_limits import listed, overlaps
from tests.workers import (
    CLAIM_FLAGS,
    RECEIVER,
    REDIS_URL,
    app_env,
    explain,
    kill,
    new_queue,
    processed,
    producer,
    rabbitmq_trouble,
    recorded_calls,
    require_broker,
    start_worker,
    stream_client,
    until,
    wait_listening,
    worker_log,
)

pytestmark = pytest.mark.workers

KEYS = 40
PER_KEY = 50
SETTINGS = {
    "BATCHTASK_BROKER": "stream",
    "BATCHTASK_BATCH_SIZE": "50",
    "BATCHTASK_BATCH_TIMEOUT": "1.0",
    "BATCHTASK_REDELIVER_AFTER": "5",
    "BATCHTASK_FLEET_TASKS": "1",
}


async def members(queue: str, kind: str = "stream") -> int:
    """How many worker processes are live members of `queue`'s fleet."""
    if kind == "rabbitmq":
        return await amqp_members(queue)
    if kind == "nats":
        return await nats_members(queue)
    client = stream_client(kind)
    try:
        now_ms = int(time.time() * 1000)
        key = f"{{{queue}}}:batchtask:members:{queue}"
        return int(await client.zcount(key, now_ms, "+inf"))
    finally:
        await client.aclose()


async def amqp_members(queue: str, listen: float = 1.5) -> int:
    """The members heard beating on `queue`'s fleet exchange for `listen` s."""
    import json

    import aio_pika

    heard: set[str] = set()
    connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            f"batchtask.fleet.{queue}",
            aio_pika.ExchangeType.FANOUT,
            durable=False,
            auto_delete=True,
        )
        beats = await channel.declare_queue(exclusive=True, auto_delete=True)
        await beats.bind(exchange)

        async def note(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            beat = json.loads(message.body)
            if not beat.get("left"):
                heard.add(beat["member"])

        await beats.consume(note, no_ack=True)
        await asyncio.sleep(listen)
    return len(heard)


async def nats_members(queue: str, listen: float = 1.5) -> int:
    """The members heard beating on `queue`'s fleet subjects for `listen` s."""
    import json

    import nats

    heard: set[str] = set()
    client = await nats.connect("nats://127.0.0.1:4222")
    try:

        async def note(message: Any) -> None:
            beat = json.loads(message.data)
            if not beat.get("left"):
                heard.add(beat["member"])

        await client.subscribe(f"batchtask.fleet.{queue}.*", cb=note)
        await asyncio.sleep(listen)
    finally:
        await client.close()
    return len(heard)


Event = Callable[[list[subprocess.Popen[bytes]], dict[str, str]], Awaitable[None]]
"""Something done to the fleet at one round of the traffic (kill a machine...)."""


async def traffic(
    app: object,
    rounds: int,
    *,
    every: float = 0.08,
    task: str = "one_writer",
    copies: int = 1,
    at: Callable[[int], Awaitable[None]] | None = None,
    keys: int = KEYS,
    first: int = 0,
) -> list[object]:
    """`rounds` rounds of one item per key (`copies` times), each round sent
    at once, `every` seconds apart by the clock (500 items/s) however busy the
    machine is; `at` is awaited before each round. Values count from `first`."""
    tasks = []
    kiq = getattr(app, task).kiq
    start = time.monotonic()
    for round_ in range(rounds):
        if at is not None:
            await at(round_)
        tasks += await asyncio.gather(
            *(
                kiq(first + round_ * keys + key, f"k{key}")
                for key in range(keys)
                for _ in range(copies)
            )
        )
        await asyncio.sleep(max(0.0, start + (round_ + 1) * every - time.monotonic()))
    took = time.monotonic() - start
    print(f"traffic: {rounds * keys * copies} items in {took:.2f} s")
    return tasks


def children(worker: subprocess.Popen[bytes]) -> set[str]:
    """The pids of a ``taskiq worker`` command's worker processes."""
    found = subprocess.run(
        ["pgrep", "-P", str(worker.pid)], capture_output=True, text=True, check=False
    )
    return set(found.stdout.split())


async def run(
    machines: int,
    per_machine: int,
    *flags: str,
    settings: dict[str, str] = SETTINGS,
    events: dict[int, Event] | None = None,
    stock: int = 0,
    task: str = "one_writer",
    copies: int = 1,
    rounds: int = PER_KEY,
    keys: int = KEYS,
    every: float = 0.08,
    kind: str = "stream",
    every_result: bool = True,
) -> dict[str, Any]:
    """`machines` ``taskiq worker --workers per_machine`` commands (and `stock`
    worker processes without `BatchReceiver`); the traffic, with `events` at
    their rounds; what each call saw. Waits for every result, or with
    `every_result` false takes the results stored by then."""
    queue = new_queue()
    settings = {**settings, "BATCHTASK_BROKER": kind}
    with app_env(queue, **settings) as env:
        workers = [
            start_worker(env, "--workers", str(per_machine), *RECEIVER, *flags)
            for _ in range(machines)
        ]
        if stock:
            workers.append(start_worker(env, "--workers", str(stock)))
    started: dict[str, float] = {}
    began = time.time()
    try:
        for worker in workers:
            await wait_listening(worker)
        if "fleet=false" not in flags:
            await joined(queue, machines * per_machine, kind)

        async def at(round_: int) -> None:
            event = (events or {}).get(round_)
            if event is not None:
                started[event.__name__] = time.time()
                await event(workers, env)

        with app_env(queue, **settings):
            async with producer(queue) as app:
                sending = time.monotonic()
                tasks = await traffic(
                    app, rounds, task=task, copies=copies, at=at, keys=keys, every=every
                )
                sent_in = time.monotonic() - sending
                total = keys * rounds

                async def all_processed() -> bool:
                    if task == "dedup_writer":
                        return len(await results_of(tasks)) == len(tasks)
                    return len(await processed(queue)) >= total

                try:
                    await until(all_processed, 120, "every item processed")
                except AssertionError as exc:
                    said = await explain(queue, kind, total, workers, began)
                    raise AssertionError(f"{exc}: {said}") from None
                done_at = time.time()
                await asyncio.sleep(1.0)  # a late or second call would show now
                calls = await listed(queue)
                counts = await processed(queue)
                ready = tasks if every_result else await results_of(tasks)
                results = [await t.wait_result(timeout=60) for t in ready]  # type: ignore[attr-defined]
                deduped = await dedup_calls(queue)
                recorded = await recorded_calls(queue)
    finally:
        for worker in workers:
            kill(worker)
    sizes = [len(values.split(",")) for _, _, _, _, values, _ in calls] or [0]
    return {
        "calls": [(k, s, e, v) for k, s, e, _, v, _ in calls],
        "by_pid": [(p, v) for _, _, _, p, v, _ in calls],
        "counts": counts,
        "results": results,
        "mean": sum(sizes) / len(sizes),
        "pids": {pid for _, _, _, pid, _, _ in calls},
        "events": started,
        "done_at": done_at,
        "dedup": deduped,
        "recorded": recorded,
        "workers": workers,
        "sent_in": sent_in,
        "spans": calls,
        "began": began,
        "kind": kind,
    }


def split_keys(found: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The keys called in more than one process: each one's calls per pid."""
    per_key: dict[str, dict[str, int]] = {}
    for (key, *_), (pid, _) in zip(found["calls"], found["by_pid"], strict=True):
        pids = per_key.setdefault(key, {})
        pids[pid] = pids.get(pid, 0) + 1
    return {key: pids for key, pids in per_key.items() if len(pids) > 1}


DEGRADED = (
    "view of the fleet is",
    "moving a delivery to the worker",
    "did not take this worker's heartbeat",
)
"""What a worker process logs when it batches per process for a while."""


def degraded(found: dict[str, Any]) -> list[str]:
    """The warnings of a run's workers that they batched per process."""
    return [
        line
        for worker in found["workers"]
        for line in worker_log(worker).splitlines()
        if any(text in line for text in DEGRADED)
    ]


def calls_of(found: dict[str, Any], values: set[int]) -> list[str]:
    """Each call that was passed one of `values`: the values it had of them,
    its pid, its start (seconds after the traffic began) and how it ended."""
    return [
        f"{sorted(had)} in pid {pid} at {start - found['began']:.2f} s ({how})"
        for _, start, _, pid, vals, how in found["spans"]
        if (had := values & {int(v) for v in vals.split(",")})
    ]


def broker_said(found: dict[str, Any]) -> list[str]:
    """What the broker's server logged of closed channels and alarms during
    the run (RabbitMQ's log; [] on other kinds)."""
    return rabbitmq_trouble(found["began"]) if found["kind"] == "rabbitmq" else []


def tell_fleet(found: dict[str, Any]) -> None:
    """Print what a run's fleet said of itself: each worker's batchtask lines
    (membership, warnings), and the calls per process of each split key."""
    for key, pids in sorted(split_keys(found).items())[:10]:
        print(f"key {key}: calls per pid {pids}")
    for worker in found["workers"]:
        lines = [
            line
            for line in worker_log(worker).splitlines()
            if "batchtask" in line
            and ("WARNING" in line or "ERROR" in line or "fleet" in line)
        ]
        print(f"--- worker {worker.pid}:", *lines[-30:], sep="\n")


async def joined(queue: str, size: int, kind: str = "stream") -> None:
    """Wait until `size` processes are members and have seen each other."""

    async def all_joined() -> bool:
        return await members(queue, kind) == size

    await until(all_joined, 60, f"{size} worker processes in the fleet")
    await asyncio.sleep(1.5)  # a beat of every process: each sees every other


async def results_of(tasks: list[Any]) -> list[object]:
    """The results ready so far."""
    ready = []
    for task in tasks:
        if await task.is_ready():
            ready.append(task)
    return ready


async def dedup_calls(queue: str) -> list[tuple[str, list[int]]]:
    """Each call of ``app:dedup_writer``: its pid and the values passed."""
    client = redis.from_url(REDIS_URL)
    try:
        raw = await client.lrange(f"{queue}:dedup", 0, -1)
    finally:
        await client.aclose()
    calls = []
    for entry in raw:
        pid, _, values = entry.decode().partition(":")
        calls.append((pid, [int(v) for v in values.split(",")]))
    return calls


def ran_on(found: dict[str, Any], pids: Any) -> set[int]:
    """The values passed to calls made by the processes `pids`."""
    return {
        int(value)
        for pid, values in found["by_pid"]
        if pid in pids
        for value in values.split(",")
    }


def every_item_once(
    found: dict[str, Any], rounds: int = PER_KEY, keys: int = KEYS
) -> None:
    """Each item ran once and its result is right."""
    assert found["counts"] == dict.fromkeys(range(keys * rounds), 1)
    results = found["results"]
    assert [r.return_value for r in results] == [2 * v for v in range(keys * rounds)]


@pytest.mark.xdist_group("fill")  # one kind at a time: each compares 3 runs' fill
@pytest.mark.parametrize("kind", ["stream", "cluster", "sentinel", "rabbitmq", "nats"])
async def test_a_fleet_of_four_fills_batches_as_one_process(kind: str) -> None:
    """Goal 1 of the fleets issue, in one run: fleet against one process.

    RabbitMQ hands a queue's messages to its consumers in turn: with 40 keys
    a round and 4 consumers each key would reach one process every round. 39
    keys turn the keys over the processes, as traffic that is not a multiple
    of the fleet does. On Sentinel, taskiq-redis's kick (a connection through
    the master lookup per kick) cannot keep 500 items/s here beside four
    workers and the suite's other fleets: its traffic is half as fast (a
    round every 0.16 s, 8 s), the same in the three runs.
    """
    require_broker(kind)
    keys = 39 if kind == "rabbitmq" else KEYS
    every = 0.16 if kind == "sentinel" else 0.08
    one = await run(1, 1, kind=kind, keys=keys, every=every)
    fleet = await run(2, 2, kind=kind, keys=keys, every=every)
    apart = await run(
        2, 2, "--receiver_arg", "fleet=false", kind=kind, keys=keys, every=every
    )
    ratio = fleet["mean"] / one["mean"]
    apart_ratio = apart["mean"] / one["mean"]
    took = [found["sent_in"] for found in (one, fleet, apart)]
    for name, found in (("one process", one), ("fleet", fleet), ("apart", apart)):
        calls = found["calls"]
        print(
            f"{name}: {len(calls)} calls, mean batch {found['mean']:.2f}, "
            f"{overlaps(calls)} overlapping, {len(found['pids'])} process(es) called"
        )
    print(
        f"fill on {kind}, 2 machines x 2 processes against one process: {ratio:.2f}x "
        f"(fleet=false: {apart_ratio:.2f}x)"
    )
    every_item_once(one, keys=keys)
    every_item_once(fleet, keys=keys)
    split = split_keys(fleet)
    print(f"fleet: {len(split)} of {keys} keys called in more than one process")
    assert overlaps(fleet["calls"]) == 0
    assert len(fleet["pids"]) == 4, "every process batches its share of keys"
    # Goal 1 (>= 0.9x) is measured on a quiet machine by bench/fleet.py
    # (./scripts/bench: 1.00x on every family). Here the suite's other fleets
    # share the two cores: the three runs are not of one load, and a loaded
    # fleet's moves land later (0.79-0.82x seen under the whole suite at one
    # pace, 1.00x alone). What must hold under any load: the fleet fills far
    # more than each process by itself (1.5x), and, where the producer kept
    # one pace in the three runs, most of what one process fills. Batches
    # that close on their timeout hold what a key brings in one window: a
    # run whose producer was slower (Sentinel's kicks under load: 11 s, 27 s
    # and 17 s for the same 2,000 items once) is compared per item sent a
    # second, its mean batch scaled by how long its traffic took.
    paced = {
        name: found["mean"] * found["sent_in"] / (one["mean"] * one["sent_in"])
        for name, found in (("fleet", fleet), ("apart", apart))
    }
    print(
        f"per item sent a second: fleet {paced['fleet']:.2f}x, "
        f"fleet=false {paced['apart']:.2f}x"
    )
    far = paced["fleet"] >= 1.5 * paced["apart"]
    one_pace = max(took) <= 1.15 * min(took)
    # A loaded single process lags: its batches then span more than one
    # window (16.67 items where the traffic brings a key 12.5 a window, once
    # on NATS under the suite). Most of what one window brings is as much as
    # an unloaded process fills. Only at one pace is it compared.
    window = float(SETTINGS["BATCHTASK_BATCH_TIMEOUT"]) / every
    filled = not one_pace or ratio >= 0.7 or fleet["mean"] >= 0.9 * window
    if not one_pace:
        print(
            f"traffic sent in {', '.join(f'{t:.1f}' for t in took)} s: not one "
            "pace, so only fleet >= 1.5 x fleet=false (per item a second) is asserted"
        )
    if far and filled:
        return
    tell_fleet(fleet)
    said = degraded(fleet)
    if said:
        # A server or loop too slow for the fleet: the worker batches per
        # process and says so (what the failure table promises).
        print(f"fill short, degraded with a warning: {said[0]}")
        return
    assert far, (
        f"fleet {paced['fleet']:.2f}x per item sent a second, fleet=false "
        f"{paced['apart']:.2f}x, {len(split)} keys split, no warning; "
        f"{broker_said(fleet)}"
    )
    assert filled, (
        f"fleet {fleet['mean']:.2f} items per call, one process "
        f"{one['mean']:.2f}, one window of the traffic {window:.2f}, "
        f"{len(split)} keys split, no warning; {broker_said(fleet)}"
    )


@pytest.mark.parametrize("kind", ["stream", "rabbitmq", "nats"])
async def test_a_machine_killed_mid_traffic_loses_nothing(kind: str) -> None:
    """Goal 5: SIGKILL of a whole machine 1.6 s into the traffic.

    What it had forwarded to it and not run comes back from its inbox once
    its membership expires; what it held from the queue is claimed once idle.
    Every item runs; an item runs twice only if it was in a call that ran on
    the killed machine (done, but not acknowledged when it died). On RabbitMQ
    what it held comes back at once (its connection closed); its leases are
    on the Redis of the result backend.
    """
    require_broker(kind)
    keys = 39 if kind == "rabbitmq" else KEYS
    killed: set[str] = set()

    async def kill_one(workers: list[subprocess.Popen[bytes]], _: object) -> None:
        killed.update(children(workers[0]))
        kill(workers[0])

    found = await run(2, 2, events={20: kill_one}, kind=kind, keys=keys)
    counts, calls = found["counts"], found["calls"]
    twice = {value for value, count in counts.items() if count > 1}
    on_killed = ran_on(found, killed)
    served_again = found["done_at"] - found["events"]["kill_one"]
    print(
        f"a machine killed 1.6 s in: {len(calls)} calls, {len(twice)} item(s) run "
        f"twice, all {len(counts)} items done {served_again:.1f} s after the kill "
        f"(idle time 5 s, membership {5.0:.0f} s), {overlaps(calls)} overlapping "
        f"on {kind}"
    )
    assert sorted(counts) == list(range(keys * PER_KEY)), "nothing lost"
    if not twice <= on_killed:
        tell_fleet(found)
    assert twice <= on_killed, (
        "twice only what ran on the killed machine: "
        f"{calls_of(found, twice - on_killed)[:6]} {broker_said(found)}"
    )
    assert overlaps(calls) == 0
    results = found["results"]
    assert [r.return_value for r in results] == [2 * v for v in range(keys * PER_KEY)]


async def test_a_machine_that_joins_takes_its_share() -> None:
    """Goal 5: a second machine joins 0.8 s into the traffic; it takes keys
    within a beat or two, nobody stops, every item runs once."""
    require_broker("stream")
    first: set[str] = set()

    async def join(workers: list[subprocess.Popen[bytes]], env: dict[str, str]) -> None:
        first.update(children(workers[0]))
        workers.append(start_worker(env, "--workers", "2", *RECEIVER))

    found = await run(1, 2, events={10: join}, rounds=100)
    starts = [
        start
        for (pid, _), (_, start, _, _) in zip(
            found["by_pid"], found["calls"], strict=True
        )
        if pid not in first
    ]
    first_call = min(starts) - found["events"]["join"] if starts else None
    share = len(starts) / len(found["calls"])
    print(
        f"a machine joined 0.8 s in: its first call {first_call:.1f} s after it "
        f"was started, {share:.0%} of {len(found['calls'])} calls"
        if first_call is not None
        else "the joining machine made no call"
    )
    every_item_once(found, rounds=100)
    assert starts, "the machine that joined takes keys"


@pytest.mark.parametrize("kind", ["stream", "rabbitmq", "nats"])
async def test_a_machine_stopped_gracefully_hands_its_inbox_back(kind: str) -> None:
    """Goal 7 (a rolling deploy): SIGTERM to one machine mid-traffic; it runs
    what it holds, moves what is left in its inbox back to the queue, and
    leaves. Every item runs once."""
    require_broker(kind)
    keys = 39 if kind == "rabbitmq" else KEYS

    stopped: set[str] = set()

    async def stop_one(workers: list[subprocess.Popen[bytes]], _: object) -> None:
        stopped.update(children(workers[0]))
        for pid in stopped:
            os.kill(int(pid), signal.SIGTERM)

    found = await run(2, 2, events={20: stop_one}, kind=kind, keys=keys)
    print(
        f"a machine stopped 1.6 s in on {kind}: {len(found['calls'])} calls, "
        f"{overlaps(found['calls'])} overlapping"
    )
    assert overlaps(found["calls"]) == 0
    # A stopping process's calls may outlast its drain under load, and on
    # RabbitMQ and NATS a move is a publish and then an ack: an item may run
    # twice, as when it is killed. Under the whole suite's load, once each, an
    # item ran twice on the others on RabbitMQ (1 of 1,950, before a stopping
    # worker stopped closing its own channel: docs/fleets.md, known limits)
    # and some on the stream: counted, bounded, never lost.
    counts = found["counts"]
    twice = {value for value, count in counts.items() if count > 1}
    elsewhere = twice - ran_on(found, stopped)
    print(
        f"{len(twice)} item(s) run twice, {len(elsewhere)} of them not run by the "
        "stopped machine"
    )
    assert sorted(counts) == list(range(keys * PER_KEY)), "nothing lost"
    if len(elsewhere) > keys * PER_KEY // 100:
        tell_fleet(found)
    assert len(elsewhere) <= keys * PER_KEY // 100, (
        f"run twice elsewhere: {calls_of(found, elsewhere)[:6]} {broker_said(found)}"
    )


@pytest.mark.parametrize("kind", ["stream", "cluster", "rabbitmq"])
async def test_a_worker_without_the_receiver_in_the_fleet_strands_nothing(
    kind: str,
) -> None:
    """Goal 7: a stock ``taskiq worker`` (no ``--receiver``) reads the same
    stream: it is no member, batches what it reads, and nothing is stranded
    (a rolling deploy, on a Redis stream, a Redis Cluster and RabbitMQ)."""
    require_broker(kind)
    keys = 39 if kind == "rabbitmq" else KEYS
    found = await run(1, 2, stock=1, kind=kind, keys=keys)
    print(
        f"{kind}: two BatchReceiver processes and a stock one: {len(found['calls'])} "
        f"calls by {len(found['pids'])} processes"
    )
    every_item_once(found, keys=keys)
    assert len(found["pids"]) == 3, "the stock worker took its share"


@pytest.mark.parametrize("kind", ["stream", "rabbitmq"])
async def test_equal_items_reaching_different_processes_are_passed_once(
    kind: str,
) -> None:
    """Goal 4: each value kicked 4 times in a row (the copies go to different
    processes of the fleet); within one batch window each is passed once
    across the fleet, and every copy gets its result."""
    require_broker(kind)
    # The traffic lasts 0.4 s of a 3 s batch window: a copy moved to its
    # key's owner may arrive late by the rest (the suite runs beside other
    # fleets on two cores; a second late was seen). 4 copies of 40 keys a
    # round is 2,000 messages a second; moving one costs RabbitMQ's client
    # about 0.2 ms of CPU (a confirmed publish, then the ack), so RabbitMQ
    # gets 19 keys (half the rate, and not a multiple of the fleet).
    keys, rounds = (19, 5) if kind == "rabbitmq" else (KEYS, 5)
    settings = {**SETTINGS, "BATCHTASK_BATCH_TIMEOUT": "3.0"}
    flags = ("--receiver_arg", "fleet=false")
    runs = {
        name: await run(
            2,
            2,
            *extra,
            task="dedup_writer",
            copies=4,
            rounds=rounds,
            kind=kind,
            keys=keys,
            settings=settings,
        )
        for name, extra in (("fleet", ()), ("apart", flags))
    }
    fleet, apart = runs["fleet"], runs["apart"]
    passed = [v for _, values in fleet["dedup"] for v in values]
    passed_apart = [v for _, values in apart["dedup"] for v in values]
    print(
        f"dedup_key on {kind}, 4 copies of {keys * rounds} values: the fleet "
        f"passed {len(passed)} values, fleet=false {len(passed_apart)}"
    )
    assert sorted(passed) == list(range(keys * rounds)), "each value passed once"
    assert len(passed_apart) > len(passed)
    values = [v for v in range(keys * rounds) for _ in range(4)]
    assert [r.return_value for r in fleet["results"]] == [2 * v for v in values]


async def test_a_saturating_key_is_not_funnelled_into_one_process() -> None:
    """Goal 2: one key hot enough to fill batches in every process is batched
    in every process (it is hot there), not sent to its owner alone."""
    require_broker("stream")
    found = await run(2, 2, task="double", keys=1, rounds=4000, every=0.0)
    recorded = found["recorded"]
    per_pid: dict[int, int] = {}
    for pid, values in recorded:
        per_pid[pid] = per_pid.get(pid, 0) + len(values)
    print(
        f"one saturating key, 2 machines x 2 processes: {len(recorded)} calls, "
        f"items per process {sorted(per_pid.values())}"
    )
    assert found["counts"] == dict.fromkeys(range(4000), 1)
    assert len(per_pid) == 4, "every process batches the hot key"


@pytest.mark.parametrize("kind", ["stream", "rabbitmq"])
async def test_a_member_cut_off_from_the_server_degrades_and_comes_back(
    kind: str,
) -> None:
    """Partition: worker A (behind a proxy) is cut off from its broker for 8 s.

    A stops routing and warns; B sees A's membership expire and moves what
    was forwarded to A's inbox back to the queue, so it runs; when A is back
    it joins again and takes its share (its inbox is made again). Nothing is
    lost; nothing hangs.
    """
    require_broker(kind)
    queue = new_queue()
    settings = {**SETTINGS, "BATCHTASK_BROKER": kind}
    keys = 39 if kind == "rabbitmq" else KEYS
    port, url = (
        (5672, ("amqp", "guest:guest@"))
        if kind == "rabbitmq"
        else (6379, ("redis", ""))
    )
    async with Proxy(port) as proxy:
        through = {"BATCHTASK_BROKER_URL": proxy.url(*url) + "/"}
        with app_env(queue, **settings, **through) as env:
            cut_off = start_worker(env, "--workers", "1", *RECEIVER)
        with app_env(queue, **settings) as env:
            other = start_worker(env, "--workers", "1", *RECEIVER)
        try:
            for worker in (cut_off, other):
                await wait_listening(worker)
            await joined(queue, 2, kind)
            with app_env(queue, **settings):
                async with producer(queue) as app:
                    first = await traffic(app, 10, keys=keys)
                    proxy.refuse(8)
                    during = await traffic(app, 10, first=keys * 10, keys=keys)
                    await asyncio.sleep(8)
                    await joined(queue, 2, kind)  # A is back
                    back_at = time.time()
                    after = await traffic(app, 10, first=keys * 20, keys=keys)

                    async def all_processed() -> bool:
                        return len(await processed(queue)) >= keys * 30

                    await until(all_processed, 120, "every item processed")
                    calls = await listed(queue)
                    results = [
                        await t.wait_result(timeout=60)  # type: ignore[attr-defined]
                        for t in first + during + after
                    ]
            log = worker_log(cut_off)
            a_pids = children(cut_off)
        finally:
            kill(cut_off)
            kill(other)
    a_after = [c for c in calls if c[3] in a_pids and c[1] >= back_at]
    print(
        f"a member cut off from {kind} for 8 s: {len(calls)} calls; once back, "
        f"it made "
        f"{len(a_after)} of the {sum(c[1] >= back_at for c in calls)} calls since"
    )
    assert [r.return_value for r in results] == [2 * v for v in range(keys * 30)]
    assert "per process, until it does" in log
    assert a_after, "the member that was cut off takes its share again"


async def test_a_worker_paused_past_its_membership_loses_nothing() -> None:
    """Slow worker: one of 4 processes is stopped (SIGSTOP) for 7 s mid-traffic,
    longer than its membership lasts, then goes on.

    The others see its membership expire, move its inbox back to the queue
    and claim what it held once idle; it wakes up with a view of the fleet
    that is stale until its next beat. Every item runs, with its result; an
    item runs twice only if the paused process had it.
    """
    require_broker("stream")
    paused: list[str] = []

    async def pause(workers: list[subprocess.Popen[bytes]], _: object) -> None:
        paused.append(sorted(children(workers[0]))[0])
        os.kill(int(paused[0]), signal.SIGSTOP)
        asyncio.get_running_loop().call_later(
            7.0, os.kill, int(paused[0]), signal.SIGCONT
        )

    found = await run(2, 2, events={15: pause})
    counts = found["counts"]
    twice = {value for value, count in counts.items() if count > 1}
    on_paused = ran_on(found, paused)
    elsewhere = twice - on_paused
    print(
        f"a process paused 7 s: {len(found['calls'])} calls, {len(twice)} item(s) "
        f"run twice ({len(elsewhere)} not by the paused process), "
        f"{len(on_paused)} items ran on the paused process"
    )
    assert sorted(counts) == list(range(KEYS * PER_KEY)), "nothing lost"
    # What it had and did not run (held, or in its inbox) may run twice on the
    # others: under the whole suite's load, once, 3 such items of 2,000.
    assert len(elsewhere) <= KEYS * PER_KEY // 100, "twice: about what it had"
    results = found["results"]
    wrong = [
        (value, result)
        for value, result in enumerate(results)
        if result.return_value != 2 * value
    ]
    if wrong:
        for value, result in wrong[:5]:
            print(
                f"item {value}: is_err {result.is_err}, error {result.error!r}, "
                f"return_value {result.return_value!r}, ran {counts.get(value)} "
                f"time(s), on the paused process: {value in on_paused}"
            )
        tell_fleet(found)
    assert [r.return_value for r in results] == [2 * v for v in range(KEYS * PER_KEY)]


@pytest.mark.moves_sentinel_master
async def test_a_sentinel_failover_under_fleet_traffic_loses_no_item() -> None:
    """Server failover: ``SENTINEL FAILOVER`` halfway through the traffic of a
    fleet of 2 processes on the Sentinel's master. Moves and memberships the
    new master never saw are made again (a move lost with the old master's
    unreplicated writes leaves its entry unacknowledged on the queue, claimed
    after the idle time): every item runs. What the old master accepted
    between the promotion of its replica and its own demotion is lost with it,
    fleet or not (Redis replicates asynchronously; docs/fleets.md): kicks made
    in that window ran on the old master, and their results are gone. The test
    prints how many and checks every other result."""
    require_broker("sentinel")
    sentinel = redis.Redis(port=26379)

    async def failover(_: object, __: object) -> None:
        await sentinel.execute_command("SENTINEL", "FAILOVER", "batchtask")

    try:
        found = await run(
            1,
            2,
            *CLAIM_FLAGS["sentinel"],
            kind="sentinel",
            events={25: failover},
            every_result=False,
        )
    finally:
        await sentinel.aclose()
    counts = found["counts"]
    results = found["results"]
    print(
        f"sentinel failover mid-traffic: {len(found['calls'])} calls, "
        f"{sum(c > 1 for c in counts.values())} item(s) run twice, "
        f"{KEYS * PER_KEY - len(results)} of {KEYS * PER_KEY} results lost "
        "with the old master"
    )
    assert sorted(counts) == list(range(KEYS * PER_KEY)), "every item ran"
    assert all(r.return_value % 2 == 0 and not r.is_err for r in results)
    assert results, "results written after the failover are kept"
