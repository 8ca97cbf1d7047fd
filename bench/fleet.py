"""What fleet mode costs: throughput at saturation, commands at idle, and fill.

    .venv/bin/python bench/fleet.py [--items 20000] [--rounds 3] [--keys 200]
        [--idle-seconds 20] [--parts saturation,idle,fill] [--quick]
        [--json bench/results/fleet.json]

Never part of the test run. Starts a Redis server of its own
(``redis-server --port 6399 --save ""``, shut down at the end) for the
saturation and idle parts, so that every command it counts is the workers';
the fill part runs on the Redis of the tests (127.0.0.1:6379). Fleet mode is
on by default for ``BatchReceiver`` workers on a Redis stream;
``--receiver_arg fleet=false`` is the per-process worker it is set against.

Parts (rounds alternate the order of the two modes):

1. **saturation**: a staging stream is prefilled with no-op batched items
   (``batch_size=100``, ``batch_timeout=0.5``) before ``taskiq worker
   fleet:broker --workers 2 --receiver batchtask:BatchReceiver`` starts on
   an empty queue, fleet (default) vs ``fleet=false``; once both processes
   listen (and, in fleet mode, see each other), one script copies every
   entry to the queue at once, and the drain is timed from then to the N-th
   item (completions counted as ``bench/drain.py`` does), with the worker's
   CPU per item (its process group). The figure is the steady rate, between
   10 % and 90 % of the items: the last partial batches of a drain wait out
   ``batch_timeout``, which is a drain's end, not saturation (the whole
   drain's rate is recorded too). Two traffics: **one key** (``--items``,
   every item the same batch key: hot in every process, nothing moves) and
   **many keys** (``--many-items`` of ``--keys`` keys, interleaved in
   rounds of 50 items: no key fills a batch window in one process, so about
   half the deliveries move to their owner). Moved: ``XADD`` calls after
   the copy's (``INFO commandstats`` of the bench's server) over N.
2. **idle**: the same worker command on an empty stream, fleet vs
   ``fleet=false``, one at a time; after a settling time, ``MONITOR`` of the
   bench's server for ``--idle-seconds``: the commands the worker processes
   sent per second per process (the goal), by command, and the commands run
   inside their scripts (``[lua]`` lines, not counted in the goal). Then on
   RabbitMQ (the local server) and NATS (a ``nats-server -js`` of its own on
   port 4299, monitoring on 8299), the tests' worker app idle: what its
   connections sent, per second per process (RabbitMQ: the server's socket
   reads of them; NATS: the messages they published).
3. **fill**: a fleet of 16 (4 ``taskiq worker --workers 4`` commands) vs one
   process, and on RabbitMQ (39 keys) and NATS JetStream a fleet of 4 (2 x
   2) vs one process, on
   the traffic of ``tests/test_fleet_fill.py`` (40 keys of 50
   items, one item per key every 80 ms, ``batch_size=50``,
   ``batch_timeout=1.0``) with light work (``BATCHTASK_WRITE_SECONDS``: 5
   ms calls); mean batch (items per call) and its ratio to one process'.
   It reuses that test's ``run`` (its worker app, ``tests/worker_app``).

Prints one table and writes every figure to ``--json``.
"""

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from taskiq import AsyncBroker, TaskiqEvents

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PORT = 6399
URL = f"redis://127.0.0.1:{PORT}"
ENV_QUEUE = "BENCH_FLEET_QUEUE"
BATCH_SIZE = 100
BATCH_TIMEOUT = 0.5
WORKERS = 2
POLL_EVERY = 0.01
STARTUP_LIMIT = 90.0
STALL_LIMIT = 30.0
SETTLE_S = 4.0
FLEET_MODES = {"fleet": (), "per_process": ("--receiver_arg", "fleet=false")}
RECEIVER = ("--receiver", "batchtask:BatchReceiver")


# --- the app: `taskiq worker fleet:broker`, configured by the environment ---


def build_app(queue: str) -> tuple[AsyncBroker, Any]:
    """The stream broker of `queue` and its keyed no-op batch task."""
    from drain import Completions  # items done, into a hash on this bench's server
    from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

    from batchtask import batch_task

    backend: RedisAsyncResultBackend[object] = RedisAsyncResultBackend(
        URL, result_ex_time=900
    )
    # consumer_id="0": the group reads the stream from its start (a prefill).
    made = RedisStreamBroker(
        URL, queue_name=queue, consumer_group_name=queue, consumer_id="0"
    ).with_result_backend(backend)
    done = Completions(f"{queue}:done", URL)
    made.add_event_handler(TaskiqEvents.WORKER_STARTUP, done.start)

    @batch_task(
        made, batch_size=BATCH_SIZE, batch_timeout=BATCH_TIMEOUT, task_name="f:n"
    )
    async def noop_keyed(items: list[int], key: str) -> None:
        done.add(len(items))

    return made, noop_keyed


