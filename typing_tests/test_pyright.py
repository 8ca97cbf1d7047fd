"""Pyright (strict) over the same snippets as the mypy YAML cases.

Every case's ``main`` (rendered as for ``mypy=plain``: pyright sees the same
overloads as mypy without the plugin) is written to its own file, pyright runs
once over all of them, and each case then asserts that pyright reported
exactly what its markers say, line by line:

- ``# pyright-reports: reportArgumentType, reportCallIssue`` — one error per
  rule named, on this line;
- ``# pyright-reveals: <type>`` — ``reveal_type`` on this line shows ``<type>``.

(Not ``# pyright: ...``: pyright reads those as its own directives.) Any
diagnostic without a marker fails.
"""

import json
import re
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
from _cases import MARKER, case_of, load_cases, write_cases

REVEALED = re.compile(r'^Type of ".*" is "(?P<type>.*)"$', re.S)

CASES = load_cases()


def expected(source: str) -> Counter[tuple[int, str]]:
    """The ``(line, expectation)`` pairs the markers in `source` declare."""
    found: Counter[tuple[int, str]] = Counter()
    for number, line in enumerate(source.splitlines(), start=1):
        for kind, text in MARKER.findall(line):
            if kind == "reveals":
                found[(number, f"reveal {text}")] += 1
            else:
                for rule in text.split(","):
                    found[(number, rule.strip())] += 1
    return found


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run pyright once over every case; its diagnostics by case name."""
    root = tmp_path_factory.mktemp("pyright")
    write_cases(CASES, root)
    (root / "pyrightconfig.json").write_text(
        json.dumps({"typeCheckingMode": "strict", "pythonVersion": "3.11"})
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyright",
            "--outputjson",
            "--pythonpath",
            sys.executable,
            "--project",
            str(root),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    try:
        output = json.loads(run.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright gave no JSON:\n{run.stdout}\n{run.stderr}")
    by_case: dict[str, Any] = {name: [] for name in CASES}
    for diagnostic in output["generalDiagnostics"]:
        by_case[case_of(diagnostic["file"])].append(diagnostic)
    return by_case


def actual(diagnostics: list[dict[str, Any]]) -> Counter[tuple[int, str]]:
    """Pyright's diagnostics as ``(line, expectation)`` pairs."""
    found: Counter[tuple[int, str]] = Counter()
    for diagnostic in diagnostics:
        line = diagnostic["range"]["start"]["line"] + 1
        message = diagnostic["message"]
        revealed = REVEALED.match(message)
        if diagnostic["severity"] == "information" and revealed:
            found[(line, f"reveal {revealed['type']}")] += 1
        else:
            rule = diagnostic.get("rule") or f"{diagnostic['severity']}: {message}"
            found[(line, rule)] += 1
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_pyright(case: str, reported: dict[str, Any]) -> None:
    diagnostics = reported[case]
    messages = "\n".join(
        f"  line {d['range']['start']['line'] + 1}: {d['severity']}: "
        f"{d['message']} ({d.get('rule', '')})"
        for d in diagnostics
    )
    assert actual(diagnostics) == expected(CASES[case]), (
        f"pyright reported:\n{messages}"
    )
