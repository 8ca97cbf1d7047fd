"""The typing page's example says exactly what mypy with the plugin reports.

The example is the first ``python`` block of docs/typing.md. Each
``# error: text`` comment in it must be an error mypy reports on that line,
containing the text; each ``# note: text`` a revealed type containing the
text. Nothing else may be reported (apart from mypy's notes that point at a
definition).
"""

import re
import subprocess
import sys
from pathlib import Path

PAGE = Path(__file__).parent.parent / "docs" / "typing.md"
COMMENT = re.compile(r"#\s*(error|note):\s*(.+)$")
REPORTED = re.compile(r"^main\.py:(\d+): (error|note): (.*)$")


def typing_example() -> str:
    return PAGE.read_text().split("```python\n", 1)[1].split("\n```", 1)[0] + "\n"


def test_the_typing_pages_example_reports_exactly_its_comments(
    tmp_path: Path,
) -> None:
    source = typing_example()
    (tmp_path / "main.py").write_text(source)
    (tmp_path / "mypy.ini").write_text(
        "[mypy]\nstrict = True\nplugins = batchtask_mypy\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "main.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    reported = [
        m.groups()
        for m in map(REPORTED.match, run.stdout.splitlines())
        if m and not (m[2] == "note" and " defined in " in m[3])
    ]
    expected = [
        (str(number), *found.groups())
        for number, line in enumerate(source.splitlines(), start=1)
        if (found := COMMENT.search(line))
    ]
    assert expected, "the example of docs/typing.md lost its comments"
    assert len(reported) == len(expected), run.stdout
    for (line, kind, message), (want_line, want_kind, want_text) in zip(
        reported, expected, strict=True
    ):
        assert (line, kind) == (want_line, want_kind), run.stdout
        assert want_text in message, run.stdout
