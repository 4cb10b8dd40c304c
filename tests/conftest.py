"""Suite-wide scheduling: the suite runs on two pytest-xdist workers (scripts/test.sh), and the
minutes-long end-to-end runs are collected first so that neither worker is left with one of them
at the end while the other idles (the work-stealing scheduler hands the short tests around them)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A stable sort: file order is kept inside each group, and every worker collects the same order.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
