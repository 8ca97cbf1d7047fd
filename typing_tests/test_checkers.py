"""basedpyright, pyrefly, ty and zuban over the kiq cases, as pyright sees them.

The snippets of ``test_kiq.yml``, ``test_context.yml`` and
``test_dead_letter.yml`` (rendered as for ``mypy=plain``: no checker but
mypy runs the plugin) are written to one directory; each checker runs once
over all of them, in its strict mode, and each case then asserts that the
checker reports an error on exactly the lines pyright does (the lines marked
``# pyright-reports: ...``): every bad call rejected, every good one accepted.
Which rule each checker names differs and is not compared; ``reveal_type``
output is not compared either (``test_pyright.py`` checks pyright's).

The checkers are the ones the ``dev`` extra pins, run from the interpreter's
own ``bin`` directory; a missing one fails its tests instead of skipping them.
"""

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _cases import case_of, load_cases, rejected_lines, write_cases

CASES = {
    name: source
    for pattern in ("test_kiq.yml", "test_context.yml", "test_dead_letter.yml")
    for name, source in load_cases(pattern).items()
}
BIN = Path(sys.executable).parent

Reports = dict[str, set[int]]
"""The lines a checker reported an error on, by case."""


@dataclass(frozen=True)
class Checker:
    """How to run one checker over a directory and read its errors."""

    name: str
    run: Callable[[Path], Iterator[tuple[str, int]]]
    """``(file, line)`` of each error it reported under the directory."""


def _output(command: list[str], root: Path) -> str:
    """Run `command` in `root`; its standard output (it exits 1 on errors)."""
    try:
        done = subprocess.run(
            command,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except FileNotFoundError:
        pytest.fail(f"{command[0]} is not installed (pip install -e '.[dev]')")
    if done.returncode not in (0, 1):
        pytest.fail(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _basedpyright(root: Path) -> Iterator[tuple[str, int]]:
    (root / "pyrightconfig.json").write_text(
        json.dumps({"typeCheckingMode": "strict", "pythonVersion": "3.11"})
    )
    output = json.loads(
        _output(
            [
                str(BIN / "basedpyright"),
                "--outputjson",
                "--pythonpath",
                sys.executable,
                "--project",
                str(root),
            ],
            root,
        )
    )
    for diagnostic in output["generalDiagnostics"]:
        if diagnostic["severity"] != "information":
            yield diagnostic["file"], diagnostic["range"]["start"]["line"] + 1


_PYREFLY_DIRECTIVES = {"reveal-type", "unimported-directive"}
"""reveal_type's output, and its complaint that the cases do not import it."""


def _pyrefly(root: Path) -> Iterator[tuple[str, int]]:
    output = json.loads(
        _output(
            [
                str(BIN / "pyrefly"),
                "check",
                "--preset",
                "strict",
                "--python-interpreter-path",
                sys.executable,
                "--python-version",
                "3.11",
                "--output-format",
                "json",
                *sorted(str(path) for path in root.glob("*.py")),
            ],
            root,
        )
    )
    for error in output["errors"]:
        if error["name"] not in _PYREFLY_DIRECTIVES and error["severity"] != "info":
            yield error["path"], error["line"]


_TY_LINE = re.compile(r"^(?P<file>[^:\s]+\.py):(?P<line>\d+):\d+: (?P<level>\w+)\[")


def _ty(root: Path) -> Iterator[tuple[str, int]]:
    output = _output(
        [
            str(BIN / "ty"),
            "check",
            "--python",
            sys.executable,
            "--python-version",
            "3.11",
            "--output-format",
            "concise",
            "--error-on-warning",
            "--ignore",
            "undefined-reveal",
            str(root),
        ],
        root,
    )
    for line in output.splitlines():
        found = _TY_LINE.match(line)
        if found and found["level"] in ("error", "warning"):
            yield found["file"], int(found["line"])


_MYPY_LINE = re.compile(r"^(?P<file>[^:\s]+\.py):(?P<line>\d+): error: ")


def _zuban(root: Path) -> Iterator[tuple[str, int]]:
    output = _output(
        [
            str(BIN / "zuban"),
            "check",
            "--strict",
            "--python-executable",
            sys.executable,
            "--python-version",
            "3.11",
            *sorted(path.name for path in root.glob("*.py")),
        ],
        root,
    )
    for line in output.splitlines():
        found = _MYPY_LINE.match(line)
        if found:
            yield found["file"], int(found["line"])


CHECKERS = {
    checker.name: checker
    for checker in (
        Checker("basedpyright", _basedpyright),
        Checker("pyrefly", _pyrefly),
        Checker("ty", _ty),
        Checker("zuban", _zuban),
    )
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reports]:
    """Each checker run once over every case: its error lines by case."""
    found: dict[str, Reports] = {}
    for name, checker in CHECKERS.items():
        root = tmp_path_factory.mktemp(name)
        write_cases(CASES, root)
        by_case: Reports = {case: set() for case in CASES}
        for file, line in checker.run(root):
            by_case[case_of(file)].add(line)
        found[name] = by_case
    return found


@pytest.mark.parametrize("checker", sorted(CHECKERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_checker_rejects_exactly_the_bad_calls(
    checker: str, case: str, reports: dict[str, Reports]
) -> None:
    expected = rejected_lines(CASES[case])
    reported = reports[checker][case]
    assert reported == expected, (
        f"{checker} missed the bad lines {sorted(expected - reported)} and "
        f"reported the good lines {sorted(reported - expected)}"
    )
