"""batchtask demo: write N rows to SQLite through taskiq, unbatched and batched.

    python examples/demo.py                       # InMemoryBroker, in-process
    python examples/demo.py --broker redis://127.0.0.1:6379   # a real worker

It prints progress while each run goes, then rows/s for both runs, the
speed-up, and how many calls the batched run made, of which sizes.
"""

import argparse
import asyncio
import collections
import importlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
DESCRIPTION = "Write N rows to SQLite through taskiq, unbatched and batched."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--rows", type=int, default=10000, help="rows per run (10000)")
    parser.add_argument("--batch-size", type=int, default=100, help="batch_size (100)")
    parser.add_argument(
        "--batch-timeout", type=float, default=0.5, help="batch_timeout in s (0.5)"
    )
    parser.add_argument(
        "--broker",
        default="",
        help="a redis:// URL to run a real `taskiq worker` process "
        "(default: InMemoryBroker in this process)",
    )
    parser.add_argument(
        "--json", default="", help="also write the figures to this file (JSON)"
    )
    return parser.parse_args()


def count_rows(db: str, mode: str) -> int:
    with sqlite3.connect(db, timeout=10) as connection:
        (count,) = connection.execute(
            "SELECT count(*) FROM events WHERE mode = ?", (mode,)
        ).fetchone()
    return int(count)


def call_sizes(db: str, mode: str) -> list[int]:
    with sqlite3.connect(db, timeout=10) as connection:
        rows = connection.execute("SELECT size FROM calls WHERE mode = ?", (mode,))
        return [int(size) for (size,) in rows]


async def show_progress(db: str, mode: str, total: int, started: float) -> float:
    """Print progress until every row is in; return when that happened."""
    shown = 0.0
    while True:
        done = count_rows(db, mode)
        now = time.perf_counter()
        if done >= total or now - shown >= 0.25:
            shown = now
            rate = done / (now - started)
            bar = "#" * int(30 * done / total)
            print(
                f"\r  {mode:<9} [{bar:<30}] {done:>6}/{total} rows {rate:>8.0f} rows/s",
                end="",
                flush=True,
            )
        if done >= total:
            print()
            return now
        await asyncio.sleep(0.01)


async def run(tasks: ModuleType, mode: str, rows: int, db: str) -> float:
    """Kick `rows` rows through one task and return the seconds until all are in."""
    task: Any = tasks.insert_one if mode == "unbatched" else tasks.insert_many
    started = time.perf_counter()
    progress = asyncio.create_task(show_progress(db, mode, rows, started))
    chunk = 500
    for first in range(0, rows, chunk):
        await asyncio.gather(
            *(
                task.kiq(tasks.Row(id=i, payload=f"event {i}"))
                for i in range(first, min(first + chunk, rows))
            )
        )
    finished = await asyncio.wait_for(progress, timeout=600)
    return finished - started


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "taskiq", "worker", "demo_tasks:broker"),
            *("--receiver", "batchtask:BatchReceiver"),
            *("--app-dir", str(HERE), "--log-level", "WARNING"),
        ],
        env=env,
        start_new_session=True,
    )


async def main() -> None:
    args = parse_args()
    workdir = tempfile.mkdtemp(prefix="batchtask-demo-")
    db = os.path.join(workdir, "demo.sqlite3")
    os.environ.update(
        DEMO_BROKER=args.broker,
        DEMO_DB=db,
        DEMO_BATCH_SIZE=str(args.batch_size),
        DEMO_BATCH_TIMEOUT=str(args.batch_timeout),
    )
    sys.path.insert(0, str(HERE))
    tasks = importlib.import_module("demo_tasks")
    tasks.create_tables(db)

    where = (
        f"a `taskiq worker` process on {args.broker}"
        if args.broker
        else ("InMemoryBroker, in this process")
    )
    print(f"batchtask demo: {args.rows} rows into SQLite ({db}) via {where}")
    print(
        f"  batched task: batch_size={args.batch_size}, "
        f"batch_timeout={args.batch_timeout}s; one durable commit per call"
    )
    worker = start_worker(dict(os.environ)) if args.broker else None
    await tasks.broker.startup()
    try:
        unbatched = await run(tasks, "unbatched", args.rows, db)
        batched = await run(tasks, "batched", args.rows, db)
    finally:
        await tasks.broker.shutdown()
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)

    sizes = call_sizes(db, "batched")
    histogram = collections.Counter(sizes)
    print()
    print(
        f"  unbatched: {args.rows / unbatched:>9.0f} rows/s  ({unbatched:.2f} s, "
        f"{len(call_sizes(db, 'unbatched'))} calls)"
    )
    print(
        f"  batched:   {args.rows / batched:>9.0f} rows/s  ({batched:.2f} s, "
        f"{len(sizes)} calls)"
    )
    print(f"  speed-up:  {unbatched / batched:>9.1f}x")
    print(
        f"  batches:   {len(sizes)} calls, sizes min {min(sizes)} / "
        f"mean {sum(sizes) / len(sizes):.1f} / max {max(sizes)}; "
        + ", ".join(f"{count}x{size}" for size, count in sorted(histogram.items()))
    )
    assert sum(sizes) == args.rows == count_rows(db, "batched"), (
        "every row written once"
    )
    if args.json:
        figures = {
            "rows": args.rows,
            "broker": args.broker or "InMemoryBroker",
            "unbatched_rows_per_s": args.rows / unbatched,
            "batched_rows_per_s": args.rows / batched,
            "speedup": unbatched / batched,
            "unbatched_calls": len(call_sizes(db, "unbatched")),
            "batched_calls": len(sizes),
            "mean_batch": sum(sizes) / len(sizes),
        }
        text = json.dumps(figures, indent=2) + "\n"
        await asyncio.to_thread(Path(args.json).write_text, text)


if __name__ == "__main__":
    asyncio.run(main())
