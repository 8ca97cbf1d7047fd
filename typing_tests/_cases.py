"""The YAML cases' snippets as a checker other than mypy sees them.

Each case's ``main`` is rendered as for ``mypy=plain`` (the overloads
without the plugin, which is all any other checker sees), keyed by
``file.case``; `rejected_lines` reads the lines pyright reports on.
"""

import re
from pathlib import Path
from typing import Any

import yaml
from pytest_mypy_plugins.utils import render_template

HERE = Path(__file__).parent
MARKER = re.compile(r"#\s*pyright-(reports|reveals):\s*(.+?)\s*(?=\s#\s|$)")


def load_cases(pattern: str = "*.yml") -> dict[str, str]:
    """Each case's source in the YAML files matching `pattern`, by ``file.case``."""
    cases: dict[str, str] = {}
    for path in sorted(HERE.glob(pattern)):
        for raw in yaml.safe_load(path.read_text()):
            modes: list[dict[str, Any]] = raw.get("parametrized") or [{}]
            params = next((m for m in modes if m.get("mypy") == "plain"), modes[0])
            cases[f"{path.stem}.{raw['case']}"] = render_template(raw["main"], params)
    return cases


def write_cases(cases: dict[str, str], root: Path) -> None:
    """One module per case under `root`, named so `case_of` finds it back."""
    for name, source in cases.items():
        (root / f"{name.replace('.', '__')}.py").write_text(source)


def case_of(path: str) -> str:
    """The case a module written by `write_cases` holds."""
    return Path(path).stem.replace("__", ".")


def rejected_lines(source: str) -> set[int]:
    """The lines of `source` marked ``# pyright-reports: ...``: calls that must fail."""
    return {
        number
        for number, line in enumerate(source.splitlines(), start=1)
        if any(kind == "reports" for kind, _ in MARKER.findall(line))
    }
