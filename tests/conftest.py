"""Shared fixtures: labs of network namespaces (synproxy.lab) that are always torn down.

    def test_x(lab): ...                      # a local-mode lab, one client
    def test_y(make_lab):
        lab = make_lab(mode="gateway", clients=2, mtu=9000)

End-to-end tests (marked `e2e`) need root; without it they are skipped with a
reason rather than failing on the first `ip netns add`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from synproxy.lab import Lab


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = "needs root" if os.geteuid() != 0 else "needs iproute2 (ip)" if shutil.which("ip") is None else ""
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"end-to-end test {missing}")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    """Build labs on demand (`make_lab(mode=..., clients=..., mtu=...)`); all are closed
    after the test, whether it passed, failed or raised."""
    labs: list[Lab] = []

    def make(**kw: Any) -> Lab:
        lab = Lab(**kw)
        labs.append(lab)  # before __enter__: a half-built lab is closed too
        return lab.__enter__()

    try:
        yield make
    finally:
        for lab in reversed(labs):
            lab.close()


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    """A local-mode lab: one client, the server (where a local-mode proxy runs)."""
    return make_lab(mode="local")
