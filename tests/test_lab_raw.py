"""What the proxy's datapath assumes of raw sockets and marks, checked on the real kernel.

The proxy injects packets with a spoofed source (the client's, toward the
server; the server's, toward the client) through `SOCK_RAW/IPPROTO_RAW`
sockets carrying `SO_MARK`, and its rules let marked packets through:

(a) IPv4, local mode: a marked raw packet from the client's address to the
    namespace's own address crosses raw OUTPUT with the mark, loops over lo
    and reaches raw PREROUTING still marked and still with the spoofed source.
(b) the same for IPv6 (`AF_INET6, SOCK_RAW, IPPROTO_RAW` is header-included).
(c) gateway mode: the router sends a packet with the client's source to the
    server, the server receives it and its reply reaches the client through
    the router. The mark is seen in the router's OUTPUT only: marks do not
    cross veths into another namespace, so the server sees mark 0.

Results on kernel 6.18 (Debian 12 userland): all three hold.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from synproxy.lab import Lab

pytestmark = pytest.mark.e2e
MARK = 0x5350
PORT = 9999  # nothing listens: the server answers a SYN with a RST

SEND = """
import socket, sys
from scapy.all import IP, IPv6, TCP
family, src, dst, mark = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
if family == 4:
    pkt, af = IP(src=src, dst=dst), socket.AF_INET
else:
    pkt, af = IPv6(src=src, dst=dst), socket.AF_INET6
sock = socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
sock.sendto(bytes(pkt / TCP(sport=40000, dport=%d, flags="S", seq=1000)), (dst, 0))
""" % PORT


def tool(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def count_rules(lab: Lab, host: str, family: int, chain: str, *match: str) -> None:
    """Two counting rules (no target) in the raw table: any packet matching, and marked ones."""
    base = [tool(family), "-t", "raw", "-A", chain, "-p", "tcp", *match]
    lab.run(host, [*base, "-m", "comment", "--comment", f"{chain}-any"])
    lab.run(host, [*base, "-m", "mark", "--mark", hex(MARK), "-m", "comment", "--comment", f"{chain}-marked"])


def counters(lab: Lab, host: str, family: int) -> dict[str, int]:
    out = lab.run(host, [f"{tool(family)}-save", "-c", "-t", "raw"]).stdout
    found: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r'\[(\d+):\d+\] .*--comment "?([\w-]+)"?', line)
        if m:
            found[m.group(2)] = int(m.group(1))
    return found


def wait_for(lab: Lab, host: str, family: int, key: str, seconds: float = 3.0) -> dict[str, int]:
    deadline = time.monotonic() + seconds
    while True:
        seen = counters(lab, host, family)
        if seen.get(key) or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


@pytest.mark.parametrize("family", [4, 6])
def test_mark_survives_the_loop_over_lo(lab: Lab, family: int) -> None:
    """(a) and (b): the server's namespace sends to itself with the client's source."""
    client, server = lab.addr("client", family), lab.addr("server", family)
    count_rules(lab, "server", family, "OUTPUT", "-s", client, "-d", server, "--dport", str(PORT))
    count_rules(lab, "server", family, "PREROUTING", "-s", client, "-d", server, "--dport", str(PORT))
    lab.python("server", SEND, str(family), client, server, str(MARK))
    seen = wait_for(lab, "server", family, "PREROUTING-marked")
    assert seen == {"OUTPUT-any": 1, "OUTPUT-marked": 1, "PREROUTING-any": 1, "PREROUTING-marked": 1}


@pytest.mark.parametrize("family", [4, 6])
def test_router_sends_with_the_clients_source(make_lab: Callable[..., Lab], family: int) -> None:
    """(c): the router forges the client's packet; the server gets it, the client gets the reply."""
    lab = make_lab(mode="gateway")
    client, server = lab.addr("client", family), lab.addr("server", family)
    count_rules(lab, "router", family, "OUTPUT", "-s", client, "-d", server, "--dport", str(PORT))
    count_rules(lab, "server", family, "PREROUTING", "-s", client, "-d", server, "--dport", str(PORT))
    lab.run("client", [tool(family), "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "-s", server, "-d", client,
                       "--sport", str(PORT), "--tcp-flags", "RST", "RST", "-m", "comment", "--comment", "reply"])
    lab.python("router", SEND, str(family), client, server, str(MARK))
    assert counters(lab, "router", family) == {"OUTPUT-any": 1, "OUTPUT-marked": 1}
    assert wait_for(lab, "server", family, "PREROUTING-any") == {"PREROUTING-any": 1, "PREROUTING-marked": 0}
    assert wait_for(lab, "client", family, "reply") == {"reply": 1}
