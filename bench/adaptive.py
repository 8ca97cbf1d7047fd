"""adaptive=True vs a fixed batch_timeout: a trickle's latency, a burst's batches.

    .venv/bin/python bench/adaptive.py [--trickle-items 200] [--interval 0.05]
        [--burst-items 2000] [--burst-way many|gather] [--workers 1]
        [--json bench/results/adaptive.json]

One batch task (``batch_size=100, batch_timeout=2``, ``results="per_item"``;
each call sleeps 5 ms), run by a real ``taskiq worker adaptive:broker
--receiver batchtask:BatchReceiver`` (``--workers`` processes) on a Redis
stream with results in Redis, once with ``adaptive=True`` and once without
(the reference, same run). Each (phase, mode) gets a fresh worker and stream:

- trickle: one ``kiq`` every `--interval` seconds; each item's latency runs
  from just before its ``kiq`` to its result read back (``wait_result``
  polling every 2 ms). Goal: median < 100 ms with adaptive (a fixed 2 s
  timeout spreads a trickle's items over 0..2 s of waiting);
- burst: `--burst-items` items sent as fast as possible (``kiq_many``, or
  ``--burst-way gather``: concurrent ``kiq``) to a listening worker. Goal:
  mean batch size (items / calls) >= 90 with adaptive.

Calls are counted inside the batch function: each call's start time and size
go to a Redis list (pushed every 10 ms by a background task, off the call's
path), printed as batch sizes over time. Needs Redis on 127.0.0.1:6379.
"""

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from drain import (
    HERE,
    POLL_EVERY,
    REDIS_URL,
    STALL_LIMIT,
    STARTUP_LIMIT,
    LogWatcher,
    kill,
    log_tail,
    make_broker,
    remove_queue,
    require_servers,
)
from latency import percentile
from taskiq import AsyncBroker, TaskiqEvents, TaskiqState

from batchtask import batch_task

ENV_QUEUE = "BENCH_ADAPTIVE_QUEUE"
ENV_ADAPTIVE = "BENCH_ADAPTIVE_ON"
BATCH_SIZE = 100
BATCH_TIMEOUT = 2.0
CALL_SECONDS = 0.005
FLUSH_EVERY = 0.01
TRICKLE_GOAL_S = 0.100
BURST_GOAL = 90
MODES = {"adaptive": True, "fixed": False}


class CallLog:
    """Each call's (wall-clock start, size), pushed to a Redis list every 10 ms."""

    def __init__(self, key: str) -> None:
        """Push to the Redis list `key`."""
        self.key = key
        self.calls: list[str] = []
        self._flusher: asyncio.Task[None] | None = None

    def add(self, size: int) -> None:
        """Record one call of `size` items starting now (no I/O)."""
        self.calls.append(f"{time.time():.6f} {size}")

    async def start(self, state: TaskiqState) -> None:
        """Start the pusher (a WORKER_STARTUP handler)."""
        self._flusher = asyncio.create_task(self._push_forever())

    async def _push_forever(self) -> None:
        client = redis.from_url(REDIS_URL)
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            if self.calls:
                calls, self.calls = self.calls, []
                await client.rpush(self.key, *calls)


def build_app(queue: str, adaptive: bool) -> tuple[AsyncBroker, Any]:
    """The broker on `queue` and its batch task (adaptive or not)."""
    broker = make_broker("stream", queue)
    log = CallLog(f"{queue}:done")  # drain.remove_queue deletes this key
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, log.start)

    @batch_task(
        broker,
        batch_size=BATCH_SIZE,
        batch_timeout=BATCH_TIMEOUT,
        results="per_item",
        adaptive=adaptive,
        task_name="adaptive:echo",
    )
    async def echo(values: list[int]) -> list[int]:
        log.add(len(values))
        await asyncio.sleep(CALL_SECONDS)
        return values

    return broker, echo


if os.environ.get(ENV_QUEUE):
    # Imported by `taskiq worker adaptive:broker`, configured by the environment.
    broker, _task = build_app(os.environ[ENV_QUEUE], os.environ[ENV_ADAPTIVE] == "1")


