"""What the batchtask_mypy plugin costs mypy on a module with many batch tasks.

    .venv/bin/python bench/mypy_plugin.py [--tasks 200] [--rounds 5]

Generates a module declaring `--tasks` batch tasks (async and sync, shared and
per-item results, extra, keyword-only and injected parameters) and one kiq per
task, then runs ``mypy --strict`` on it with and without the plugin. Each mode
keeps its own warm cache, so only the generated module is checked again (it is
edited before every run); runs alternate between the modes. Prints the median
and spread of wall-clock seconds per mode and their ratio.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADER = """\
from batchtask import batch_task
from taskiq import Context, InMemoryBroker, TaskiqDepends

broker = InMemoryBroker()
"""

TASK = """
@batch_task(broker, batch_size={size}, batch_timeout=1.0{results})
{kind}def task_{n}(items: list[int], table: str, *, upsert: bool = False,
        context: Context = TaskiqDepends()) -> {returns}:
    return {value}
"""

USE = """
async def use_{n}() -> None:
    await task_{n}.kiq({n}, "t{n}", upsert=True)
"""


def module(tasks: int, edit: int) -> str:
    """The generated source; `edit` makes it new to mypy's cache.

    The size changes too: mypy trusts a cached module whose size and mtime (in
    whole seconds) are unchanged, and runs here take less than a second.
    """
    parts = [f"# edit {'.' * edit}\n", HEADER]
    for n in range(tasks):
        per_item = n % 2 == 1
        parts.append(
            TASK.format(
                n=n,
                size=10 + n,
                results=', results="per_item"' if per_item else "",
                kind="async " if n % 3 else "",
                returns="list[int]" if per_item else "int",
                value="items" if per_item else "len(items)",
            )
        )
        parts.append(USE.format(n=n))
    return "".join(parts)


def check(root: Path, mode: str) -> float:
    """Seconds one ``mypy`` run takes on the generated module."""
    started = time.perf_counter()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            f"{mode}.ini",
            "--cache-dir",
            f".cache-{mode}",
            "tasks.py",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"mypy ({mode}) failed:\n{run.stdout}{run.stderr}")
    return elapsed


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / "plain.ini").write_text("[mypy]\nstrict = True\n")
        (root / "plugin.ini").write_text(
            "[mypy]\nstrict = True\nplugins = batchtask_mypy\n"
        )
        seconds: dict[str, list[float]] = {"plain": [], "plugin": []}
        edit = 0
        for round_ in range(args.rounds + 1):
            for mode in ("plain", "plugin") if round_ % 2 else ("plugin", "plain"):
                edit += 1
                (root / "tasks.py").write_text(module(args.tasks, edit))
                elapsed = check(root, mode)
                if round_ > 0:  # round 0 only warms each mode's cache
                    seconds[mode].append(elapsed)

    print(f"mypy --strict on a module of {args.tasks} batch tasks + {args.tasks} kiq")
    print(f"({args.rounds} interleaved runs per mode, library cache warm)")
    for mode, runs in seconds.items():
        print(
            f"  {mode:6} median {statistics.median(runs):.2f} s "
            f"(min {min(runs):.2f}, max {max(runs):.2f})"
        )
    ratio = statistics.median(seconds["plugin"]) / statistics.median(seconds["plain"])
    print(f"  plugin / plain: {ratio:.2f}x")


if __name__ == "__main__":
    main()
