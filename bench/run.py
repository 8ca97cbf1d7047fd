"""Every benchmark of bench/, one command: the goal tables, JSON and a chart.

    ./scripts/bench [--items 20000] [--rounds 3] [--quick]

(``scripts/bench`` installs the ``bench`` extra into .venv and runs this.)
Never part of the test run. Needs the local servers: Redis 6379, RabbitMQ
5672, NATS JetStream 4222, PostgreSQL 5432. Runs, one after the other, each
printing its own table:

- ``drain.py``: worker drain rate on a Redis stream, RabbitMQ and NATS of
  taskiq's own no-op task (``plain``), a batched no-op on a worker with
  ``--receiver batchtask:BatchReceiver`` (``batched``) and on a worker with
  default flags and no ``--receiver`` (``batched_defaults``), the same with a
  2 ms per-call cost under a process-wide lock, and on the Redis stream
  ``lean.py`` (redis-py alone, no taskiq) draining the same messages;
- ``drain.py`` PostgreSQL modes on a Redis stream, and ``pg_direct.py``
  (the database alone);
- ``drain.py`` on taskiq-postgres's broker (``batched``, ``batched_lock``;
  under BatchReceiver, which hands out a dead worker's rows again), set
  against the same modes on the Redis stream in this run;
- ``kiq_many.py``: producer side, ``kiq_many`` vs a loop of ``kiq``;
- ``machinery.py``: in-process cost per item (also BatchReceiver's native
  path);
- ``latency.py``: kiq to stored result for a trickle;
- ``adaptive.py``: ``adaptive=True`` vs a fixed ``batch_timeout`` (2 s,
  batch_size 100, a 5 ms call): a trickle's latency and a burst's batches;
- ``demo.py``: ``examples/demo.py`` (what ``./scripts/demo`` runs), 3 rounds:
  10,000 rows into SQLite in process, unbatched vs batched;
- ``fleet.py``: what fleet mode costs (on a Redis server of its own, port
  6399): the drain of a prefilled stream, one key and 200 keys, fleet vs
  ``fleet=false``; the commands an idle worker sends; and the batches of a
  fleet of 16 processes vs one.

Then prints one table of the goals, each a ratio measured side by side in
this run (of the medians over interleaved rounds; the detail gives the lowest
and highest ratio within one round):

1. Redis stream, no-op: ``batched`` / ``lean`` >= 0.65x, and ``batched`` /
   ``plain`` >= 5x;
2. RabbitMQ and NATS, no-op: ``batched`` / ``plain`` >= 4x each;
3. a worker started without ``--receiver``: ``batched_defaults`` / ``plain``
   >= 1.5x, per broker;
4. PostgreSQL through a worker: ``batched_pg`` (COPY per batch) /
   ``plain_pg`` (INSERT per item) >= 10x (executemany and PostgreSQL alone
   reported too);
5. ``machinery.py``'s ``native_delta_ratio`` (what a batched item on the
   native path adds over taskiq's own per-message cost) <= 0.25x (the
   machinery alone and through the stock receiver reported too);
6. ``adaptive=True``: a trickle (one item every 50 ms) has a median kiq to
   result latency < 100 ms, and a burst of 2,000 items ``kiq_many`` has a
   mean batch size (items / calls) >= 90 (both reported without adaptive);
   fleet mode (``fleet.py``): at saturation, steady items/s fleet /
   ``fleet=false`` >= 0.9x with one key and with 200 keys; idle, <= 5
   commands a second per worker process;
7. ``demo.py``: ``./scripts/demo``'s speed-up in process (InMemoryBroker,
   SQLite, one durable commit per row unbatched, per call batched) >= 10x,
   the median of 3 rounds;
1. (fleet) a fleet of 16 (4 ``taskiq worker --workers 4``, 5 ms calls) makes
   batches >= 0.8x as large as one process on the same traffic;

and, as "also:" rows, the 2 ms lock checks, ``kiq_many`` and the trickle
latency. Writes every figure to ``bench/results/summary.json`` (each
benchmark's raw numbers next to it) and draws
``bench/results/throughput.png`` (items/s by broker and mode). ``--quick`` is
a smoke run (few items, one round); its figures are not representative.
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
DRAIN_MODES = [
    "plain",
    "batched",
    "batched_defaults",
    "lean",
    "plain_lock",
    "batched_lock",
]
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


Target = tuple[str, float] | None
"""A goal's target: (">=" or "<=", bound), or None for a reported figure."""


