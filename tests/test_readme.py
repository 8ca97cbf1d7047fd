"""The README's examples run, and print what the README says they print."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
PROGRAMS = [block for block in BLOCKS if "asyncio.run(" in block]
SNIPPETS = [block for block in BLOCKS if "asyncio.run(" not in block]


def test_the_readme_has_runnable_programs() -> None:
    assert len(PROGRAMS) >= 2


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.splitlines()[0][:40])
def test_readme_programs_run(program: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if "ctx.messages[i]" in program:
        assert done.stdout.splitlines() == ["['a@web', 'b@cli', 'c@web']"]
    if "embed(docs" in program:
        assert done.stdout.splitlines() == [
            "mini: [2, 1]",
            "mini: [3]",
            "mini: [4]",
            "1:a b c 1:a b c",
        ]
    if "shout" in program:
        assert done.stdout.splitlines() == [
            "writing 100 rows to events (upsert=False)",
            "writing 100 rows to events (upsert=False)",
            "writing 50 rows to events (upsert=False)",
            "100",
            "HELLO",
        ]


@pytest.mark.parametrize("snippet", SNIPPETS)
def test_readme_snippets_are_valid_python(snippet: str) -> None:
    compile(snippet, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
