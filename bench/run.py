"""Every benchmark of bench/, one command: the goal tables, JSON and a chart.

    ./scripts/bench [--items 20000] [--rounds 3] [--quick]

(``scripts/bench`` installs the ``bench`` extra into .venv and runs this.)
Never part of the test run. Needs the local servers: Redis 6379, RabbitMQ
5672, NATS JetStream 4222, PostgreSQL 5432. Runs, one after the other, each
printing its own table:

1. ``drain.py``: worker drain rate, taskiq's own no-op task vs a batched
   no-op (``--receiver batchtask:BatchReceiver``), on a Redis stream,
   RabbitMQ and NATS, also with a 2 ms per-call cost under a process-wide lock,
   and on the Redis stream ``lean.py`` (redis-py alone, no taskiq) draining
   the same messages: how close the batched worker comes to a lean consumer;
2. ``drain.py`` PostgreSQL modes on a Redis stream, and ``pg_direct.py``
   (the database alone);
3. ``kiq_many.py``: producer side, ``kiq_many`` vs a loop of ``kiq``;
4. ``machinery.py``: in-process cost per item;
5. ``latency.py``: kiq to stored result for a trickle.

Then prints one table of the goals (each a ratio measured side by side in
this run: of the medians over interleaved rounds; for the no-op drain also the
lowest and highest ratio within one round), writes every figure to
``bench/results/summary.json`` (each benchmark's raw numbers next to it) and
draws ``bench/results/throughput.png`` (items/s by broker and mode).
``--quick`` is a smoke run (few items, one round); its figures are not
representative.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BROKERS = ["stream", "rabbitmq", "nats"]
BROKER_LABELS = {"stream": "Redis stream", "rabbitmq": "RabbitMQ", "nats": "NATS"}
DRAIN_MODES = ["plain", "batched", "lean", "plain_lock", "batched_lock"]
PG_MODES = ["plain_pg", "batched_pg", "batched_pg_many"]


def step(title: str, script: str, *args: str) -> None:
    """Run one benchmark script with this interpreter; stop if it fails."""
    print(f"\n=== {title}: bench/{script} {' '.join(args)}", flush=True)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, str(HERE / script), *args], check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench/{script} failed (exit {done.returncode})")
    print(f"=== {title}: {time.perf_counter() - began:.0f} s", flush=True)


def load(name: str) -> Any:
    """A benchmark's JSON output."""
    return json.loads((RESULTS / name).read_text())


def drain_rates(report: Any) -> dict[str, dict[str, list[float]]]:
    """items/s per broker and mode, every round."""
    rates: dict[str, dict[str, list[float]]] = {}
    for run in report["runs"]:
        if not run["profiled"]:
            by_mode = rates.setdefault(run["broker"], {})
            by_mode.setdefault(run["mode"], []).append(run["items_per_s"])
    return rates


def drain_rounds(report: Any) -> dict[str, dict[str, dict[int, float]]]:
    """items/s per broker, mode and round (to pair modes within a round)."""
    rounds: dict[str, dict[str, dict[int, float]]] = {}
    for run in report["runs"]:
        if not run["profiled"]:
            by_mode = rounds.setdefault(run["broker"], {})
            by_mode.setdefault(run["mode"], {})[run["round"]] = run["items_per_s"]
    return rounds


def paired(rounds: dict[str, dict[int, float]], top: str, bottom: str) -> list[float]:
    """Items/s of `top` / `bottom` within each round that measured both."""
    ours, theirs = rounds.get(top, {}), rounds.get(bottom, {})
    return [ours[n] / theirs[n] for n in sorted(ours) if n in theirs]


def med(values: list[float]) -> float:
    """The median."""
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """min-max of a list of rates."""
    return f"{min(values):,.0f}-{max(values):,.0f}"


def rounds_text(ratios: list[float]) -> str:
    """The lowest and highest of per-round ratios, for a goal's detail."""
    if not ratios:
        return ""
    return f"; rounds {min(ratios):.2f}-{max(ratios):.2f}x"


