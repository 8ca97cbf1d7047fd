"""The demo's speed-up, over rounds: ``examples/demo.py`` run N times.

    python bench/demo.py [--rounds 3] [--rows 10000] [--json PATH]

Each round is a fresh ``examples/demo.py`` process (InMemoryBroker, in
process: 10,000 rows into SQLite, unbatched with one durable commit per row,
then batched with one per call of 100). Prints each round's rows/s and the
medians; the speed-up is batched / unbatched rows/s of one round.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "examples" / "demo.py"


def main() -> int:
    """Run the rounds, print them, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(1, args.rounds + 1):
            out = Path(scratch) / f"round-{number}.json"
            command = [sys.executable, str(DEMO), "--rows", str(args.rows)]
            done = subprocess.run(
                [*command, "--json", str(out)], capture_output=True, check=False
            )
            if done.returncode != 0:
                sys.stderr.buffer.write(done.stdout + done.stderr)
                raise SystemExit(f"examples/demo.py failed (exit {done.returncode})")
            figures = json.loads(out.read_text())
            rounds.append(figures)
            print(
                f"  round {number}: unbatched {figures['unbatched_rows_per_s']:,.0f} "
                f"rows/s, batched {figures['batched_rows_per_s']:,.0f} rows/s "
                f"({figures['batched_calls']} calls), "
                f"speed-up {figures['speedup']:.2f}x",
                flush=True,
            )
    summary = {
        "rows": args.rows,
        "rounds": rounds,
        "median_unbatched_rows_per_s": statistics.median(
            r["unbatched_rows_per_s"] for r in rounds
        ),
        "median_batched_rows_per_s": statistics.median(
            r["batched_rows_per_s"] for r in rounds
        ),
        "median_speedup": statistics.median(r["speedup"] for r in rounds),
        "speedups": [r["speedup"] for r in rounds],
    }
    print(
        f"demo: median unbatched {summary['median_unbatched_rows_per_s']:,.0f} "
        f"rows/s, batched {summary['median_batched_rows_per_s']:,.0f} rows/s, "
        f"speed-up {summary['median_speedup']:.2f}x "
        f"(rounds {min(summary['speedups']):.2f}..{max(summary['speedups']):.2f}x)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