def rounds_text(ratios: list[float] | None, unit: str = "x") -> str:
    """The lowest and highest of per-round ratios, for a goal's detail."""
    if not ratios:
        return ""
    return f"; rounds {min(ratios):.2f}..{max(ratios):.2f}{unit}"


def row(
    goal: str,
    value: float | None,
    target: Target,
    detail: str,
    each: list[float] | None = None,
    unit: str = "x",
) -> dict[str, Any]:
    """One line of the goals table (None value: not measured, not met)."""
    met: bool | None = None
    if target is not None:
        op, bound = target
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
    line: dict[str, Any] = {
        "goal": goal,
        "value": value,
        "target": "(reported)"
        if target is None
        else f"{target[0]} {target[1]:g}{unit}",
        "met": met,
        "detail": detail + rounds_text(each, unit),
        "unit": unit,
    }
    if each is not None:
        line["round_ratios"] = each
    return line


def rate_row(
    goal: str,
    rates: dict[str, list[float]],
    top: str,
    bottom: str,
    target: Target,
    by_round: dict[str, dict[int, float]] | None = None,
    noun: str = "items/s",
) -> dict[str, Any]:
    """`top` / `bottom`: the ratio of their medians, and the per-round ratios.

    Rounds are paired by number (`by_round`, drain.py) or else by position
    (the other benchmarks append one rate per way and round, interleaved).
    """
    if top not in rates or bottom not in rates:
        missing = " and ".join(m for m in (top, bottom) if m not in rates)
        return row(goal, None, target, f"not measured: no {missing} runs")
    ours, theirs = rates[top], rates[bottom]
    each = (
        paired(by_round, top, bottom)
        if by_round is not None
        else [a / b for a, b in zip(ours, theirs, strict=False)]
    )
    return row(
        goal,
        med(ours) / med(theirs),
        target,
        f"{med(ours):,.0f} vs {med(theirs):,.0f} {noun}",
        each,
    )


def machinery_row(
    goal: str, report: Any, top: str, bottom: str, key: str, target: Target
) -> dict[str, Any]:
    """(`top` - `bottom`) / taskiq's per-message cost, from machinery.py's JSON.

    `key` names the ratio of the medians machinery.py wrote (``..._ratio``,
    with its ``..._us``); the per-round ratios come from the same round's runs.
    """
    runs = report["us_per_item"]
    if f"{key}_ratio" not in report or top not in runs:
        return row(goal, None, target, f"not measured: no {key}_ratio")
    each = [
        (a - b) / t
        for a, b, t in zip(runs[top], runs[bottom], runs["taskiq"], strict=False)
    ]
    median = report["median_us"]
    detail = (
        f"{report[f'{key}_us']:+.1f} µs/item: {top} {median[top]:.1f} - "
        f"{bottom} {median[bottom]:.1f}"
    )
    if bottom != "taskiq":
        detail += f", taskiq {median['taskiq']:.1f}"
    return row(goal, report[f"{key}_ratio"], target, detail, each)


DEMO_GOAL = "7. ./scripts/demo in process: batched / unbatched rows/s"


