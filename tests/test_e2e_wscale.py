"""Window-scale mismatch (issue 3, case 1): the proxy advertises one scale, the server picks another.

Kernel SYNPROXY advertising 2 to a server using 7 cut a 200 MB upload from ~670 to ~43 MB/s, and
advertising 12 stalled it outright. Here 50 MB go up (to a fast and to a slow-reading server) and
down through synproxy forced to --wscale 2, 7 and 12 while the server uses 0, 2, 7 or 14; every
transfer must arrive byte-exact with fewer than 1% of the sender's segments retransmitted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from synproxy.peers import pattern_sha256

from .e2e import Proxied, proxied

pytestmark = pytest.mark.e2e

MB = 1_000_000
SIZE = 50 * MB
RESULTS: list[str] = []

# How to make the server choose each window scale. Linux picks the smallest scale that fits
# max(tcp_rmem[2], net.core.rmem_max) (rmem_max is global to the host, so it sets a floor),
# capped by the socket's own buffer when SO_RCVBUF is set before listen().
SERVER_SHAPES: dict[int, tuple[str, list[str]]] = {
    0: ("4096 16384 65536", ["--rcvbuf", "16384"]),
    2: ("4096 131072 212992", ["--rcvbuf", "200000"]),
    7: ("4096 131072 6291456", []),
    14: ("4096 131072 1073741824", []),
}


def shape_server(px: Proxied, wscale: int, slow: bool = False) -> None:
    rmem, args = SERVER_SHAPES[wscale]
    px.lab.sysctl("server", "net.ipv4.tcp_rmem", rmem)
    px.restart_server(*args, *(["--slow-read", "0.005"] if slow else []))
    seen = json.loads(str(px.client("get", px.url(4, "/whoami"))["body"]))["tcp"]
    assert seen["rcv_wscale"] == wscale, f"server chose {seen['rcv_wscale']}, wanted {wscale}"


def retrans_pct(before: dict[str, int], after: dict[str, int]) -> float:
    out = after["OutSegs"] - before["OutSegs"]
    return 100.0 * (after["RetransSegs"] - before["RetransSegs"]) / max(out, 1)


def upload(px: Proxied, label: str) -> None:
    before = px.snmp("client")
    res = px.client("upload", px.url(4, "/upload"), "--size", str(SIZE), timeout=240)
    pct = retrans_pct(before, px.snmp("client"))
    RESULTS.append(f"{label} upload: {SIZE / float(res['total_s']) / MB:.0f} MB/s, retransmitted {pct:.3f}%")
    assert res["ok"], res
    assert pct < 1.0, RESULTS[-1]


def download(px: Proxied, label: str) -> None:
    before = px.snmp("server")
    res = px.client("get", px.url(4, f"/bytes/{SIZE}"), timeout=240)
    pct = retrans_pct(before, px.snmp("server"))
    RESULTS.append(f"{label} download: {SIZE / float(res['total_s']) / MB:.0f} MB/s, retransmitted {pct:.3f}%")
    assert res["sha256"] == pattern_sha256(SIZE), res
    assert pct < 1.0, RESULTS[-1]


@pytest.fixture(scope="module")
def local() -> Iterator[Proxied]:
    with proxied("local", start=False) as px:
        yield px
    print("\n" + "\n".join(RESULTS))


@pytest.fixture(scope="module")
def gateway() -> Iterator[Proxied]:
    with proxied("gateway", start=False) as px:
        yield px


def _run_matrix(px: Proxied, advertised: int, server_scales: list[int]) -> None:
    px.stop_proxy()
    px.start_proxy("--wscale", str(advertised))
    for server_ws in server_scales:
        label = f"{px.mode} proxy={advertised} server={server_ws}"
        shape_server(px, server_ws)
        upload(px, label + " fast")
        download(px, label)
        shape_server(px, server_ws, slow=True)
        upload(px, label + " slow-reading")


@pytest.mark.parametrize("advertised", [7, 2, 12])
def test_local_every_server_scale(local: Proxied, advertised: int) -> None:
    """Local mode: all four server scales against each forced advertised scale."""
    _run_matrix(local, advertised, [0, 2, 7, 14])


@pytest.mark.parametrize("advertised", [2, 12])
def test_gateway_extreme_scales(gateway: Proxied, advertised: int) -> None:
    """Gateway mode: the extreme server scales (the datapath differs, the translation does not)."""
    _run_matrix(gateway, advertised, [0, 14])


def test_server_choice_moves_at_run_time(local: Proxied) -> None:
    """The server's buffer sysctls change while the proxy runs (auto mode); new connections still work."""
    local.stop_proxy()
    local.start_proxy()  # --wscale auto
    for server_ws in (7, 14, 0, 2, 7):
        shape_server(local, server_ws)
        upload(local, f"auto, server moved to {server_ws}")
        download(local, f"auto, server moved to {server_ws}")
