"""`synproxy demo --short` as the README's `make demo` runs it: the flood is shed, nothing is left behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _orphans(before: set[str]) -> set[str]:
    """Lab namespaces that appeared during the test and that no live lab owns any more
    (another run's lab, still registered, is not the demo's leftover)."""
    from synproxy.lab import PREFIX, REGISTRY

    return {
        ns for ns in _netns() - before
        if ns.startswith(PREFIX) and not (REGISTRY / ns[len(PREFIX): len(PREFIX) + 6]).exists()
    }


def test_demo_short() -> None:
    before = _netns()
    synproxy = str(Path(sys.executable).parent / "synproxy")
    res = subprocess.run([synproxy, "demo", "--short"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    m = re.search(r"legitimate connections\s+(\d+)/(\d+) \(\d+%\)\s+(\d+)/(\d+)", out)
    assert m, out
    plain_ok, plain_all, guarded_ok, guarded_all = map(int, m.groups())
    assert guarded_all >= 20 and guarded_ok >= 0.9 * guarded_all, out
    assert plain_ok < guarded_ok, out
    sent = re.search(r"spoofed SYNs sent per second\s+([\d,]+)\s+([\d,]+)", out)
    assert sent and all(int(x.replace(",", "")) > 1000 for x in sent.groups()), out  # what was sent, not the setting
    assert "metrics: http://" in out
    assert not _orphans(before)