def goals(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal: what was measured, the target, and whether it was met.

    Numbered rows are the goals; "also:" rows are further checks and figures.
    Every ratio is of medians over this run's interleaved rounds; its detail
    gives the lowest and highest ratio within one round.
    """
    drain, drain_rounds = figures["drain"], figures["drain_rounds"]

    def on(kind: str, top: str, bottom: str, target: Target, goal: str) -> Any:
        return rate_row(
            goal,
            drain.get(kind, {}),
            top,
            bottom,
            target,
            by_round=drain_rounds.get(kind, {}),
        )

    demo = figures.get("demo")
    rows = [
        on(
            "stream",
            "batched",
            "lean",
            (">=", 0.65),
            "1. no-op, Redis stream: batched / lean redis-py",
        ),
        row(
            "also: the upstream proposal (taskiq PR #634), Redis stream",
            None,
            None,
            "not measured: its branch is not a release; only released taskiq "
            "installs here",
        ),
        on(
            "stream",
            "batched",
            "plain",
            (">=", 5),
            "1. no-op, Redis stream: batched / taskiq plain",
        ),
    ]
    for kind in ("rabbitmq", "nats"):
        rows.append(
            on(
                kind,
                "batched",
                "plain",
                (">=", 4),
                f"2. no-op, {BROKER_LABELS[kind]}: batched / taskiq plain",
            )
        )
    for kind in BROKERS:
        rows.append(
            on(
                kind,
                "batched_defaults",
                "plain",
                (">=", 1.5),
                f"3. no --receiver, {BROKER_LABELS[kind]}: batched_defaults / plain",
            )
        )
    pg_broker = figures["drain_pgbroker"].get("postgres", {})
    for mode in ("batched", "batched_lock"):
        rows.append(
            rate_row(
                f"also: {mode}, PostgreSQL broker (taskiq-postgres) / Redis stream",
                {
                    "postgres": pg_broker.get(mode, []),
                    "stream": drain.get("stream", {}).get(mode, []),
                },
                "postgres",
                "stream",
                None,
            )
        )
    pg = figures["drain_pg"].get("stream", {})
    pg_rounds = figures["drain_pg_rounds"].get("stream", {})
    rows.append(
        rate_row(
            "4. PostgreSQL via a worker: batched_pg COPY / plain_pg INSERT",
            pg,
            "batched_pg",
            "plain_pg",
            (">=", 10),
            pg_rounds,
            "rows/s",
        )
    )
    rows.append(
        rate_row(
            "4. also: via a worker: batched_pg_many executemany / INSERT",
            pg,
            "batched_pg_many",
            "plain_pg",
            None,
            pg_rounds,
            "rows/s",
        )
    )
    direct = figures["pg_direct"]["rates"]
    for way in ("copy", "executemany"):
        rows.append(
            rate_row(
                f"4. also: PostgreSQL alone (no queue), {way} / INSERT",
                direct,
                way,
                "insert",
                None,
                noun="rows/s",
            )
        )
    machinery = figures["machinery"]
    rows.append(
        machinery_row(
            "5. native path: (native - taskiq) / taskiq per message",
            machinery,
            "native",
            "taskiq",
            "native_delta",
            ("<=", 0.25),
        )
    )
    rows.append(
        machinery_row(
            "5. also: machinery alone: (entry - coroutine) / taskiq",
            machinery,
            "entry",
            "coroutine",
            "machinery",
            None,
        )
    )
    rows.append(
        machinery_row(
            "5. also: via the stock receiver: (batched - taskiq) / taskiq",
            machinery,
            "batched",
            "taskiq",
            "receiver_delta",
            None,
        )
    )
    for kind in BROKERS:
        label = BROKER_LABELS[kind]
        rows.append(
            on(
                kind,
                "batched_lock",
                "batched",
                (">=", 0.8),
                f"also: 2 ms lock, {label}: batched_lock / batched",
            )
        )
        rows.append(
            on(
                kind,
                "batched_lock",
                "plain_lock",
                (">=", 5),
                f"also: 2 ms lock, {label}: batched_lock / plain_lock",
            )
        )
    rows.append(
        rate_row(
            "also: kiq_many / loop of kiq, Redis stream",
            figures["kiq_many"]["rates"],
            "many",
            "loop",
            (">=", 5),
        )
    )
    adaptive = figures["adaptive"]
    for mode, target in (("adaptive", ("<=", 100.0)), ("fixed", None)):
        trickle = adaptive["trickle"][mode]
        rows.append(
            row(
                f"6. {'' if target else 'also: '}trickle 50 ms, adaptive="
                f"{mode == 'adaptive'}: median latency (ms)",
                trickle["p50_s"] * 1000,
                target,
                f"p90 {trickle['p90_s'] * 1000:.1f} ms, "
                f"max {trickle['max_s'] * 1000:.1f} ms, "
                f"{trickle['calls']} calls",
                unit=" ms",
            )
        )
    for mode, target in (("adaptive", (">=", 90.0)), ("fixed", None)):
        burst = adaptive["burst"][mode]
        rows.append(
            row(
                f"6. {'' if target else 'also: '}burst of {burst['items']:,}, "
                f"adaptive={mode == 'adaptive'}: mean batch size",
                burst["mean_batch_size"],
                target,
                f"{burst['items']} items / {burst['calls']} calls",
                unit=" items",
            )
        )
    rows += fleet_rows(figures["fleet"]["summary"])
    latency = figures["latency"]
    bound_ms = latency["bound_s"] * 1000
    rows.append(
        row(
            "also: trickle latency p99 (ms) vs batch_timeout + call + 10 ms",
            latency["p99_s"] * 1000,
            ("<=", bound_ms),
            f"p50 {latency['p50_s'] * 1000:.1f} ms, "
            f"max {latency['max_s'] * 1000:.1f} ms",
            unit=" ms",
        )
    )
    if demo is None:
        rows.append(row(DEMO_GOAL, None, (">=", 10), "not measured"))
    else:
        rows.append(
            row(
                DEMO_GOAL,
                demo["median_speedup"],
                (">=", 10),
                f"{demo['median_batched_rows_per_s']:,.0f} vs "
                f"{demo['median_unbatched_rows_per_s']:,.0f} rows/s "
                "(InMemoryBroker, SQLite, a durable commit per call)",
                demo["speedups"],
            )
        )
    return rows


def fleet_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Goal 6 (cost) and goal 1's fleet fill, from ``fleet.py``'s summary."""
    rows = []
    for name, label in (("one_key", "one key"), ("many_keys", "many keys")):
        part = summary.get(name)
        goal = f"6. fleet: saturation cost, {label}: fleet / fleet=false"
        if part is None:
            rows.append(row(goal, None, (">=", 0.9), "not measured"))
            continue
        rates, cpu = part["steady_items_per_s"], part["cpu_us_per_item"]
        rows.append(
            row(
                goal,
                part["ratio"],
                (">=", 0.9),
                f"{rates['fleet']:,.0f} vs {rates['per_process']:,.0f} items/s "
                f"steady; CPU {cpu['fleet']:.0f} vs {cpu['per_process']:.0f} "
                f"µs/item; moved {part['moved']:.0%}",
                part["round_ratios"],
            )
        )
    idle = summary.get("idle", {})
    for mode, target in (("fleet", ("<=", 5.0)), ("per_process", None)):
        part = idle.get(mode)
        label = "fleet" if mode == "fleet" else "also: fleet=false"
        goal = f"6. {label}: idle commands/s per process"
        if part is None:
            rows.append(row(goal, None, target, "not measured", unit=""))
            continue
        rows.append(
            row(
                goal,
                part["commands_per_s_per_process"],
                target,
                ", ".join(f"{n} {v:.2f}" for n, v in part["by_command"].items())
                + f"; in scripts {part['in_scripts_per_s_per_process']:.2f}",
                unit="",
            )
        )
    units = {"rabbitmq": "socket reads", "nats": "messages published"}
    for family, label in (("rabbitmq", "RabbitMQ"), ("nats", "NATS")):
        part = summary.get("idle_brokers", {}).get(family)
        goal = f"6. fleet on {label}: idle {units[family]}/s per process"
        if part is None:
            rows.append(row(goal, None, ("<=", 5.0), "not measured", unit=""))
            continue
        rows.append(
            row(
                goal,
                part["fleet"],
                ("<=", 5.0),
                f"fleet=false: {part['per_process']:.2f} (the broker's own)",
                unit="",
            )
        )
    fill = summary.get("fill")
    goal = "1. fleet of 16 (4 x 4, 5 ms calls): mean batch / one process"
    if fill is None:
        rows.append(row(goal, None, (">=", 0.8), "not measured"))
    else:
        means = fill["mean_batch"]
        rows.append(
            row(
                goal,
                fill["ratio"],
                (">=", 0.8),
                f"{means['fleet16']:.2f} vs {means['one']:.2f} items per call",
            )
        )
    for family, label in (("rabbitmq", "RabbitMQ"), ("nats", "NATS JetStream")):
        goal = f"1. {label} fleet of 4 (2 x 2, 5 ms calls): mean batch / one process"
        if fill is None or f"{family}_ratio" not in fill:
            rows.append(row(goal, None, (">=", 0.9), "not measured"))
            continue
        means = fill["mean_batch"]
        rows.append(
            row(
                goal,
                fill[f"{family}_ratio"],
                (">=", 0.9),
                f"{means[f'fleet4_{family}']:.2f} vs {means[f'one_{family}']:.2f} "
                "items per call",
            )
        )
    return rows


def print_goals(rows: list[dict[str, Any]]) -> None:
    """The goals table."""
    print(
        "\n=== goals (ratios of medians over interleaved rounds, this run; "
        "rounds: lowest..highest ratio within one round)"
    )
    for line in rows:
        verdict = {True: "met", False: "NOT met", None: ""}[line["met"]]
        unit = "x" if line.get("unit", "x") == "x" else ""
        value = "-" if line["value"] is None else f"{line['value']:.2f}"
        unit = "" if line["value"] is None else unit
        print(
            f"  {line['goal']:62} {value:>7}{unit:1} "
            f"{line['target']:>18} {verdict:8} {line['detail']}"
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
        "batched": "batchtask + BatchReceiver, no-op",
        "batched_defaults": "batchtask, no --receiver, no-op",
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
        "batched_defaults": "#9467bd",
        "lean": "#ff7f0e",
        "plain_lock": "#d9d9d9",
        "batched_lock": "#6baed6",
        "plain_pg": "#bdbdbd",
        "batched_pg": "#2ca02c",
        "batched_pg_many": "#98df8a",
    }
    fig, ax = plt.subplots(figsize=(11, 5.8), dpi=110)
    width = 0.14  # six bars (lean too) on the Redis stream
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
            ax.text(x, middle, f"{middle:,.0f}", ha="center", va="bottom", fontsize=6)
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
        "1-3 drain",
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
        "4 drain, PostgreSQL",
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
        "also: drain, PostgreSQL broker",
        "drain.py",
        *common,
        "--brokers",
        "postgres",
        "--modes",
        "batched,batched_lock",
        "--json",
        str(RESULTS / "drain-pgbroker.json"),
    )
    step(
        "4 PostgreSQL alone",
        "pg_direct.py",
        "--rows",
        str(items),
        "--rounds",
        str(rounds),
        "--json",
        str(RESULTS / "pg-direct.json"),
    )
    step(
        "also: kiq_many",
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
        "also: latency",
        "latency.py",
        "--items",
        "50" if args.quick else "200",
        "--receiver",
        "--json",
        str(RESULTS / "latency.json"),
    )
    step(
        "6 adaptive",
        "adaptive.py",
        "--trickle-items",
        "50" if args.quick else "200",
        "--json",
        str(RESULTS / "adaptive.json"),
    )
    step(
        "1, 6 fleet",
        "fleet.py",
        *(["--quick"] if args.quick else ["--items", str(items)]),
        "--rounds",
        str(rounds),
        "--json",
        str(RESULTS / "fleet.json"),
    )
    step(
        "7 demo",
        "demo.py",
        "--rounds",
        "1" if args.quick else "3",
        "--rows",
        "2000" if args.quick else "10000",
        "--json",
        str(RESULTS / "demo.json"),
    )
    figures = {
        "demo": load("demo.json"),
        "fleet": load("fleet.json"),
        "drain": drain_rates(load("drain.json")),
        "drain_rounds": drain_rounds(load("drain.json")),
        "drain_pg": drain_rates(load("drain-pg.json")),
        "drain_pg_rounds": drain_rounds(load("drain-pg.json")),
        "drain_pgbroker": drain_rates(load("drain-pgbroker.json")),
        "pg_direct": load("pg-direct.json"),
        "kiq_many": load("kiq-many.json"),
        "machinery": load("machinery.json"),
        "latency": load("latency.json"),
        "adaptive": load("adaptive.json"),
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
                "taskiq-postgres",
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
        "rates": {
            "drain": figures["drain"],
            "drain_pg": figures["drain_pg"],
            "drain_pgbroker": figures["drain_pgbroker"],
        },
    }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    chart(figures, RESULTS / "throughput.png", stamp)
    print(f"\nmachine: {machine['cpus']} cores, Python {machine['python']}, {stamp}")
    print(f"written: {RESULTS / 'summary.json'}, {RESULTS / 'throughput.png'}")
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
