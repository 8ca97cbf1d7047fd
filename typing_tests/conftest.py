"""Settings for the typing suite (mypy YAML cases and the pyright pass).

This suite runs in its own pytest process (see ``scripts/test``): in
same-process mode pytest-mypy-plugins rebinds ``sys.modules`` to a copy after
each case, which leaves later imports in this process half-initialised. The
hook below rebinds it back to the interpreter's own dict after every case.
"""

import sys
from collections.abc import Generator

import pytest

_MODULES = sys.modules


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        sys.modules = _MODULES


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run every mypy case with the plugin first, then every one without.

    mypy's cache is valid for one plugin setting; grouping the cases by
    setting lets them share it instead of rebuilding it at every switch.
    """
    items.sort(key=lambda item: "mypy=plain" in item.name)
