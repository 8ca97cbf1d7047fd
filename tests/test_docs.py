"""The documentation's examples, commands and links are right.

Read from README.md and every page in docs/ (see docs/development.md):

- every ``python`` block compiles; every program among them (a block that calls
  ``asyncio.run(``) runs, and prints exactly what its page says it prints;
- every ``bash``/``sh``/``console`` block passes ``bash -n``, and every
  ``scripts/``, ``examples/`` or ``bench/`` path it names exists, as does every
  repository path the prose names in inline code;
- every ``toml`` block parses;
- every relative link reaches a file, and its ``#anchor`` a heading of that
  page, spelled the same by GitHub and by the site (mkdocs).
"""

import ast
import importlib.util
import re
import subprocess
import sys
import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
SHELLS = {"bash", "sh", "shell", "console"}
# A path a shell block runs or reads: ./scripts/test, examples/demo.py, ...
SHELL_PATH = re.compile(r"(?<![\w./-])(?:\./)?((?:scripts|examples|bench)/[\w./-]*\w)")
# A repository path named in the prose: `tests/test_flush.py`, `bench/lean.py`.
PROSE_PATH = re.compile(
    r"^(?:\./)?((?:scripts|examples|bench|tests|typing_tests|src|mypy_plugin|docs)"
    r"/[\w./-]*)$"
)

# What the pages say their programs print, by a line that identifies the
# program. Each must belong to a program of the pages.
PRINTS = {
    "def shout(": [
        "writing 100 rows to events (upsert=False)",
        "writing 100 rows to events (upsert=False)",
        "writing 50 rows to events (upsert=False)",
        "100",
        "HELLO",
    ],
    "async def embed(docs": [
        "mini: [2, 1]",
        "mini: [3]",
        "mini: [4]",
        "1:a b c 1:a b c",
    ],
    "ctx.messages[i]": ["['a@web', 'b@cli', 'c@web']"],
    "async def send(events": [
        "calling the API with ['a', 'b', 'broken']",
        "calling the API with ['broken']",
        "calling the API with ['broken']",
        "calling the API with ['b']",
        "sent a",
        "sent b",
        "error: the API rejects 'broken'",
        "dead letter: 'broken', 3 attempts, the API rejects 'broken'",
    ],
    "async def save(rows: list[int], table: str) -> None:\n    started.append": [
        "events:10 events:10 users:3 orders:3 events:10 events:10"
    ],
    "BatchTracingMiddleware(tracer_provider=provider)": [
        "saving [0, 1, 2] into events",
        "batch/save links=3 size=3 reason=size key='events'",
    ],
}


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    source = page.read_text()
    return [
        Block(page, source.count("\n", 0, m.start()) + 1, m[1].lower(), m[2])
        for m in FENCE.finditer(source)
    ]


BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def unique(blocks: list[Block]) -> list[Block]:
    """One block per text (README.md repeats the quick start of its page)."""
    seen: dict[str, Block] = {}
    for block in blocks:
        seen.setdefault(block.text, block)
    return list(seen.values())


PYTHON = unique([b for b in BLOCKS if b.lang in {"python", "py"}])
PROGRAMS = [b for b in PYTHON if "asyncio.run(" in b.text]
SNIPPETS = [b for b in PYTHON if "asyncio.run(" not in b.text]
SHELL = unique([b for b in BLOCKS if b.lang in SHELLS])
TOML = unique([b for b in BLOCKS if b.lang == "toml"])


def where(block: Block) -> str:
    return block.where


def prose(page: Path) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", page.read_text())


def test_the_docs_have_runnable_programs() -> None:
    assert len(PROGRAMS) >= 4
    assert (DOCS / "index.md").is_file()


@pytest.mark.parametrize("marker", PRINTS)
def test_every_stated_output_belongs_to_a_program(marker: str) -> None:
    assert any(marker in program.text for program in PROGRAMS), marker


