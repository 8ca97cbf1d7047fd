"""Latency of a trickle: from ``kiq`` to the stored result, through a worker.

    .venv/bin/python bench/latency.py [--items 200] [--interval 0.05]
        [--batch-timeout 0.2] [--receiver] [--json PATH]

Starts one ``taskiq worker`` process (``-w 1``, this file's ``broker``: a Redis stream
with results in Redis), then sends one item every `--interval` seconds, far
below ``batch_size / batch_timeout``, so every batch is flushed by its timer.
Each item's latency is measured from just before its ``kiq`` to the moment
its result is read back (``wait_result`` polling every 2 ms). Prints p50,
p90, p99 and max, and the bound the design promises: ``batch_timeout`` plus
one call plus 10 ms. ``--receiver`` starts the worker with
``--receiver batchtask:BatchReceiver``. Needs Redis on 127.0.0.1:6379.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from batchtask import batch_task

REDIS_URL = "redis://127.0.0.1:6379"
QUEUE = os.environ.get("BATCHTASK_LATENCY_QUEUE", "bench-latency")
BATCH_TIMEOUT = float(os.environ.get("BATCHTASK_LATENCY_TIMEOUT", "0.2"))
CALL_SECONDS = 0.005
"""What one call of the batch function takes (a sleep)."""

broker = RedisStreamBroker(
    REDIS_URL, queue_name=QUEUE, consumer_group_name=QUEUE
).with_result_backend(RedisAsyncResultBackend(REDIS_URL, result_ex_time=600))


@batch_task(
    broker,
    batch_size=100,
    batch_timeout=BATCH_TIMEOUT,
    results="per_item",
    task_name="latency:echo",
)
async def echo(values: list[int]) -> list[int]:
    """Return each value after one short call."""
    await asyncio.sleep(CALL_SECONDS)
    return values


def percentile(values: list[float], share: float) -> float:
    """The value below which `share` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def measure(items: int, interval: float) -> list[float]:
    """Latency in seconds of each of `items` items sent `interval` apart."""
    await broker.startup()
    try:
        pending: list[asyncio.Task[float]] = []

        async def one(value: int) -> float:
            started = time.perf_counter()
            task = await echo.kiq(value)
            result = await task.wait_result(check_interval=0.002, timeout=60)
            if result.is_err or result.return_value != value:
                raise SystemExit(f"item {value}: {result.error or result.return_value}")
            return time.perf_counter() - started

        for value in range(items):
            pending.append(asyncio.create_task(one(value)))
            await asyncio.sleep(interval)
        return list(await asyncio.gather(*pending))
    finally:
        await broker.shutdown()


def main() -> None:
    """Run a worker, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--batch-timeout", type=float, default=BATCH_TIMEOUT)
    parser.add_argument("--receiver", action="store_true", help="use BatchReceiver")
    parser.add_argument("--json", type=Path, default=None, help="write latencies")
    args = parser.parse_args()

    queue = f"bench-latency-{os.getpid()}"
    env = {
        **os.environ,
        "BATCHTASK_LATENCY_QUEUE": queue,
        "BATCHTASK_LATENCY_TIMEOUT": str(args.batch_timeout),
        "PYTHONPATH": str(Path(__file__).parent),
    }
    os.environ.update(env)
    log = Path(tempfile.mkdtemp()) / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskiq",
                "worker",
                "latency:broker",
                "-w",
                "1",
                *(("--receiver", "batchtask:BatchReceiver") if args.receiver else ()),
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        for _ in range(300):
            if "Listening started" in log.read_text(errors="replace"):
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"the worker did not start; see {log}")
        # Re-import with this run's queue and timeout.
        sys.modules.pop("latency", None)
        sys.path.insert(0, str(Path(__file__).parent))
        import latency

        latencies = asyncio.run(latency.measure(args.items, args.interval))
    finally:
        os.killpg(worker.pid, 9)
        worker.wait()
        subprocess.run(["redis-cli", "del", queue], capture_output=True, check=False)

    bound = args.batch_timeout + CALL_SECONDS + 0.010
    print(
        f"{args.items} items, one every {args.interval * 1000:.0f} ms, "
        f"batch_timeout {args.batch_timeout * 1000:.0f} ms, "
        f"call {CALL_SECONDS * 1000:.0f} ms (Redis stream, one worker process)"
    )
    print(
        "  kiq -> stored result: "
        f"p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
        f"p90 {percentile(latencies, 0.9) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms, "
        f"mean {statistics.mean(latencies) * 1000:.1f} ms"
    )
    print(
        f"  bound batch_timeout + call + 10 ms = {bound * 1000:.0f} ms: "
        f"p99 {'within' if percentile(latencies, 0.99) <= bound else 'ABOVE'}"
    )
    if args.json is not None:
        report = {
            "items": args.items,
            "interval_s": args.interval,
            "batch_timeout_s": args.batch_timeout,
            "call_s": CALL_SECONDS,
            "receiver": "batchtask" if args.receiver else "stock",
            "bound_s": bound,
            "p50_s": percentile(latencies, 0.5),
            "p90_s": percentile(latencies, 0.9),
            "p99_s": percentile(latencies, 0.99),
            "max_s": max(latencies),
            "latencies_s": latencies,
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
