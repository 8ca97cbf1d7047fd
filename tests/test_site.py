"""The documentation site builds strictly, and every page works in a browser.

The site is built with mkdocs (``--strict``: any warning fails) into a
temporary directory, served over HTTP from a thread, and every page of the
navigation is opened in headless Chromium (Debian's ``/usr/bin/chromium``,
driven by Playwright): it answers 200 and shows its page's title; every
internal link and every image answers 200 (a link's ``#anchor`` names an
element of its page); every image is drawn, the performance chart included;
the browser logs no error and requests nothing from another host. The site
also works opened from disk (``site/index.html``), as README.md says.

Without ``/usr/bin/chromium`` the browser tests skip, except under
``CI=true``, where ``.ci/run`` installs Chromium first and they fail instead.
"""

import functools
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urldefrag

import pytest

import batchtask
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHART = "assets/throughput.png"


def build(site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "mkdocs", "build", "--strict"),
            *("--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)),
        ],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("docs") / "site"
    built = build(site)
    assert built.returncode == 0, built.stderr
    return site


@dataclass(frozen=True)
class NavPage:
    """A page of mkdocs.yml's nav: its source, URL path and title (its h1)."""

    source: str
    path: str
    title: str


def nav_pages() -> list[NavPage]:
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"))
    docs = Path(config["docs_dir"])

    def sources(nav: Any) -> Iterator[str]:
        for entry in nav if isinstance(nav, list) else [nav]:
            values = entry.values() if isinstance(entry, dict) else [entry]
            for value in values:
                if isinstance(value, str):
                    if not re.match(r"[a-z][\w+.-]*:", value):  # not http:...
                        yield value
                else:
                    yield from sources(value)

    def url_path(source: str) -> str:
        stem = source.removesuffix(".md")
        if not config["use_directory_urls"]:
            return f"{stem}.html"
        if stem == "index" or stem.endswith("/index"):
            return stem.removesuffix("index")
        return f"{stem}/"

    def title(source: str) -> str:
        found = re.search(r"^# (.+)$", (docs / source).read_text(), re.M)
        assert found, f"docs/{source} has no '# ' title"
        return found[1].replace("`", "").strip()

    return [NavPage(s, url_path(s), title(s)) for s in sources(config["nav"])]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def require_chromium() -> None:
    """Skip (on a user's machine) or fail (under CI=true) without Chromium."""
    reason = ""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (Debian: apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed (pip install -e '.[dev]')"
    if not reason:
        return
    if IN_CI:
        pytest.fail(f"{reason}; CI must run the site test", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Visit:
    """What the browser saw while a page loaded: errors, foreign requests."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Any, base: str) -> None:
        def console(message: Any) -> None:
            if message.type == "error":
                self.errors.append(f"console error: {message.text}")

        def request(request: Any) -> None:
            if not request.url.startswith((base, "data:", "blob:")):
                self.errors.append(f"requested another host: {request.url}")

        page.on("console", console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("request", request)
        page.on(
            "requestfailed",
            lambda r: self.errors.append(f"request failed: {r.url} {r.failure}"),
        )


def test_the_site_builds_strictly(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / CHART).read_bytes() == (
        ROOT / "bench" / "results" / "throughput.png"
    ).read_bytes()


def test_the_nav_lists_every_page() -> None:
    in_nav = {page.source for page in nav_pages()}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= in_nav, f"not in mkdocs.yml's nav: {sorted(pages - in_nav)}"


def test_every_page_loads_with_its_links_images_and_no_errors(
    site: Path, served: str, browser: Any
) -> None:
    pages = nav_pages()
    context = browser.new_context()
    answers: dict[str, int] = {}
    ids: dict[str, set[str]] = {}
    problems: list[str] = []

    def status(url: str) -> int:
        if url not in answers:
            answers[url] = context.request.get(url).status
        return answers[url]

    def ids_of(url: str) -> set[str]:
        if url not in ids:
            html = context.request.get(url).text()
            ids[url] = set(re.findall(r'\bid="([^"]+)"', html))
        return ids[url]

    for nav in pages:
        url = served + nav.path
        page = context.new_page()
        visit = Visit()
        visit.watch(page, served)
        response = page.goto(url, wait_until="load")
        page.wait_for_load_state("networkidle")
        answer = response.status if response else None
        if answer != 200:
            problems.append(f"{nav.source}: {url} answered {answer}")
        h1 = next(iter(page.locator("article h1").all_inner_texts()), "")
        h1 = h1.replace("¶", "").strip()
        if h1 != nav.title:
            problems.append(f"{nav.source}: h1 is {h1!r}, not {nav.title!r}")
        want = f"batchtask {batchtask.__version__}"
        if not page.title().endswith(want):
            problems.append(f"{nav.source}: title {page.title()!r} lacks {want!r}")

        links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
        for link in links:
            if not link.startswith(served):
                continue
            target, anchor = urldefrag(link)
            if status(target) != 200:
                problems.append(f"{nav.source}: link {link} answered {status(target)}")
            elif (
                anchor
                and target.endswith(".html")
                and unquote(anchor) not in ids_of(target)
            ):
                problems.append(f"{nav.source}: link {link}: no element #{anchor}")

        images = page.eval_on_selector_all(
            "img",
            "els => els.map(e => [e.currentSrc || e.src, e.complete, e.naturalWidth])",
        )
        for src, complete, width in images:
            if src.startswith(served) and status(src) != 200:
                problems.append(f"{nav.source}: image {src} answered {status(src)}")
            if not (complete and width > 0):
                problems.append(f"{nav.source}: image {src} is not drawn")
        if nav.source == "performance.md" and not any(
            src == served + CHART and width > 0 for src, _, width in images
        ):
            problems.append(f"performance.md: the chart {CHART} is not drawn")
        problems += [f"{nav.source}: {error}" for error in visit.errors]
        page.close()

    context.close()
    assert pages
    assert not problems, "\n".join(problems)


def test_the_site_works_opened_from_disk(site: Path, browser: Any) -> None:
    page = browser.new_page()
    visit = Visit()
    visit.watch(page, (site / "index.html").as_uri().removesuffix("index.html"))
    page.goto((site / "index.html").as_uri(), wait_until="load")
    assert page.locator("article h1").first.inner_text().startswith("batchtask")
    page.locator("article a[href='semantics.html']").first.click()
    page.wait_for_load_state("load")
    assert page.url == (site / "semantics.html").as_uri()
    assert page.locator("article h1").first.inner_text().startswith("Semantics")
    page.close()
    assert not visit.errors, "\n".join(visit.errors)
