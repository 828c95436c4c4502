"""The netns lab itself: topologies come up, hosts reach the server over v4 and v6, nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from synproxy import lab as labmod
from synproxy.lab import Lab, LabError, cleanup_stale, cpu_mask

pytestmark = pytest.mark.e2e
PY = sys.executable


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _leftovers(lab: Lab) -> set[str]:
    """Namespaces, root-namespace interfaces and registry entries of this lab still there.

    Only this lab's: other runs (other engineers, parallel tests) come and go meanwhile.
    """
    names = _netns() | _root_links() | {p.name for p in labmod.REGISTRY.glob("*")}
    return {name for name in names if lab.run_id in name}


@pytest.mark.parametrize("mode", ["local", "gateway"])
def test_clients_reach_server_over_tcp_v4_and_v6(mode: str) -> None:
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
    assert not _leftovers(lab)


def test_teardown_on_exception() -> None:
    with pytest.raises(RuntimeError):
        with Lab(mode="gateway") as lab:
            sleeper = lab.popen("server", ["sleep", "30"])
            raise RuntimeError("test body failed")
    assert not _leftovers(lab)
    assert sleeper.poll() is not None  # background processes are stopped too


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


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@pytest.mark.parametrize("raises", [False, True])
def test_no_interface_left_in_the_root_namespace(raises: bool) -> None:
    """The host link is the one interface a lab makes outside its namespaces: gone afterwards too."""
    lab = Lab(mode="gateway", host_link=True)
    try:
        with lab:
            assert f"spx{lab.run_id}h" in _root_links()
            if raises:
                raise RuntimeError("test body failed")
    except RuntimeError:
        assert raises
    assert not _leftovers(lab)


CONNECT_MSS = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
"""


def test_mtu_python_helper_and_sysctls(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(mode="gateway", mtu=9000)
    for host in ("client", "router", "server"):
        links = json.loads(lab.run(host, ["ip", "-j", "link", "show"]).stdout)
        assert {link["mtu"] for link in links if link["ifname"].startswith("eth")} == {9000}
        no_metrics = lab.run(host, ["sysctl", "-n", "net.ipv4.tcp_no_metrics_save"]).stdout.strip()
        assert no_metrics == "1"
    lab.popen("server", [PY, "-m", "synproxy.peers", "sink", "--port", "9100"])
    for family in (4, 6):
        for _ in range(50):  # until the sink listens
            res = lab.python("client", CONNECT_MSS, lab.addr("server", family), "9100", check=False)
            if res.returncode == 0:
                break
            time.sleep(0.1)
        assert int(res.stdout) > 8000, res.stderr  # jumbo frames end to end through the router


def test_cleanup_stale_does_not_trust_a_recycled_pid() -> None:
    """A registry entry whose pid is alive but started at another time belongs to a dead run."""
    lab = Lab()
    lab.__enter__()
    try:
        (labmod.REGISTRY / lab.run_id).write_text(f"{os.getpid()} 1")  # our pid, wrong start time
        assert {h.netns for h in lab.hosts.values()} <= set(cleanup_stale())
        assert not {h.netns for h in lab.hosts.values()} & _netns()
    finally:
        lab.close()


def test_cleanup_stale_keeps_live_runs() -> None:
    with Lab() as lab:
        assert not set(cleanup_stale()) & {h.netns for h in lab.hosts.values()}
        assert {h.netns for h in lab.hosts.values()} <= _netns()


def test_addr_takes_either_family_spelling(lab: Lab) -> None:
    import socket

    assert lab.addr("server", 4) == lab.addr("server", socket.AF_INET) == "198.18.0.1"
    assert lab.addr("server", 6) == lab.addr("server", socket.AF_INET6) == "fd53:5059::1"
    with pytest.raises(LabError):
        lab.addr("server", 5)


def _rps_masks(lab: Lab, host: str) -> dict[str, int]:
    out = lab.run(host, ["sh", "-c", "grep -H . /sys/class/net/*/queues/rx-*/rps_cpus"]).stdout
    return {line.split("/")[4]: int(line.rsplit(":", 1)[1].replace(",", ""), 16) for line in out.splitlines()}


@pytest.mark.parametrize("keep", [False, True])
def test_keep_flow_order_steers_every_interface_over_all_cpus(make_lab: Callable[..., Lab], keep: bool) -> None:
    """With keep_flow_order every receive queue of every host has RPS over all CPUs; without, none."""
    lab = make_lab(mode="gateway", keep_flow_order=keep)
    every_cpu = (1 << (os.cpu_count() or 1)) - 1
    for host in lab.hosts:
        masks = _rps_masks(lab, host)
        assert "lo" in masks and len(masks) >= 2, masks
        assert set(masks.values()) == {every_cpu if keep else 0}, (host, masks)


def test_cpu_mask_is_the_kernels_bitmap_format() -> None:
    """32-bit hex words, comma-separated, most significant first (so more than 32 CPUs work)."""
    assert cpu_mask(1) == "00000001"
    assert cpu_mask(2) == "00000003"
    assert cpu_mask(32) == "ffffffff"
    assert cpu_mask(33) == "00000001,ffffffff"
    assert cpu_mask(64) == "ffffffff,ffffffff"