async def calls_of(client: "redis.Redis", queue: str) -> list[tuple[float, int]]:
    """(start, size) of every call pushed so far."""
    raw = await client.lrange(f"{queue}:done", 0, -1)
    pairs = [(e.decode() if isinstance(e, bytes) else e).split() for e in raw]
    return [(float(began), int(size)) for began, size in pairs]


def start_worker(
    queue: str, mode: str, workers: int, log: Path
) -> subprocess.Popen[bytes]:
    """``taskiq worker adaptive:broker`` in its own process group, output to `log`."""
    env = {**os.environ, ENV_QUEUE: queue, ENV_ADAPTIVE: "1" if MODES[mode] else "0"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    command = [sys.executable, "-m", "taskiq", "worker", "adaptive:broker"]
    command += ["--workers", str(workers), "--receiver", "batchtask:BatchReceiver"]
    with log.open("wb") as out:  # a file, not a pipe that could fill up
        return subprocess.Popen(
            command,
            cwd=HERE,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def run(
    phase: str, mode: str, items: int, interval: float, way: str, workers: int
) -> dict[str, Any]:
    """Start a worker, send the phase's items, wait for every call; raw figures."""
    queue = f"bench-adaptive-{uuid.uuid4().hex[:10]}"
    log = Path(tempfile.gettempdir()) / f"{queue}.log"
    worker = start_worker(queue, mode, workers, log)
    producer, task = build_app(queue, MODES[mode])
    client = redis.from_url(REDIS_URL)
    task_ids: list[str] = []
    failed = True
    try:
        watcher, started = LogWatcher(log), time.perf_counter()
        while watcher.poll() < workers:
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited ({worker.returncode}) at startup")
            if time.perf_counter() - started > STARTUP_LIMIT:
                raise SystemExit(f"the worker did not listen in {STARTUP_LIMIT} s")
            await asyncio.sleep(POLL_EVERY)
        await producer.startup()
        began = time.time()
        latencies: list[float] = []
        if phase == "trickle":

            async def one(value: int) -> float:
                kicked = time.perf_counter()
                sent = await task.kiq(value)
                task_ids.append(sent.task_id)
                result = await sent.wait_result(check_interval=0.002, timeout=60)
                if result.is_err or result.return_value != value:
                    raise SystemExit(f"item {value}: {result.error or result}")
                return time.perf_counter() - kicked

            pending = []
            for value in range(items):
                pending.append(asyncio.create_task(one(value)))
                await asyncio.sleep(interval)
            latencies = list(await asyncio.gather(*pending))
        elif way == "many":
            task_ids = [sent.task_id for sent in await task.kiq_many(range(items))]
        else:
            sent = await asyncio.gather(*(task.kiq(i) for i in range(items)))
            task_ids = [each.task_id for each in sent]
        kicked_s = time.time() - began
        calls, last_change = await calls_of(client, queue), time.perf_counter()
        while sum(size for _, size in calls) < items:
            await asyncio.sleep(POLL_EVERY)
            now = await calls_of(client, queue)
            if len(now) != len(calls):
                last_change = time.perf_counter()
            calls = now
            if time.perf_counter() - last_change > STALL_LIMIT:
                raise SystemExit(f"{phase} {mode}: no call for {STALL_LIMIT} s")
        failed = False
    finally:
        with contextlib.suppress(Exception):
            await producer.shutdown()
        kill(worker)
        await client.aclose()
        await remove_queue("stream", queue, task_ids)
        if failed and log.exists():
            print(log_tail(log), file=sys.stderr)
        log.unlink(missing_ok=True)
    sizes = [size for _, size in calls]
    figures: dict[str, Any] = {
        "phase": phase,
        "mode": mode,
        "items": items,
        "kick_s": kicked_s,
        "calls": len(calls),
        "mean_batch_size": sum(sizes) / len(calls),
        "last_call_s": max(t for t, _ in calls) - began,
        "call_log": [[round(t - began, 4), size] for t, size in sorted(calls)],
    }
    if latencies:
        figures.update(
            p50_s=statistics.median(latencies),
            p90_s=percentile(latencies, 0.9),
            max_s=max(latencies),
            latencies_s=latencies,
        )
    return figures


def over_time(call_log: list[list[float]], limit: int = 24) -> str:
    """Batch sizes in call order as "t_ms:size", runs of equal sizes folded."""
    runs: list[list[Any]] = []
    for t, size in call_log:
        if runs and runs[-1][1] == size:
            runs[-1][2] += 1
        else:
            runs.append([t, size, 1])
    text = [
        f"{t * 1000:.0f}:{size}" + (f"x{count}" if count > 1 else "")
        for t, size, count in runs[:limit]
    ]
    return " ".join(text) + (f" ... ({len(runs) - limit} more)" if runs[limit:] else "")


def report(result: dict[str, Any]) -> list[str]:
    """A run's printed lines."""
    head = f"  {result['phase']:7} {result['mode']:8}"
    sizes = Counter(size for _, size in result["call_log"])
    common = ", ".join(f"{s}x{n}" for s, n in sorted(sizes.most_common(6)))
    tail = (
        f"{result['calls']} calls, mean batch {result['mean_batch_size']:.1f}, "
        f"last call at {result['last_call_s']:.2f} s; commonest sizes {common}"
    )
    if result["phase"] == "trickle":
        lines = [
            f"{head} latency p50 {result['p50_s'] * 1000:7.1f} ms, "
            f"p90 {result['p90_s'] * 1000:7.1f} ms, "
            f"max {result['max_s'] * 1000:7.1f} ms; {tail}"
        ]
    else:
        lines = [f"{head} kicked in {result['kick_s'] * 1000:.0f} ms; {tail}"]
    return [
        *lines,
        f"    sizes over time (ms since first kick:size): "
        f"{over_time(result['call_log'])}",
    ]


async def main() -> int:
    """Run trickle and burst, each with and without adaptive; print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trickle-items", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--burst-items", type=int, default=2000)
    parser.add_argument("--burst-way", choices=["many", "gather"], default="many")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "adaptive.json")
    args = parser.parse_args()
    require_servers(["stream"])
    print(
        f"batch_size {BATCH_SIZE}, batch_timeout {BATCH_TIMEOUT:g} s, call "
        f"{CALL_SECONDS * 1000:.0f} ms; Redis stream, BatchReceiver, "
        f"{args.workers} worker process(es); trickle {args.trickle_items} items "
        f"every {args.interval * 1000:.0f} ms; burst {args.burst_items} items "
        f"({'kiq_many' if args.burst_way == 'many' else 'concurrent kiq'})",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {"trickle": {}, "burst": {}}
    for phase, items in (("trickle", args.trickle_items), ("burst", args.burst_items)):
        for mode in MODES:
            done = await run(
                phase, mode, items, args.interval, args.burst_way, args.workers
            )
            results[phase][mode] = done
            print("\n".join(report(done)), flush=True)
    trickle, burst = results["trickle"], results["burst"]
    p50 = trickle["adaptive"]["p50_s"]
    size = burst["adaptive"]["mean_batch_size"]
    print(
        f"goal trickle median < {TRICKLE_GOAL_S * 1000:.0f} ms with adaptive: "
        f"{p50 * 1000:.1f} ms {'met' if p50 < TRICKLE_GOAL_S else 'NOT met'} "
        f"(without: {trickle['fixed']['p50_s'] * 1000:.0f} ms)"
    )
    print(
        f"goal burst mean batch >= {BURST_GOAL} with adaptive: {size:.1f} "
        f"{'met' if size >= BURST_GOAL else 'NOT met'} "
        f"(without: {burst['fixed']['mean_batch_size']:.1f})"
    )
    summary = {
        "command": sys.argv,
        "settings": {
            "batch_size": BATCH_SIZE,
            "batch_timeout_s": BATCH_TIMEOUT,
            "call_s": CALL_SECONDS,
            "interval_s": args.interval,
            "burst_way": args.burst_way,
            "workers": args.workers,
        },
        "goals": {"trickle_p50_s": TRICKLE_GOAL_S, "burst_mean_batch": BURST_GOAL},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"raw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