if os.environ.get(ENV_QUEUE):
    broker, _task = build_app(os.environ[ENV_QUEUE])


# --- the bench's own Redis server ---


@contextlib.contextmanager
def own_server() -> Any:
    """``redis-server`` on PORT, no persistence, shut down on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("fleet.py: redis-server not found")
    server = subprocess.Popen(
        [binary, "--port", str(PORT), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            done = subprocess.run(
                ["redis-cli", "-p", str(PORT), "ping"],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.stdout.strip() == "PONG":
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"fleet.py: redis-server on {PORT} did not start")
        yield
    finally:
        server.terminate()
        server.wait(timeout=30)


def start_worker(queue: str, mode: str, log: Path) -> subprocess.Popen[bytes]:
    """``taskiq worker fleet:broker --workers 2`` with BatchReceiver, its own group."""
    env = dict(os.environ)
    env[ENV_QUEUE] = queue
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    command = [sys.executable, "-m", "taskiq", "worker", "fleet:broker"]
    command += ["--workers", str(WORKERS), *RECEIVER, *FLEET_MODES[mode]]
    with log.open("wb") as out:
        return subprocess.Popen(
            command,
            cwd=HERE,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def listening(worker: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until both worker processes log "Listening started."."""
    import drain

    watcher = drain.LogWatcher(log)
    began = time.perf_counter()
    while watcher.poll() < WORKERS:
        if worker.poll() is not None:
            raise SystemExit(
                f"fleet.py: the worker exited ({worker.returncode})\n"
                + drain.log_tail(log)
            )
        if time.perf_counter() - began > STARTUP_LIMIT:
            raise SystemExit(
                f"fleet.py: the worker did not listen\n{drain.log_tail(log)}"
            )
        await asyncio.sleep(POLL_EVERY)


async def commandstats(client: Any) -> Counter[str]:
    """Calls per command so far (``INFO commandstats``)."""
    info = await client.info("commandstats")
    return Counter(
        {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}
    )


# --- 1. saturation ---


async def prefill(queue: str, items: int, keys: int) -> None:
    """`items` items of `keys` keys, interleaved in rounds of 50 per key."""
    producer, task = build_app(queue)
    await producer.startup()
    try:
        if keys == 1:
            await task.kiq_many(range(items), "k0")
        else:
            per_key, chunk = items // keys, 50
            for first in range(0, per_key, chunk):
                for key in range(keys):
                    base = key * per_key
                    end = min(first + chunk, per_key)
                    await task.kiq_many(range(base + first, base + end), f"k{key}")
    finally:
        await producer.shutdown()


_COPY = """
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
for _, entry in ipairs(entries) do
  redis.call('XADD', KEYS[2], '*', unpack(entry[2]))
end
redis.call('DEL', KEYS[1])
return #entries
"""
"""Every entry of the staging stream KEYS[1] to the queue KEYS[2], at once."""


async def joined(client: Any, queue: str, mode: str) -> None:
    """Wait until both processes are members and have seen each other.

    fleet=false waits as long, for the same start.
    """
    key = f"{{{queue}}}:batchtask:members:{queue}"
    began = time.perf_counter()
    while mode == "fleet" and await client.zcard(key) < WORKERS:
        if time.perf_counter() - began > STARTUP_LIMIT:
            raise SystemExit("fleet.py: the fleet did not form")
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # a beat of each: each sees the other


