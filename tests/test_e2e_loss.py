"""End to end over a lossy path: the translated SACK blocks and timestamps carry TCP's recovery.

The kernel here has no netem, so loss is an iptables rule that drops a random 2% of one
direction's segments where the network would: on the receiving host, before anything else
(the proxy included) sees them. Downloads lose server data at the client, so the client's
SACK blocks (in the sequence space the proxy gave it) must reach the server translated into
the server's; uploads lose client data at the server host, so the server's SACK blocks
reach the client. Either end's TCP counts a SACK block it finds invalid
(TcpExtTCPSACKDiscard) and a segment it drops for an old timestamp (TcpExtPAWSEstab); a
translation error in either shows there, or as recovery by retransmission timeouts instead of
SACK, long before it would corrupt data. So does a segment of the proxy's that arrives after newer
ones: the server's PAWS count caught the held data of the connection's start, then sent by raw
socket, overtaken by the client's retransmissions (11 of 11 dropped, in CI and 2 of 166 lab runs;
now held data passes by verdict, see docs/design.md).

The lab's wires must then keep a flow's order, as real ones do: a veth does not when one flow's
packets leave from two CPUs (Lab._steer_flows). CI once failed here with 24 segments of a gateway
download dropped by the client for old timestamps. Captures on each interface then showed
timestamps going back by 1-2 ms before the proxy had the packets (between the server's interface
and the router's in 5 of 6 batches of 30 downloads, past the router's in the sixth), and in none
of 180 with RPS on (keep_flow_order).

A duplicate-SACK block the sender ignores as older than its current recovery
(TcpExtTCPDSACKIgnoredOld) is not such a sign: every SACK block of a connection is translated by
the same offset, so an error would fail the hundreds of ordinary blocks too, and it is timing: the
duplicate's report arrives after a newer recovery began (or, outside recovery, Linux's check
compares with an undo marker of 0, so it depends on where the sequence numbers lie). Over 80
gateway downloads through the proxy (2026-12-03) the server got 608 duplicate-SACK blocks, 126
of them ignored as old, none of the ordinary blocks discarded; they came in bursts (18 in one
download, 9 ignored) with valid ones among them, which an offset error cannot give. The check
once failed CI with one of them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from synproxy.peers import pattern_sha256

from .e2e import SERVER_PORT, Proxied, proxied

pytestmark = pytest.mark.e2e

SIZE = 20_000_000
LOSS = "0.02"
INVALID = ("TcpExtTCPSACKDiscard", "TcpExtPAWSEstab")


@pytest.fixture(scope="module", params=["local", "gateway"])
def px(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    with proxied(request.param, keep_flow_order=True) as p:  # wires that do not reorder (Lab._steer_flows)
        yield p


def nstat(px: Proxied, host: str) -> dict[str, int]:
    """A host's TCP counters (absolute: nstat -a), by name."""
    out = px.lab.run(host, ["nstat", "-az"]).stdout
    return {f[0]: int(f[1]) for f in (line.split() for line in out.splitlines()) if len(f) >= 2 and f[1].isdigit()}


def lossy(px: Proxied, host: str, match: list[str]) -> None:
    """Drop a random LOSS of the packets `match` selects as they arrive at `host`, first of all rules."""
    for tool in ("iptables", "ip6tables"):
        px.lab.run(host, [tool, "-w", "-t", "raw", "-I", "PREROUTING", "-p", "tcp", *match,
                          "-m", "statistic", "--mode", "random", "--probability", LOSS, "-j", "DROP"])


def lossless(px: Proxied, host: str, match: list[str]) -> None:
    for tool in ("iptables", "ip6tables"):
        px.lab.run(host, [tool, "-w", "-t", "raw", "-D", "PREROUTING", "-p", "tcp", *match,
                          "-m", "statistic", "--mode", "random", "--probability", LOSS, "-j", "DROP"])


def transfer_under_loss(px: Proxied, direction: str, family: int) -> tuple[dict[str, object], dict[str, dict[str, int]]]:
    """One 20 MB transfer with LOSS dropped on its data path; its result and both ends' counter deltas."""
    if direction == "download":  # server data, dropped at the client
        host, match = "client", ["--sport", str(SERVER_PORT)]
    else:  # client data, dropped at the host in front of the server (the proxy's, in gateway mode)
        host, match = px.proxy_host, ["--dport", str(SERVER_PORT)]
    ends = ("client", "server")
    before = {end: nstat(px, end) for end in ends}
    lossy(px, host, match)
    try:
        if direction == "download":
            res = px.client("get", px.url(family, f"/bytes/{SIZE}"), timeout=120)
        else:
            res = px.client("upload", px.url(family, "/upload"), "--size", str(SIZE), timeout=120)
    finally:
        lossless(px, host, match)
    after = {end: nstat(px, end) for end in ends}
    deltas = {end: {k: v - before[end].get(k, 0) for k, v in after[end].items() if v != before[end].get(k, 0)}
              for end in ends}
    return res, deltas


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("direction", ["download", "upload"])
def test_transfer_under_loss_recovers_by_sack(px: Proxied, direction: str, family: int) -> None:
    """20 MB with 2% of the data dropped arrive intact; the sender recovers with SACK and
    neither end finds a SACK block or timestamp it has to discard."""
    res, deltas = transfer_under_loss(px, direction, family)
    if direction == "download":
        assert res["status"] == 200 and res["bytes"] == SIZE and res["sha256"] == pattern_sha256(SIZE), res
    else:
        assert res["status"] == 200 and res["ok"], res
    sender = deltas["server" if direction == "download" else "client"]
    assert sender.get("TcpRetransSegs", 0) > 0, deltas  # the loss happened
    assert sender.get("TcpExtTCPSackRecovery", 0) > 0, deltas  # and SACK, not only timeouts, repaired it
    for end, counts in deltas.items():
        assert {k: counts.get(k, 0) for k in INVALID} == dict.fromkeys(INVALID, 0), (end, deltas)
