"""The netns lab itself: topologies come up, hosts reach the server over v4 and v6, nothing is left behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from synproxy.lab import Lab, LabError, cleanup_stale

pytestmark = pytest.mark.e2e
PY = sys.executable


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize("mode", ["local", "gateway"])
def test_clients_reach_server_over_tcp_v4_and_v6(mode: str) -> None:
    before = _netns()
    with Lab(mode=mode, clients=2) as lab:
        lab.popen("server", [PY, "-m", "synproxy.peers", "sink", "--port", "9100"])
        lab.run("server", [PY, "-c", "import time; time.sleep(0.5)"])
        for client in ("client", "client2"):
            for family in (4, 6):
                out = lab.run(client, [PY, "-m", "synproxy.peers", "chunks", lab.addr("server", family), "9100",
                                       "--chunks", "4"])
                res = json.loads(out.stdout)
                assert res["ok"]
                assert res["client_as_seen"].removeprefix("::ffff:") == lab.addr(client, family)
        names = {h.netns for h in lab.hosts.values()}
        assert names <= _netns()
    assert _netns() == before


def test_teardown_on_exception() -> None:
    before = _netns()
    with pytest.raises(RuntimeError):
        with Lab(mode="gateway") as lab:
            lab.popen("server", ["sleep", "30"])
            raise RuntimeError("test body failed")
    assert _netns() == before


def test_two_labs_in_parallel_do_not_collide() -> None:
    with Lab() as a, Lab() as b:
        assert not {h.netns for h in a.hosts.values()} & {h.netns for h in b.hosts.values()}


def test_run_reports_failures_clearly() -> None:
    with Lab() as lab:
        with pytest.raises(LabError, match="exited"):
            lab.run("client", ["false"])


def test_cleanup_stale_removes_dead_runs(tmp_path: object) -> None:
    lab = Lab()
    lab.__enter__()
    from synproxy import lab as labmod

    (labmod.REGISTRY / lab.run_id).write_text("999999999")  # a pid that cannot exist
    removed = cleanup_stale()
    assert {h.netns for h in lab.hosts.values()} <= set(removed)
    lab.close()