def goals(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal: what was measured, the target, and whether it was met."""
    drain = figures["drain"]
    rows: list[dict[str, Any]] = []
    for kind in BROKERS:
        modes = drain.get(kind, {})
        by_round = figures["drain_rounds"].get(kind, {})
        if "plain" in modes and "batched" in modes:
            value = med(modes["batched"]) / med(modes["plain"])
            each = paired(by_round, "batched", "plain")
            rows.append(
                {
                    "goal": f"1. no-op drain, batched / taskiq plain, {kind}",
                    "value": value,
                    "target": ">= 1.5x" if kind == "stream" else "(reported)",
                    "met": value >= 1.5 if kind == "stream" else None,
                    "detail": f"{med(modes['batched']):,.0f} vs "
                    f"{med(modes['plain']):,.0f} items/s{rounds_text(each)}",
                    "round_ratios": each,
                }
            )
        if "lean" in modes and "batched" in modes:
            # No target: how much of a lean consumer's rate the worker keeps.
            value = med(modes["batched"]) / med(modes["lean"])
            each = paired(by_round, "batched", "lean")
            rows.append(
                {
                    "goal": f"1. no-op drain, batched / lean redis-py, {kind}",
                    "value": value,
                    "target": "(reported)",
                    "met": None,
                    "detail": f"{med(modes['batched']):,.0f} vs "
                    f"{med(modes['lean']):,.0f} items/s{rounds_text(each)}",
                    "round_ratios": each,
                }
            )
    for kind in BROKERS:
        modes = drain.get(kind, {})
        if {"batched", "batched_lock", "plain_lock"} <= set(modes):
            ceiling = med(modes["batched_lock"]) / med(modes["batched"])
            versus = med(modes["batched_lock"]) / med(modes["plain_lock"])
            rows.append(
                {
                    "goal": f"2. 2 ms lock per call, {kind}: batched_lock / batched",
                    "value": ceiling,
                    "target": ">= 0.8x",
                    "met": ceiling >= 0.8,
                    "detail": f"{med(modes['batched_lock']):,.0f} items/s",
                }
            )
            rows.append(
                {
                    "goal": f"2. 2 ms lock per call, {kind}: batched / plain",
                    "value": versus,
                    "target": ">= 5x",
                    "met": versus >= 5,
                    "detail": f"{med(modes['plain_lock']):,.0f} items/s plain",
                }
            )
    pg = figures["drain_pg"].get("stream", {})
    for mode, how in (("batched_pg", "COPY"), ("batched_pg_many", "executemany")):
        if mode in pg and "plain_pg" in pg:
            value = med(pg[mode]) / med(pg["plain_pg"])
            rows.append(
                {
                    "goal": f"3. PostgreSQL through a worker, {how} / INSERT",
                    "value": value,
                    "target": ">= 10x (expected)",
                    "met": value >= 10,
                    "detail": f"{med(pg[mode]):,.0f} vs "
                    f"{med(pg['plain_pg']):,.0f} rows/s",
                }
            )
    direct = figures["pg_direct"]["rates"]
    for way in ("copy", "executemany"):
        value = med(direct[way]) / med(direct["insert"])
        rows.append(
            {
                "goal": f"3. PostgreSQL alone (no queue), {way} / INSERT",
                "value": value,
                "target": ">= 10x (expected)",
                "met": value >= 10,
                "detail": f"{med(direct[way]):,.0f} vs "
                f"{med(direct['insert']):,.0f} rows/s",
            }
        )
    kiq = figures["kiq_many"]["rates"]
    value = med(kiq["many"]) / med(kiq["loop"])
    rows.append(
        {
            "goal": "4. kiq_many / loop of kiq, Redis stream",
            "value": value,
            "target": ">= 5x",
            "met": value >= 5,
            "detail": f"{med(kiq['many']):,.0f} vs {med(kiq['loop']):,.0f} items/s",
        }
    )
    machinery = figures["machinery"]
    rows.append(
        {
            "goal": "5. machinery alone / taskiq per-message cost",
            "value": machinery["machinery_ratio"],
            "target": "<= 0.25x",
            "met": machinery["machinery_ratio"] <= 0.25,
            "detail": f"{machinery['machinery_us']:.1f} vs "
            f"{machinery['median_us']['taskiq']:.1f} µs/item",
        }
    )
    rows.append(
        {
            "goal": "5. through the receiver: (batched - taskiq) / taskiq",
            "value": machinery["receiver_delta_ratio"],
            "target": "(reported)",
            "met": None,
            "detail": f"{machinery['receiver_delta_us']:.1f} µs/item",
        }
    )
    latency = figures["latency"]
    rows.append(
        {
            "goal": "6. trickle latency p99 (ms) vs batch_timeout + call + 10 ms",
            "value": latency["p99_s"] * 1000,
            "target": f"<= {latency['bound_s'] * 1000:.0f} ms",
            "met": latency["p99_s"] <= latency["bound_s"],
            "detail": f"p50 {latency['p50_s'] * 1000:.1f} ms, "
            f"max {latency['max_s'] * 1000:.1f} ms",
        }
    )
    return rows


def print_goals(rows: list[dict[str, Any]]) -> None:
    """The goals table."""
    print("\n=== goals (medians over interleaved rounds, this run)")
    for row in rows:
        verdict = {True: "met", False: "NOT met", None: ""}[row["met"]]
        unit = "" if row["goal"].startswith("6.") else "x"
        print(
            f"  {row['goal']:62} {row['value']:7.2f}{unit:1} "
            f"{row['target']:>18} {verdict:8} {row['detail']}"
        )


def chart(figures: dict[str, Any], path: Path, stamp: str) -> None:
    """Grouped bars: items/s by broker and mode, with the rounds' spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: list[tuple[str, dict[str, list[float]], list[str]]] = [
        (BROKER_LABELS[kind], figures["drain"].get(kind, {}), DRAIN_MODES)
        for kind in BROKERS
    ]
    groups.append(
        ("PostgreSQL rows\n(Redis stream)", figures["drain_pg"].get("stream", {}), [])
    )
    labels = {
        "plain": "taskiq task, no-op",
        "batched": "batchtask, no-op",
        "lean": "lean redis-py consumer, no-op",
        "plain_lock": "taskiq task, 2 ms lock per call",
        "batched_lock": "batchtask, 2 ms lock per call",
        "plain_pg": "taskiq task, INSERT per item",
        "batched_pg": "batchtask, COPY per batch",
        "batched_pg_many": "batchtask, executemany per batch",
    }
    colours = {
        "plain": "#9e9e9e",
        "batched": "#1f77b4",
        "lean": "#ff7f0e",
        "plain_lock": "#d9d9d9",
        "batched_lock": "#6baed6",
        "plain_pg": "#bdbdbd",
        "batched_pg": "#2ca02c",
        "batched_pg_many": "#98df8a",
    }
    fig, ax = plt.subplots(figsize=(11, 5.8), dpi=110)
    width = 0.17  # five bars (lean too) on the Redis stream
    seen: set[str] = set()
    for index, (_, rates, modes) in enumerate(groups):
        present = [m for m in (modes or PG_MODES) if m in rates]
        for offset, mode in enumerate(present):
            values = rates[mode]
            x = index + (offset - (len(present) - 1) / 2) * width
            middle = med(values)
            ax.bar(
                x,
                middle,
                width,
                color=colours[mode],
                edgecolor="#333333",
                linewidth=0.5,
                label=labels[mode] if mode not in seen else None,
                yerr=[[middle - min(values)], [max(values) - middle]],
                capsize=2,
            )
            ax.text(x, middle, f"{middle:,.0f}", ha="center", va="bottom", fontsize=7)
            seen.add(mode)
    ax.set_xticks(range(len(groups)), [name for name, _, _ in groups])
    ax.set_ylabel("items/s drained by one worker (2 processes)")
    ax.set_title(f"batchtask vs plain taskiq tasks, median of rounds ({stamp})")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    ax.legend(fontsize=8, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    """Run every benchmark, then summarise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    items, rounds = (2000, 1) if args.quick else (args.items, args.rounds)
    RESULTS.mkdir(exist_ok=True)
    began = time.perf_counter()
    common = ["--items", str(items), "--rounds", str(rounds)]
    step(
        "1-2 drain",
        "drain.py",
        *common,
        "--brokers",
        ",".join(BROKERS),
        "--modes",
        ",".join(DRAIN_MODES),
        "--json",
        str(RESULTS / "drain.json"),
    )
    step(
        "3 drain, PostgreSQL",
        "drain.py",
        *common,
        "--brokers",
        "stream",
        "--modes",
        ",".join(PG_MODES),
        "--json",
        str(RESULTS / "drain-pg.json"),
    )
    step(
        "3 PostgreSQL alone",
        "pg_direct.py",
        "--rows",
        str(items),
        "--rounds",
        str(rounds),
        "--json",
        str(RESULTS / "pg-direct.json"),
    )
    step(
        "4 kiq_many",
        "kiq_many.py",
        "--items",
        str(min(items, 5000)),
        "--rounds",
        str(max(rounds, 5) if not args.quick else 1),
        "--json",
        str(RESULTS / "kiq-many.json"),
    )
    step(
        "5 machinery",
        "machinery.py",
        "--items",
        str(items),
        "--rounds",
        "3" if args.quick else "9",
        "--json",
        str(RESULTS / "machinery.json"),
    )
    step(
        "6 latency",
        "latency.py",
        "--items",
        "50" if args.quick else "200",
        "--receiver",
        "--json",
        str(RESULTS / "latency.json"),
    )
    figures = {
        "drain": drain_rates(load("drain.json")),
        "drain_rounds": drain_rounds(load("drain.json")),
        "drain_pg": drain_rates(load("drain-pg.json")),
        "pg_direct": load("pg-direct.json"),
        "kiq_many": load("kiq-many.json"),
        "machinery": load("machinery.json"),
        "latency": load("latency.json"),
    }
    rows = goals(figures)
    print_goals(rows)
    stamp = time.strftime("%Y-%m-%d")
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: version(name)
            for name in (
                "batchtask",
                "taskiq",
                "taskiq-redis",
                "taskiq-aio-pika",
                "taskiq-nats",
                "asyncpg",
            )
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    summary = {
        "command": sys.argv,
        "quick": args.quick,
        "items": items,
        "rounds": rounds,
        "machine": machine,
        "total_s": time.perf_counter() - began,
        "goals": rows,
        "rates": {"drain": figures["drain"], "drain_pg": figures["drain_pg"]},
    }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    chart(figures, RESULTS / "throughput.png", stamp)
    print(f"\nmachine: {machine['cpus']} cores, Python {machine['python']}, {stamp}")
    print(f"written: {RESULTS / 'summary.json'}, {RESULTS / 'throughput.png'}")
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