async def saturation(mode: str, items: int, keys: int) -> dict[str, Any]:
    """One drain of a prefilled stream; its rate, CPU and moves."""
    import drain

    queue = f"bench-fleet-{uuid.uuid4().hex[:10]}"
    counter = f"{queue}:done"
    log = Path(tempfile.gettempdir()) / f"{queue}.log"
    client = redis.from_url(URL)
    worker = None
    try:
        await client.flushall()
        staging = f"{queue}:staging"
        await prefill(staging, items, keys)
        items = int(await client.xlen(staging))
        worker = start_worker(queue, mode, log)
        await listening(worker, log)
        await joined(client, queue, mode)
        await client.config_resetstat()
        pids = drain.group_pids(worker.pid)
        cpu0 = drain.cpu_seconds(pids)
        t0 = time.perf_counter()
        await client.eval(_COPY, 2, staging, queue)
        done_at_start = 0
        samples = [(0.0, done_at_start)]
        last_change = t0
        while samples[-1][1] < items:
            await asyncio.sleep(POLL_EVERY)
            done = int(await client.hget(counter, "items") or 0)
            now = time.perf_counter()
            if done != samples[-1][1]:
                last_change = now
            samples.append((now - t0, done))
            if worker.poll() is not None or now - last_change > STALL_LIMIT:
                raise SystemExit(f"fleet.py: stalled at {done}\n{drain.log_tail(log)}")
        cpu = drain.cpu_seconds(pids) - cpu0
        stats = await commandstats(client)
        calls = int(await client.hget(counter, "calls") or 0)
    finally:
        if worker is not None:
            drain.kill(worker)
        await client.flushall()
        await client.aclose()
        log.unlink(missing_ok=True)
    measured = items - done_at_start
    elapsed = samples[-1][0]
    return {
        "mode": mode,
        "keys": keys,
        "items": items,
        "items_per_s": measured / elapsed,
        "steady_items_per_s": drain.steady_rate(samples, done_at_start, items),
        "cpu_us_per_item": cpu / measured * 1e6,
        "calls": calls,
        "mean_batch": items / calls if calls else None,
        # XADDs after the reset: the copy's N, then one per move.
        "moved": (stats.get("xadd", 0) - items) / items,
        "evalsha_or_eval": stats.get("eval", 0) + stats.get("evalsha", 0),
    }


# --- 2. idle ---


async def idle(mode: str, seconds: float) -> dict[str, Any]:
    """Commands per second per process of an idle worker (``MONITOR``)."""
    import drain

    queue = f"bench-fleet-{uuid.uuid4().hex[:10]}"
    log = Path(tempfile.gettempdir()) / f"{queue}.log"
    watch = Path(tempfile.gettempdir()) / f"{queue}.monitor"
    client = redis.from_url(URL)
    worker = None
    try:
        await client.flushall()
        worker = start_worker(queue, mode, log)
        await listening(worker, log)
        await asyncio.sleep(SETTLE_S)
        with watch.open("wb") as out:
            monitor = await asyncio.create_subprocess_exec(
                "redis-cli", "-p", str(PORT), "monitor", stdout=out
            )
            await asyncio.sleep(seconds)
            monitor.terminate()
            await monitor.wait()
        if worker.poll() is not None:
            raise SystemExit(f"fleet.py: the worker exited\n{drain.log_tail(log)}")
    finally:
        if worker is not None:
            drain.kill(worker)
        await client.flushall()
        await client.aclose()
        log.unlink(missing_ok=True)
    sent: Counter[str] = Counter()
    scripted: Counter[str] = Counter()
    line_rx = re.compile(r'^[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"')
    for line in watch.read_text(errors="replace").splitlines():
        found = line_rx.match(line)
        if found is None:
            continue
        source, name = found.group(1), found.group(2).lower()
        if source == "lua":
            scripted[name] += 1
        elif name != "monitor":
            sent[name] += 1
    watch.unlink(missing_ok=True)
    per = seconds * WORKERS
    return {
        "mode": mode,
        "seconds": seconds,
        "processes": WORKERS,
        "commands_per_s_per_process": sum(sent.values()) / per,
        "by_command": {k: v / per for k, v in sent.most_common()},
        "in_scripts_per_s_per_process": sum(scripted.values()) / per,
        "in_scripts": {k: v / per for k, v in scripted.most_common()},
    }


NATS_PORT, NATS_MONITOR = 4299, 8299
"""The bench's own NATS server (JetStream on) and its monitoring port."""