@pytest.mark.parametrize("program", PROGRAMS, ids=where)
def test_programs_run_and_print_what_their_page_says(program: Block) -> None:
    done = subprocess.run(
        [sys.executable, "-c", program.text],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for marker, lines in PRINTS.items():
        if marker in program.text:
            assert done.stdout.splitlines() == lines


@pytest.mark.parametrize("snippet", SNIPPETS, ids=where)
def test_snippets_are_valid_python(snippet: Block) -> None:
    compile(snippet.text, snippet.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def shell_source(block: Block) -> str:
    """The commands of a block: a console block's lines after their ``$ ``."""
    if block.lang != "console":
        return block.text
    return "\n".join(
        line[2:] for line in block.text.splitlines() if line.startswith("$ ")
    )


@pytest.mark.parametrize("block", SHELL, ids=where)
def test_shell_blocks_parse(block: Block) -> None:
    source = shell_source(block)
    assert source.strip(), f"{block.where}: a {block.lang} block without commands"
    done = subprocess.run(
        ["bash", "-n"], input=source, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{block.where}: {done.stderr}"


@pytest.mark.parametrize("block", SHELL, ids=where)
def test_shell_blocks_name_paths_that_exist(block: Block) -> None:
    missing = [
        path
        for path in SHELL_PATH.findall(shell_source(block))
        if not (ROOT / path).exists()
    ]
    assert not missing, f"{block.where} names paths that do not exist: {missing}"


@pytest.mark.parametrize("block", TOML, ids=where)
def test_toml_blocks_parse(block: Block) -> None:
    tomllib.loads(block.text)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_repository_paths_in_the_prose_exist(page: Path) -> None:
    named = {
        found[1].rstrip("/.")
        for code in INLINE_CODE.findall(prose(page))
        if (found := PROSE_PATH.match(code.strip("`")))
    }
    # The source layout of docs/development.md is a block of paths too.
    for block in blocks_of(page):
        if not block.lang:
            named.update(
                found[1]
                for line in block.text.splitlines()
                if (found := PROSE_PATH.match(line.split(" ", 1)[0]))
            )
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


TEST_NAME = re.compile(r"^(tests/[\w/]+\.py)::(\w+)(?:\[([\w-]+)\])?$")
"""A test the prose names: ``tests/test_x.py::test_y`` or ``...::test_y[id]``."""


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_the_tests_the_prose_names_exist(page: Path) -> None:
    """Each test a page names (the failure tables name one per row) is a test
    function of that file, and each parameter id it names is one of its
    parameter values."""
    missing = []
    for code in INLINE_CODE.findall(prose(page)):
        found = TEST_NAME.match(code.strip("`"))
        if found is None:
            continue
        path, name, param = found.groups()
        source = (ROOT / path).read_text() if (ROOT / path).exists() else ""
        if not re.search(rf"^(?:async )?def {name}\(", source, re.M):
            missing.append(f"{path}::{name}")
        elif param is not None and f'"{param}"' not in source:
            missing.append(f"{path}::{name}[{param}]")
    assert not missing, f"{page.name} names tests that do not exist: {missing}"


def heading_text(markdown: str) -> str:
    """A heading as rendered: without code marks, emphasis and link targets."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    return text.replace("`", "").replace("**", "")


def mkdocs_slug(text: str) -> str:
    """Python-Markdown's toc slugify, which mkdocs uses by default."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def github_slug(text: str) -> str:
    """GitHub's heading anchors: lower case, punctuation dropped, - for space."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    """The anchors of a page's headings that GitHub and the site both have."""
    headings = [heading_text(h) for h in HEADING.findall(prose(page))]
    return {mkdocs_slug(h) for h in headings} & {github_slug(h) for h in headings}


def served_from_elsewhere() -> dict[str, str]:
    """scripts/docs_hooks.py's SERVED: repository files the site serves."""
    spec = importlib.util.spec_from_file_location(
        "docs_hooks", ROOT / "scripts" / "docs_hooks.py"
    )
    assert spec
    assert spec.loader
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    served: dict[str, str] = hooks.SERVED
    return served


def links_of(page: Path) -> list[str]:
    return [
        unquote(target)
        for target in LINK.findall(INLINE_CODE.sub("CODE", prose(page)))
        if not re.match(r"[a-z][\w+.-]*:", target)  # http:, mailto:, ...
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_reach_a_file_and_a_heading(page: Path) -> None:
    served = served_from_elsewhere()
    problems = []
    for link in links_of(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            problems.append(f"{link}: no such file")
            continue
        in_docs = target.is_relative_to(DOCS)
        if page.parent == DOCS and not in_docs:
            repo_path = target.relative_to(ROOT).as_posix()
            if repo_path not in served:
                problems.append(
                    f"{link}: outside docs/, so missing from the site "
                    "(serve it with SERVED in scripts/docs_hooks.py)"
                )
        if anchor and target.suffix == ".md" and anchor not in anchors_of(target):
            problems.append(f"{link}: {target.name} has no heading #{anchor}")
    assert not problems, f"{page.name}: " + "; ".join(problems)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {
        (ROOT / link.partition("#")[0]).resolve()
        for link in links_of(ROOT / "README.md")
    }
    # docs/index.md is the site's front page, as README.md is the repository's.
    pages = [p for p in DOCS.glob("*.md") if p.name != "index.md"]
    unlinked = [p.name for p in pages if p.resolve() not in linked]
    assert not unlinked, f"README.md links to no {unlinked}"
