"""The documentation's code snippets type-check (pyright, standard mode).

Programs (blocks that call ``asyncio.run(``) run in tests/test_docs.py, and the
typing example on docs/typing.md is checked against mypy's exact report by
test_readme.py. Every other ``python`` block of README.md and docs/ is a
fragment: here it gets `PRELUDE` (the names the fragments take from their
pages' prose: a broker, a row, ...) and, when it awaits, an async function
around it; then pyright checks them all in one run, and must report nothing.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_docs import SNIPPETS, Block  # noqa: E402

TYPING_EXAMPLE = "docs/typing.md"
"""Checked against mypy's exact report by test_readme.py (errors on purpose)."""

PRELUDE = """\
from pydantic import BaseModel
from taskiq import InMemoryBroker, TaskiqDepends

from batchtask import BatchContext, batch_task

broker = InMemoryBroker()


class Row(BaseModel):
    id: int


row = Row(id=1)


class Event(BaseModel):
    id: int


class Written:
    size: int = 0


class EventStore:
    async def write(self, table: str, events: list[Event]) -> Written:
        return Written()


def store() -> EventStore:
    return EventStore()


class Doc(BaseModel):
    text: str


class Search:
    async def bulk(self, docs: list[Doc]) -> list[bool]:
        return [True] * len(docs)


search = Search()


@batch_task(broker, batch_size=100, batch_timeout=1.0, weight=len)
async def embed(texts: list[str]) -> None: ...

"""

CHECKED = [b for b in SNIPPETS if not b.where.startswith(TYPING_EXAMPLE)]


def source(block: Block) -> str:
    body = block.text
    if "await " in body:
        body = "async def _snippet() -> None:\n" + textwrap.indent(body, "    ")
    return f"from prelude import *  # noqa: F403\n{body}"


def test_there_are_snippets_to_check() -> None:
    assert len(CHECKED) >= 4


def test_every_snippet_type_checks(tmp_path: Path) -> None:
    (tmp_path / "prelude.py").write_text(PRELUDE)
    names = {}
    for number, block in enumerate(CHECKED):
        name = f"snippet_{number:02d}.py"
        (tmp_path / name).write_text(source(block))
        names[name] = block.where
    (tmp_path / "pyrightconfig.json").write_text(
        json.dumps({"typeCheckingMode": "standard", "pythonVersion": "3.11"})
    )
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "pyright"),
            "--outputjson",
            "--pythonpath",
            sys.executable,
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = json.loads(run.stdout)
    problems = [
        f"{names.get(Path(d['file']).name, d['file'])} "
        f"(+{d['range']['start']['line']}): {d['message']}"
        for d in report["generalDiagnostics"]
        if d["severity"] == "error"
    ]
    if problems:
        pytest.fail("\n".join(problems))