@contextlib.contextmanager
def own_nats() -> Any:
    """``nats-server -js`` on NATS_PORT with monitoring, stopped on exit."""
    binary = shutil.which("nats-server")
    if binary is None:
        raise SystemExit("fleet.py: nats-server not found")
    store = tempfile.mkdtemp(prefix="bench-nats-")
    server = subprocess.Popen(
        [
            *(binary, "-a", "127.0.0.1", "-p", str(NATS_PORT)),
            *("-m", str(NATS_MONITOR), "-js", "-sd", store),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{NATS_MONITOR}/healthz")
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"fleet.py: nats-server on {NATS_PORT} did not start")
        yield f"nats://127.0.0.1:{NATS_PORT}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(store, ignore_errors=True)


def client_counts(kind: str) -> dict[str, int]:
    """What each client connection sent the server so far, by connection.

    RabbitMQ: the server's socket reads of the connection (``rabbitmqctl
    list_connections recv_cnt``; a publish, an ack, a heartbeat frame are one
    each). NATS: the messages it published (``/connz`` ``in_msgs`` of the
    bench's own server: a pull request is one, a heartbeat is one).
    """
    if kind == "rabbitmq":
        listed = subprocess.run(
            [
                *("rabbitmqctl", "list_connections", "name", "recv_cnt"),
                *("--formatter", "json", "-q"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return {c["name"]: int(c["recv_cnt"]) for c in json.loads(listed.stdout)}
    url = f"http://127.0.0.1:{NATS_MONITOR}/connz?limit=1000"
    with urllib.request.urlopen(url) as reply:
        connz = json.load(reply)
    return {str(c["cid"]): int(c["in_msgs"]) for c in connz.get("connections", [])}


async def idle_broker(kind: str, mode: str, seconds: float) -> dict[str, Any]:
    """What an idle ``taskiq worker --workers 2`` sends its RabbitMQ or NATS.

    The tests' worker app (``tests/worker_app``) on a queue of its own; only
    the connections opened after it started are counted.
    """
    sys.path.insert(0, str(ROOT))
    from tests import workers

    queue = workers.new_queue()
    with contextlib.ExitStack() as stack:
        # taskiq-nats's own default fetch (the tests' app asks for 0.5 s)
        settings = {"BATCHTASK_BROKER": kind, "BATCHTASK_NATS_PULL_TIMEOUT": "none"}
        if kind == "nats":
            settings["BATCHTASK_BROKER_URL"] = stack.enter_context(own_nats())
        before = set(await asyncio.to_thread(client_counts, kind))
        with workers.app_env(queue, **settings) as env:
            worker = workers.start_worker(
                env, "--workers", str(WORKERS), *workers.RECEIVER, *FLEET_MODES[mode]
            )
        try:
            await workers.wait_listening(worker)
            await asyncio.sleep(SETTLE_S)
            start = await asyncio.to_thread(client_counts, kind)
            await asyncio.sleep(seconds)
            end = await asyncio.to_thread(client_counts, kind)
        finally:
            workers.kill(worker)
    sent = sum(
        count - start.get(name, 0) for name, count in end.items() if name not in before
    )
    return {
        "kind": kind,
        "mode": mode,
        "seconds": seconds,
        "processes": WORKERS,
        "connections": len(set(end) - before),
        "sent_per_s_per_process": sent / seconds / WORKERS,
    }


# --- 3. fill of a fleet of 16 ---


async def fill(
    machines: int, per_machine: int, flags: tuple[str, ...], kind: str = "stream"
) -> float:
    """Mean batch of ``tests/test_fleet_fill.py``'s traffic, light work.

    On RabbitMQ with 39 keys: it hands a queue's messages to its consumers in
    turn, and 40 keys over 4 consumers would give each key one process.
    """
    sys.path.insert(0, str(ROOT))
    from tests import test_fleet_fill

    settings = {**test_fleet_fill.SETTINGS, "BATCHTASK_WRITE_SECONDS": "0.005"}
    keys = 39 if kind == "rabbitmq" else test_fleet_fill.KEYS
    found = await test_fleet_fill.run(
        machines, per_machine, *flags, settings=settings, kind=kind, keys=keys
    )
    return float(found["mean"])


# --- the whole benchmark ---


def med(values: list[float]) -> float:
    """The median."""
    return statistics.median(values)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Every part, interleaved by rounds; the raw runs and their summary."""
    parts = set(args.parts.split(","))
    report: dict[str, Any] = {"command": sys.argv, "quick": args.quick}
    report.update(items=args.items, rounds=args.rounds, keys=args.keys)
    report["many_items"] = args.many_items
    order = list(FLEET_MODES)
    with own_server():
        if "saturation" in parts:
            runs = []
            for round_ in range(args.rounds):
                modes = order if round_ % 2 == 0 else order[::-1]
                for keys, count in ((1, args.items), (args.keys, args.many_items)):
                    for mode in modes:
                        run = await saturation(mode, count, keys)
                        run["round"] = round_
                        runs.append(run)
                        print(
                            f"  round {round_} {keys:>4} key(s) {mode:12} "
                            f"{run['items_per_s']:8.0f} items/s "
                            f"{run['cpu_us_per_item']:6.0f} µs CPU/item "
                            f"batch {run['mean_batch'] or 0:5.1f} "
                            f"moved {run['moved']:.0%}",
                            flush=True,
                        )
            report["saturation"] = runs
        if "idle" in parts:
            runs = []
            for round_ in range(args.idle_rounds):
                for mode in order if round_ % 2 == 0 else order[::-1]:
                    run = await idle(mode, args.idle_seconds)
                    run["round"] = round_
                    runs.append(run)
                    print(
                        f"  idle round {round_} {mode:12} "
                        f"{run['commands_per_s_per_process']:.2f} commands/s/process",
                        flush=True,
                    )
            report["idle"] = runs
    if "idle" in parts:
        runs = []
        for round_ in range(args.idle_rounds):
            for kind in ("rabbitmq", "nats"):
                for mode in order if round_ % 2 == 0 else order[::-1]:
                    run = await idle_broker(kind, mode, args.idle_seconds)
                    run["round"] = round_
                    runs.append(run)
                    print(
                        f"  idle round {round_} {kind:8} {mode:12} "
                        f"{run['sent_per_s_per_process']:.2f} sent/s/process",
                        flush=True,
                    )
        report["idle_brokers"] = runs
    if "fill" in parts:
        runs = []
        for round_ in range(args.fill_rounds):
            shapes = [
                ("one", 1, 1, "stream"),
                ("fleet16", 4, 4, "stream"),
                ("one_rabbitmq", 1, 1, "rabbitmq"),
                ("fleet4_rabbitmq", 2, 2, "rabbitmq"),
                ("one_nats", 1, 1, "nats"),
                ("fleet4_nats", 2, 2, "nats"),
            ]
            for name, machines, per, kind in (
                shapes if round_ % 2 == 0 else shapes[::-1]
            ):
                mean = await fill(machines, per, (), kind)
                runs.append({"shape": name, "round": round_, "mean_batch": mean})
                print(f"  fill round {round_} {name:8} mean batch {mean:.2f}")
        report["fill"] = runs
    report["summary"] = summarize(report)
    return report


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Medians and ratios of what was measured."""
    summary: dict[str, Any] = {}
    for keys in {run["keys"] for run in report.get("saturation", [])}:

        def values(field: str, mode: str, keys: int = keys) -> list[float]:
            return [
                r[field]
                for r in report["saturation"]
                if r["keys"] == keys and r["mode"] == mode
            ]

        whole = {mode: med(values("items_per_s", mode)) for mode in FLEET_MODES}
        rates = {mode: values("steady_items_per_s", mode) for mode in FLEET_MODES}
        cpu = {mode: med(values("cpu_us_per_item", mode)) for mode in FLEET_MODES}
        moved = med(values("moved", "fleet"))
        by_round = {}
        for r in report["saturation"]:
            if r["keys"] == keys:
                by_round.setdefault(r["round"], {})[r["mode"]] = r["steady_items_per_s"]
        summary["one_key" if keys == 1 else "many_keys"] = {
            "keys": keys,
            "steady_items_per_s": {mode: med(v) for mode, v in rates.items()},
            "ratio": med(rates["fleet"]) / med(rates["per_process"]),
            "items_per_s": whole,
            "whole_ratio": whole["fleet"] / whole["per_process"],
            "round_ratios": [
                pair["fleet"] / pair["per_process"]
                for pair in by_round.values()
                if len(pair) == 2
            ],
            "cpu_us_per_item": cpu,
            "moved": moved,
        }
    if report.get("idle"):
        idle_summary = {}
        for mode in FLEET_MODES:
            runs = [r for r in report["idle"] if r["mode"] == mode]
            names = {name for r in runs for name in r["by_command"]}
            inner = {name for r in runs for name in r["in_scripts"]}
            idle_summary[mode] = {
                "commands_per_s_per_process": med(
                    [r["commands_per_s_per_process"] for r in runs]
                ),
                "by_command": {
                    n: med([r["by_command"].get(n, 0.0) for r in runs])
                    for n in sorted(names)
                },
                "in_scripts_per_s_per_process": med(
                    [r["in_scripts_per_s_per_process"] for r in runs]
                ),
                "in_scripts": {
                    n: med([r["in_scripts"].get(n, 0.0) for r in runs])
                    for n in sorted(inner)
                },
            }
        summary["idle"] = idle_summary
    if report.get("idle_brokers"):
        summary["idle_brokers"] = {
            kind: {
                mode: med(
                    [
                        r["sent_per_s_per_process"]
                        for r in report["idle_brokers"]
                        if r["kind"] == kind and r["mode"] == mode
                    ]
                )
                for mode in FLEET_MODES
            }
            for kind in ("rabbitmq", "nats")
        }
    if report.get("fill"):
        means = {
            shape: med([r["mean_batch"] for r in report["fill"] if r["shape"] == shape])
            for shape in (
                "one",
                "fleet16",
                "one_rabbitmq",
                "fleet4_rabbitmq",
                "one_nats",
                "fleet4_nats",
            )
        }
        summary["fill"] = {
            "mean_batch": means,
            "ratio": means["fleet16"] / means["one"],
            "rabbitmq_ratio": means["fleet4_rabbitmq"] / means["one_rabbitmq"],
            "nats_ratio": means["fleet4_nats"] / means["one_nats"],
        }
    return summary


def print_table(summary: dict[str, Any]) -> None:
    """The fleet table."""
    print("\n=== fleet mode: cost and fill (medians over interleaved rounds)")
    for name, label in (("one_key", "one key"), ("many_keys", "many keys")):
        part = summary.get(name)
        if part is None:
            continue
        rates, cpu = part["steady_items_per_s"], part["cpu_us_per_item"]
        spread = part["round_ratios"]
        print(
            f"  saturation, {label} ({part['keys']}): steady fleet "
            f"{rates['fleet']:,.0f} / fleet=false {rates['per_process']:,.0f} "
            f"items/s = {part['ratio']:.2f}x (rounds {min(spread):.2f}.."
            f"{max(spread):.2f}x; whole drain {part['whole_ratio']:.2f}x); CPU "
            f"{cpu['fleet']:.0f} vs {cpu['per_process']:.0f} µs/item; "
            f"moved {part['moved']:.0%}"
        )
    for mode, part in summary.get("idle", {}).items():
        label = "fleet" if mode == "fleet" else "fleet=false"
        commands = ", ".join(f"{n} {v:.2f}" for n, v in part["by_command"].items())
        inner = ", ".join(f"{n} {v:.2f}" for n, v in part["in_scripts"].items())
        print(
            f"  idle, {label}: {part['commands_per_s_per_process']:.2f} "
            f"commands/s/process ({commands or 'none'}); in scripts "
            f"{part['in_scripts_per_s_per_process']:.2f} ({inner or 'none'})"
        )
    units = {
        "rabbitmq": "socket reads of RabbitMQ",
        "nats": "messages published to NATS",
    }
    for kind, part in summary.get("idle_brokers", {}).items():
        print(
            f"  idle on {kind}: fleet {part['fleet']:.2f} vs fleet=false "
            f"{part['per_process']:.2f} {units[kind]}/s/process"
        )
    part = summary.get("fill")
    if part is not None:
        means = part["mean_batch"]
        print(
            f"  fill, fleet of 16 (4 x 4, 5 ms calls): mean batch "
            f"{means['fleet16']:.2f} vs one process {means['one']:.2f} = "
            f"{part['ratio']:.2f}x"
        )
        print(
            f"  fill on RabbitMQ, fleet of 4 (2 x 2, 5 ms calls, 39 keys): mean "
            f"batch {means['fleet4_rabbitmq']:.2f} vs one process "
            f"{means['one_rabbitmq']:.2f} = {part['rabbitmq_ratio']:.2f}x"
        )
        print(
            f"  fill on NATS JetStream, fleet of 4 (2 x 2, 5 ms calls): mean batch "
            f"{means['fleet4_nats']:.2f} vs one process {means['one_nats']:.2f} = "
            f"{part['nats_ratio']:.2f}x"
        )


def main() -> int:
    """Run the parts asked for, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--many-items", type=int, default=100000)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--idle-rounds", type=int, default=2)
    parser.add_argument("--fill-rounds", type=int, default=2)
    parser.add_argument("--parts", default="saturation,idle,fill")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.items, args.rounds, args.idle_seconds = 4000, 1, 8.0
        args.many_items = 10000
        args.idle_rounds, args.fill_rounds = 1, 1
    report = asyncio.run(main_async(args))
    print_table(report["summary"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
