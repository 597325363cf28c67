"""The default run leaves out the ``families`` smoke runs (CI time); ``-m families`` (or any -m naming it) runs them."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "families" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="model-family smoke run: select with -m families (bash scripts/test.sh -m families)")
    for item in items:
        if "families" in item.keywords:
            item.add_marker(skip)
