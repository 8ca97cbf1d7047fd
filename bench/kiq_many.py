"""Producer side: ``kiq_many`` vs a loop of ``await kiq`` on a Redis broker.

    .venv/bin/python bench/kiq_many.py [--items N] [--rounds N] [--broker stream|list]
        [--json PATH]

Only the producer runs (no worker): each round sends `--items` items to a
fresh queue one way, then the other (order alternating), and deletes the
queue. Prints the median and spread of items/s per way and their ratio.
Needs Redis on 127.0.0.1:6379.
"""

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path

import redis.asyncio as redis
from taskiq import AsyncBroker
from taskiq_redis import ListQueueBroker, RedisStreamBroker

from batchtask import batch_task

REDIS_URL = "redis://127.0.0.1:6379"


def make(kind: str, queue: str) -> AsyncBroker:
    if kind == "stream":
        return RedisStreamBroker(REDIS_URL, queue_name=queue)
    return ListQueueBroker(REDIS_URL, queue_name=queue)


async def rate(kind: str, way: str, items: int) -> float:
    """Items per second sending `items` items with `way` ("loop" or "many")."""
    queue = f"bench-kiq-{uuid.uuid4().hex[:8]}"
    broker = make(kind, queue)

    @batch_task(broker, batch_size=100, batch_timeout=1.0, task_name="bench:save")
    async def save(rows: list[int], table: str) -> None:
        return None

    await broker.startup()
    try:
        started = time.perf_counter()
        if way == "loop":
            for i in range(items):
                await save.kiq(i, "events")
        else:
            await save.kiq_many(range(items), "events")
        elapsed = time.perf_counter() - started
    finally:
        await broker.shutdown()
        client = redis.from_url(REDIS_URL)
        sent = await (client.xlen(queue) if kind == "stream" else client.llen(queue))
        await client.delete(queue)
        await client.aclose()
    if sent != items:
        raise SystemExit(f"{way}: {sent} messages in the queue, expected {items}")
    return items / elapsed


async def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--broker", choices=["stream", "list"], default="stream")
    parser.add_argument("--json", type=Path, default=None, help="write the rates")
    args = parser.parse_args()

    rates: dict[str, list[float]] = {"loop": [], "many": []}
    for round_ in range(args.rounds):
        for way in ("loop", "many") if round_ % 2 == 0 else ("many", "loop"):
            rates[way].append(await rate(args.broker, way, args.items))

    print(f"{args.items} items to a Redis {args.broker}, {args.rounds} rounds")
    for way, label in (("loop", "await kiq() loop"), ("many", "kiq_many()")):
        runs = rates[way]
        print(
            f"  {label:17} median {statistics.median(runs):8.0f} items/s "
            f"(min {min(runs):.0f}, max {max(runs):.0f})"
        )
    ratio = statistics.median(rates["many"]) / statistics.median(rates["loop"])
    print(f"  kiq_many / loop: {ratio:.1f}x")
    if args.json is not None:
        report = {"items": args.items, "broker": args.broker, "rates": rates}
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
