"""The plugin's types survive mypy's incremental cache.

A module that declares batch tasks is checked once, then only the module that
uses them changes: mypy loads the first module from its cache (its verbose
log says so) and the second still sees the plugin's exact signatures.
"""

import subprocess
import sys
from pathlib import Path

TASKS = """\
from batchtask import batch_task
from taskiq import Context, InMemoryBroker, TaskiqDepends

broker = InMemoryBroker()

@batch_task(broker, batch_size=10, batch_timeout=1.0, results="per_item")
async def save(
    rows: list[int], table: str, context: Context = TaskiqDepends()
) -> list[str]:
    return [table] * len(rows)
"""

USE = """\
from tasks import save

async def main() -> None:
    reveal_type(save.kiq)
    await save.kiq(rows=1, table="{table}")
"""


def mypy(root: Path, *flags: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", *flags, "main.py"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return run.stdout + run.stderr


def test_types_read_back_from_the_cache(tmp_path: Path) -> None:
    (tmp_path / "mypy.ini").write_text(
        "[mypy]\nstrict = True\nplugins = batchtask_mypy\n"
    )
    (tmp_path / "tasks.py").write_text(TASKS)
    (tmp_path / "main.py").write_text(USE.format(table="a"))
    revealed = (
        'main.py:4: note: Revealed type is "def (rows: int, table: str) -> '
        'typing.Coroutine[Any, Any, taskiq.task.AsyncTaskiqTask[str]]"'
    )
    assert mypy(tmp_path).splitlines()[0] == revealed

    (tmp_path / "main.py").write_text(USE.format(table="b"))
    output = mypy(tmp_path, "--verbose").splitlines()
    assert any(line.startswith("LOG:  Metadata fresh for tasks:") for line in output)
    assert revealed in output
