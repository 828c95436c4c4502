"""ECN (RFC 3168) through the proxy, with real kernels on both sides.

Before, the proxy's SYN-ACK never agreed ECN and its SYN to the server never asked: a client
that asks for ECN (Apple's systems do by default, Linux with net.ipv4.tcp_ecn = 1) lost it
behind the proxy, where Linux serving it directly agrees (its default, tcp_ecn = 2). Now it is
agreed whenever the server took it at its last handshake; when the server refuses it after all
(its tcp_ecn switched to 0 at run time), the client's ECN-capable packets reach it as not
ECN-capable and CE-marked ones are dropped, the loss the mark stands for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from synproxy.peers import pattern_sha256

from .e2e import SERVER_PORT, SINK_PORT, Proxied, proxied

pytestmark = pytest.mark.e2e

UPLOAD = 3_000_000


@pytest.fixture(scope="module", params=["local", "gateway"])
def px(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    with proxied(request.param) as p:
        p.lab.sysctl("client", "net.ipv4.tcp_ecn", "1")  # ask for ECN (IPv6 too)
        yield p


def chunks(px: Proxied, family: int) -> dict[str, dict[str, object]]:
    res = px.client("chunks", px.server_addr(family), str(SINK_PORT), "--chunks", "1000,1000")
    assert res["ok"], res
    return {"client": res["client_tcp"], "server": res["server_tcp"]}  # type: ignore[dict-item]


def ect_counter(px: Proxied, family: int) -> list[str]:
    """A counting rule on the server's INPUT: ECN-capable or CE packets to the protected port."""
    tool = "iptables" if family == 4 else "ip6tables"
    rule = ["-p", "tcp", "--dport", str(SERVER_PORT), "-m", "ecn", "!", "--ecn-ip-ect", "0"]
    px.lab.run("server", [tool, "-I", "INPUT", *rule])
    return [tool, *rule]


@pytest.mark.parametrize("family", [4, 6])
def test_ecn_is_agreed_through_the_proxy_as_without_it(px: Proxied, family: int) -> None:
    before = px.metrics().get('synproxy_ecn_handshakes_total{outcome="negotiated"}', 0)
    seen = chunks(px, family)
    assert seen["client"]["ecn"] and seen["server"]["ecn"], seen
    assert seen["server"]["ecn_seen"], seen  # the client's data reached the server ECN-capable
    assert px.metrics()['synproxy_ecn_handshakes_total{outcome="negotiated"}'] == before + 1
    px.lab.sysctl("client", "net.ipv4.tcp_ecn", "2")  # Linux's default: never asks
    try:
        seen = chunks(px, family)
        assert not seen["client"]["ecn"] and not seen["server"]["ecn"], seen
    finally:
        px.lab.sysctl("client", "net.ipv4.tcp_ecn", "1")


@pytest.mark.parametrize("family", [4, 6])
def test_a_server_that_stops_taking_ecn_gets_no_ecn_capable_packets(px: Proxied, family: int) -> None:
    """The server's tcp_ecn goes to 0 while the proxy still agrees ECN with clients. The client
    of the next connection is told ECN; a router on its side marks one in ten of its
    ECN-capable packets CE. The upload arrives whole, no ECN-capable or CE packet reaches the
    server, the CE-marked ones were dropped; the refusal is learnt and the next client is not
    told ECN."""
    chunks(px, family)  # the profiles (of this port and the other): the server takes ECN
    px.client("get", px.url(family, "/whoami"))
    tool = "iptables" if family == 4 else "ip6tables"
    mark = ["-p", "tcp", "--dport", str(SERVER_PORT), "-m", "ecn", "--ecn-ip-ect", "2",
            "-m", "statistic", "--mode", "nth", "--every", "10", "--packet", "0", "-j", "TOS", "--set-tos", "0x03/0x03"]
    px.lab.run("client", [tool, "-t", "mangle", "-A", "POSTROUTING", *mark])
    counter = ect_counter(px, family)
    px.lab.sysctl("server", "net.ipv4.tcp_ecn", "0")
    before = px.metrics()
    try:
        res = px.client("upload", px.url(family, "/upload"), "--size", str(UPLOAD), timeout=120)
        assert res["ok"] and res["server"]["sha256"] == pattern_sha256(UPLOAD), res  # type: ignore[index]
        after = px.metrics()
        dropped = 'synproxy_packets_dropped_total{reason="ce_unechoed"}'
        assert after[dropped] - before.get(dropped, 0) > 0, "no CE-marked packet reached the proxy"
        refused = 'synproxy_ecn_handshakes_total{outcome="refused"}'
        assert after[refused] - before[refused] == 1
        out = px.lab.run("server", [tool, "-L", "INPUT", "-v", "-n", "-x"]).stdout
        counted = [ln.split() for ln in out.splitlines() if "ECN match" in ln]
        assert counted and int(counted[0][0]) == 0, out
        # learnt: the next client of that server is not told ECN, so the server is not asked
        whoami = json.loads(str(px.client("get", px.url(family, "/whoami"))["body"]))["tcp"]
        assert not whoami["ecn"], whoami
        negotiated = 'synproxy_ecn_handshakes_total{outcome="negotiated"}'
        final = px.metrics()
        assert (final[refused], final[negotiated]) == (after[refused], after[negotiated])
    finally:
        px.lab.sysctl("server", "net.ipv4.tcp_ecn", "2")
        px.lab.run("client", [tool, "-t", "mangle", "-D", "POSTROUTING", *mark], check=False)
        px.lab.run("server", [counter[0], "-D", "INPUT", *counter[1:]], check=False)
        px.stop_proxy()  # the next test starts from a proxy that has learnt nothing
        px.start_proxy()
