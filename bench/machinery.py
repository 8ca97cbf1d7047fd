"""In-process cost per item: a batched no-op vs taskiq's own no-op task.

    .venv/bin/python bench/machinery.py [--items 20000] [--rounds 5]

No broker: InMemoryBroker runs taskiq's receiver in this process, so the
figures are the receiver's per-message cost plus, for the batched task,
batchtask's entry point, batcher and fan-out. Rounds are interleaved; the
median and spread of µs per item are printed.
"""

import argparse
import asyncio
import statistics
import time
from typing import Any

from taskiq import InMemoryBroker

from batchtask import batch_task

broker = InMemoryBroker(max_stored_results=-1)


@batch_task(broker, batch_size=100, batch_timeout=0.5, task_name="bench:batched")
async def batched(items: list[int]) -> None:
    return None


@broker.task(task_name="bench:plain")
async def plain(item: int) -> None:
    return None


async def per_item_us(task: Any, items: int) -> float:
    started = time.perf_counter()
    for first in range(0, items, 500):
        await asyncio.gather(*(task.kiq(i) for i in range(first, first + 500)))
    await broker.wait_all()
    return (time.perf_counter() - started) / items * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description="in-process cost per item")
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    await broker.startup()
    await per_item_us(plain, 2000)
    await per_item_us(batched, 2000)
    runs: dict[str, list[float]] = {"plain": [], "batched": []}
    for _ in range(args.rounds):
        runs["plain"].append(await per_item_us(plain, args.items))
        runs["batched"].append(await per_item_us(batched, args.items))
    await broker.shutdown()
    print(
        f"{args.items} items x {args.rounds} interleaved rounds: "
        "kiq + receiver + result"
    )
    for name, values in runs.items():
        print(
            f"  {name:<8} median {statistics.median(values):7.1f} µs/item  "
            f"(min {min(values):.1f}, max {max(values):.1f})"
        )
    ratio = statistics.median(runs["batched"]) / statistics.median(runs["plain"])
    print(f"  batched / plain: {ratio:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
