"""MkDocs hooks and a Griffe extension for the documentation site.

mkdocs.yml lists this file under ``hooks`` and its `ReSTExamplesAsMarkdown`
among mkdocstrings' Griffe extensions.

- The version in the site name is ``batchtask.__version__``, the one source of
  the version.
- The site loads nothing from other hosts. Material's offline plugin (which
  lets ``site/index.html`` be opened from disk) adds a script from unpkg.com
  that runs the search there; it is left out, so opened from disk the site has
  no search box (served, by ``mkdocs serve`` or any web server, it has one).
- Files kept elsewhere in the repository are served from the site without a
  second copy: the benchmark chart stays in ``bench/results/``, where
  ``./scripts/bench`` writes it. A page links to such a file by its path from
  ``docs/`` (``../bench/results/throughput.png``), which GitHub renders; the
  site serves it under ``assets/`` and the link is rewritten to point there.
- The API reference shows the docstrings' reST-style examples (``>>>`` lines,
  and an indented block after ``::``) as code blocks, which Markdown would
  otherwise read as quotes and text.
"""

import ast
import textwrap
from pathlib import Path

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

import batchtask

ROOT = Path(__file__).resolve().parent.parent

SERVED: dict[str, str] = {
    "bench/results/throughput.png": "assets/throughput.png",
}
"""Repository path -> path in the site, for files outside ``docs/``."""


@event_priority(-100)  # after the offline plugin's
def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Show the version next to the site name; drop scripts of other hosts."""
    config.site_name = f"{config.site_name} {batchtask.__version__}"
    polyfills = config.extra.get("polyfills", [])
    config.extra["polyfills"] = [
        script for script in polyfills if not script.startswith(("https:", "http:"))
    ]
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the files of `SERVED` to the site, read from where they are."""
    for repo_path, site_path in SERVED.items():
        source = ROOT / repo_path
        if not source.is_file():
            raise FileNotFoundError(f"{repo_path} is missing: the docs show it")
        files.append(File.generated(config, site_path, abs_src_path=str(source)))
    return files


def on_page_markdown(
    markdown: str, page: Page, config: MkDocsConfig, files: Files
) -> str:
    """Point the links to `SERVED` files at their place in the site."""
    depth = page.file.src_uri.count("/")
    for repo_path, site_path in SERVED.items():
        from_page = "../" * (depth + 1) + repo_path
        in_site = "../" * depth + site_path
        markdown = markdown.replace(f"]({from_page})", f"]({in_site})")
    return markdown


class ReSTExamplesAsMarkdown(griffe.Extension):
    """Turn the docstrings' reST examples into Markdown code blocks."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: object) -> None:
        """Rewrite the docstrings of the package and everything it defines."""
        objects: list[griffe.Object] = [pkg]
        while objects:
            obj = objects.pop()
            if obj.docstring is not None:
                obj.docstring.value = examples_as_markdown(obj.docstring.value)
            objects += [
                member
                for member in obj.members.values()
                if isinstance(member, griffe.Object)  # not an Alias
            ]


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def examples_as_markdown(text: str) -> str:
    """Fence ``>>>`` examples, and the indented block after a ``::`` line."""
    lines = text.splitlines()
    out: list[str] = []
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        pad = " " * indent_of(line)
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.lstrip().startswith(">>>"):
            end = i
            while end < len(lines) and lines[end].lstrip().startswith((">>>", "...")):
                end += 1
            out += [f"{pad}```pycon", *lines[i:end], f"{pad}```"]
            i = end
            continue
        elif not fenced and line.endswith("::"):
            end = i + 1
            while end < len(lines) and (
                not lines[end].strip() or indent_of(lines[end]) > indent_of(line)
            ):
                end += 1
            code = textwrap.dedent("\n".join(lines[i + 1 : end])).strip("\n")
            try:
                ast.parse(code)
                language = "python"
            except SyntaxError:
                language = "text"
            out += [line[:-1], "", f"{pad}```{language}"]
            out += [
                pad + code_line if code_line else "" for code_line in code.split("\n")
            ]
            out += [f"{pad}```", ""]
            i = end
            continue
        out.append(line)
        i += 1
    return "\n".join(out)
