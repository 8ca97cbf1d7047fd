"""In-process cost per item: batchtask's machinery vs taskiq's own per-message cost.

    .venv/bin/python bench/machinery.py [--items 20000] [--rounds 7] [--json PATH]

No broker and no I/O: messages are encoded once up front and handed to
taskiq's `Receiver.callback` in this process, 500 at a time; results go to
a result backend that drops them (taskiq's ``DummyResultBackend``), so no
stored result grows the heap. Three measurements, interleaved per round:

- ``taskiq``: a plain no-op ``@broker.task`` through the receiver: taskiq's
  own cost per message (parse, middlewares, run, result, done);
- ``batched``: a no-op batch task (batch_size 100) through the same receiver
  (batchtask's entry point: a task per message, as on a stock worker);
- ``native``: the same messages through `BatchReceiver`'s batch-native path
  (``--receiver batchtask:BatchReceiver``): each delivery taken as it is
  read, the batch's results and outcomes per batch;
- ``entry`` vs ``coroutine``: batchtask's entry point called directly in
  a task per item (validate, key, buffer, one call per batch, fan-out of the
  outcome), against a no-op coroutine in a task per item. Their difference
  is batchtask's machinery alone, per item.

Prints medians (and spread) in µs per item and ratios to taskiq's cost: the
machinery alone, batched minus taskiq through the receiver (which also counts
what waiting costs taskiq's own per-message objects: one more task step, and
garbage collection of the objects a waiting item keeps), and native minus
taskiq: what a batched item adds over a plain message, on the native path
(negative: it costs less than taskiq's own message).
"""

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from taskiq import InMemoryBroker
from taskiq.message import TaskiqMessage
from taskiq.receiver import Receiver
from taskiq.result_backends.dummy import DummyResultBackend

from batchtask import BatchReceiver, batch_task

CHUNK = 500

broker = InMemoryBroker().with_result_backend(DummyResultBackend())


@batch_task(broker, batch_size=100, batch_timeout=0.5, task_name="bench:batched")
async def batched(items: list[int]) -> None:
    return None


@broker.task(task_name="bench:plain")
async def plain(item: int) -> None:
    return None


async def no_op(item: int) -> None:
    return None


def encode(task_name: str, items: int) -> list[bytes]:
    """One encoded message per item, as a broker would deliver them."""
    return [
        broker.formatter.dumps(
            TaskiqMessage(
                task_id=f"{task_name}-{i}",
                task_name=task_name,
                labels={},
                args=[i],
                kwargs={},
            )
        ).message
        for i in range(items)
    ]


async def through_receiver(receiver: Receiver, messages: list[bytes]) -> float:
    """µs per message handed to `receiver.callback`, CHUNK at a time."""
    started = time.perf_counter()
    for first in range(0, len(messages), CHUNK):
        chunk = messages[first : first + CHUNK]
        await asyncio.gather(*(receiver.callback(message) for message in chunk))
    return (time.perf_counter() - started) / len(messages) * 1e6


async def through_native(receiver: BatchReceiver, messages: list[bytes]) -> float:
    """µs per message taken by the batch-native path, CHUNK at a time."""
    native = receiver.native
    assert native is not None
    started = time.perf_counter()
    for first in range(0, len(messages), CHUNK):
        for message in messages[first : first + CHUNK]:
            native.take(message, owns_delivery_slot=False)
        await native.wait_idle()
    return (time.perf_counter() - started) / len(messages) * 1e6


async def direct(call: Callable[[int], Awaitable[Any]], items: int) -> float:
    """µs per item calling `call` in a task per item, CHUNK at a time."""
    started = time.perf_counter()
    for first in range(0, items, CHUNK):
        await asyncio.gather(*(call(i) for i in range(first, first + CHUNK)))
    return (time.perf_counter() - started) / items * 1e6


async def main() -> None:
    """Measure, print, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="write the figures")
    args = parser.parse_args()
    items = args.items - args.items % CHUNK or CHUNK

    await broker.startup()
    receiver = Receiver(broker, max_async_tasks=100)
    batch_receiver = BatchReceiver(broker, max_async_tasks=100, run_startup=False)
    assert batch_receiver.native is not None
    batch_receiver.native.start()
    entry = broker.find_task("bench:batched")
    assert entry is not None
    entry_point = entry.original_func
    plain_messages = encode("bench:plain", items)
    batched_messages = encode("bench:batched", items)
    ways: dict[str, Callable[[], Awaitable[float]]] = {
        "taskiq": lambda: through_receiver(receiver, plain_messages),
        "batched": lambda: through_receiver(receiver, batched_messages),
        "native": lambda: through_native(batch_receiver, batched_messages),
        "coroutine": lambda: direct(no_op, items),
        "entry": lambda: direct(entry_point, items),
    }
    for measure in ways.values():  # warm up
        await measure()
    runs: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(args.rounds):
        order = list(ways) if round_ % 2 == 0 else list(ways)[::-1]
        for name in order:
            runs[name].append(await ways[name]())
    await broker.shutdown()

    median = {name: statistics.median(values) for name, values in runs.items()}
    machinery = median["entry"] - median["coroutine"]
    waiting = median["batched"] - median["taskiq"]
    native = median["native"] - median["taskiq"]
    print(f"{items} items x {args.rounds} interleaved rounds, µs per item (median)")
    labels = {
        "taskiq": "taskiq no-op task through the receiver",
        "batched": "batched no-op through the receiver",
        "native": "batched no-op, BatchReceiver's native path",
        "coroutine": "a no-op coroutine in a task",
        "entry": "batchtask's entry point in a task",
    }
    for name, values in runs.items():
        print(
            f"  {labels[name]:44} {median[name]:6.1f}"
            f"  (min {min(values):.1f}, max {max(values):.1f})"
        )
    print(
        f"  machinery alone (entry - coroutine): {machinery:.1f} µs/item = "
        f"{machinery / median['taskiq']:.2f}x taskiq's per-message cost"
    )
    print(
        f"  through the receiver (batched - taskiq): {waiting:.1f} µs/item = "
        f"{waiting / median['taskiq']:.2f}x taskiq's per-message cost"
    )
    print(
        f"  native path (native - taskiq): {native:.1f} µs/item = "
        f"{native / median['taskiq']:.2f}x taskiq's per-message cost"
    )
    if args.json is not None:
        report = {
            "items": items,
            "rounds": args.rounds,
            "us_per_item": runs,
            "median_us": median,
            "machinery_us": machinery,
            "machinery_ratio": machinery / median["taskiq"],
            "receiver_delta_us": waiting,
            "receiver_delta_ratio": waiting / median["taskiq"],
            "native_delta_us": native,
            "native_delta_ratio": native / median["taskiq"],
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
