"""PostgreSQL alone: one INSERT per row vs one COPY / executemany per 100 rows.

    .venv/bin/python bench/pg_direct.py [--rows 20000] [--rounds 3] [--json PATH]

No queue and no worker: the database side of ``bench/drain.py``'s PostgreSQL
modes, measured in this process with the same table shape, the same rows and
the same pool size per worker process (asyncpg, 4 connections, two pools as
two worker processes would have). ``insert``: every row its own INSERT
(autocommit), up to 500 in flight; ``copy`` / ``executemany``: groups of 100
rows, one call each. Rounds are interleaved; each run uses a fresh table,
counted (rows and distinct ids must equal --rows) and dropped. Needs
PostgreSQL on 127.0.0.1:5432, database ``test``, and asyncpg.
"""

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

DSN = "postgresql://postgres@127.0.0.1:5432/test"
POOL = 4
POOLS = 2
GROUP = 100
IN_FLIGHT = 500


async def run(way: str, rows: int) -> float:
    """Rows per second writing `rows` rows `way`."""
    table = f"bench_pg_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(DSN)
    await admin.execute(f"CREATE TABLE {table} (id integer NOT NULL, payload text)")
    pools: list[Any] = [
        await asyncpg.create_pool(DSN, min_size=POOL, max_size=POOL)
        for _ in range(POOLS)
    ]
    insert = f"INSERT INTO {table} (id, payload) VALUES ($1, $2)"

    async def write(first: int, last: int) -> None:
        pool = pools[first // GROUP % POOLS]
        records = [(i, f"item {i}") for i in range(first, last)]
        if way == "insert":
            await asyncio.gather(*(pool.execute(insert, *r) for r in records))
        elif way == "copy":
            await pool.copy_records_to_table(
                table, records=records, columns=["id", "payload"]
            )
        else:
            await pool.executemany(insert, records)

    try:
        started = time.perf_counter()
        for first in range(0, rows, IN_FLIGHT):
            last = min(first + IN_FLIGHT, rows)
            await asyncio.gather(
                *(
                    write(start, min(start + GROUP, last))
                    for start in range(first, last, GROUP)
                )
            )
        elapsed = time.perf_counter() - started
        counted = await admin.fetchrow(
            f"SELECT count(*) AS n, count(DISTINCT id) AS d FROM {table}"
        )
    finally:
        for pool in pools:
            await pool.close()
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.close()
    if (counted["n"], counted["d"]) != (rows, rows):
        raise SystemExit(f"{way}: table holds {tuple(counted)}, expected {rows}")
    return rows / elapsed


async def main() -> None:
    """Measure, print, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the rates")
    args = parser.parse_args()
    ways = ["insert", "copy", "executemany"]
    rates: dict[str, list[float]] = {way: [] for way in ways}
    for round_ in range(args.rounds):
        for way in ways if round_ % 2 == 0 else ways[::-1]:
            rates[way].append(await run(way, args.rows))
    print(
        f"PostgreSQL alone: {args.rows} rows, {args.rounds} rounds, "
        f"{POOLS} pools of {POOL}, groups of {GROUP}"
    )
    median = {way: statistics.median(values) for way, values in rates.items()}
    for way, values in rates.items():
        print(
            f"  {way:12} median {median[way]:9,.0f} rows/s "
            f"(min {min(values):,.0f}, max {max(values):,.0f})"
        )
    for way in ("copy", "executemany"):
        print(f"  {way} / insert: {median[way] / median['insert']:.1f}x")
    if args.json is not None:
        report = {"rows": args.rows, "rounds": args.rounds, "rates": rates}
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
