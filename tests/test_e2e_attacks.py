"""Attacks to survive (issue 4): each bounded in count and time, each with a legitimate client
on another address that must connect and get its data while the attack runs, and nothing
crossing to the server but the SYNs the proxy sent after validating a cookie."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from synproxy.peers import pattern_sha256

from .e2e import FINISH_ON_CUE, PYTHON, Proxied, during, finish_on_cue, proxied

pytestmark = pytest.mark.e2e

CAP = 40


@pytest.fixture(scope="module")
def px() -> Iterator[Proxied]:
    with proxied("local", clients=3, start=False) as p:
        p.start_proxy("--max-established-per-source", str(CAP), "--max-pending-per-source", "20",
                      "--source-prefix-v4", "24", "--source-prefix-v6", "64", "--synack-rate-per-source", "200",
                      "--synack-burst-per-source", "400")
        p.count_server_syns()
        yield p


def legit_ok(px: Proxied, family: int = 4) -> None:
    res = px.client("many", px.url(family, "/"), "--count", "20", "--concurrency", "4", "--timeout", "3")
    assert res["ok"] == 20, res


def assert_forgeries_within_chance(validated: float, legit: int, bogus: float) -> None:
    """`validated` ACKs are the legitimate client's `legit` plus, at most, one bogus ACK that passed by
    the MAC's chance: each bogus ACK is tried against 2 MACs of 23 bits (docs/cookie.md), so
    `bogus` of them expect bogus * 2**-22 forgeries (~0.01 for 40,000; CI runs have had one
    twice). Two would be ~5e-5 for 40,000."""
    forged = validated - legit
    assert 0 <= forged <= 1, f"{forged:g} bogus ACKs validated out of {bogus:g} (expected {bogus * 2**-22:.3f})"


def legit_ok_during(px: Proxied, attack: subprocess.Popen[bytes], family: int = 4) -> None:
    """legit_ok while the attack runs."""
    during(attack, lambda: legit_ok(px, family), "the legitimate client")


def test_ack_flood_with_bogus_cookies(px: Proxied) -> None:
    """Random ACKs are dropped as invalid cookies; the server never sees them (it would answer RSTs)."""
    server_before, m0, syns0 = px.snmp("server"), px.metrics(), px.server_syns()
    legit_before = m0["synproxy_ack_valid_total"]
    flood = px.lab.popen("client3", ["timeout", "15", "hping3", "-q", "-A", "-p", "8080", "--rand-source", "-i",
                                     "u50", "-c", "40000", px.server_addr(4)])
    legit_ok_during(px, flood)
    server_after, m1 = px.snmp("server"), px.metrics()
    invalid = m1['synproxy_ack_invalid_total{reason="cookie"}'] - m0.get('synproxy_ack_invalid_total{reason="cookie"}', 0)
    assert invalid > 30000, invalid
    assert_forgeries_within_chance(m1["synproxy_ack_valid_total"] - legit_before, 20, invalid)
    assert server_after["OutRsts"] - server_before["OutRsts"] < 10  # the ACKs never reached its stack
    px.assert_only_validated_crossed(m0, syns0)


def test_syn_fin_and_syn_rst_get_no_synack_and_cross_nothing(px: Proxied) -> None:
    """SYN+FIN and SYN+RST (scanners' packets, which Linux drops in LISTEN) from a real source: no
    SYN-ACK comes back to it, each is counted as bad_flags, and none reaches the server."""
    m0, syns0 = px.metrics(), px.server_syns()
    replies = {}
    for extra in ("-F", "-R"):
        res = px.lab.run("client3", ["timeout", "20", "hping3", "-S", extra, "-p", "8080", "-i", "u2000", "-c", "200",
                                     px.server_addr(4)], check=False)
        summary = [line for line in (res.stdout + res.stderr).splitlines() if "packets received" in line]
        assert summary, res.stdout + res.stderr
        replies[extra] = summary[0]
    assert all("200 packets transmitted, 0 packets received" in line for line in replies.values()), replies
    m1 = px.metrics()
    key = 'synproxy_packets_dropped_total{reason="bad_flags"}'
    assert m1[key] - m0.get(key, 0) == 400
    assert m1["synproxy_synack_sent_total"] == m0["synproxy_synack_sent_total"]
    legit_ok(px)
    px.assert_only_validated_crossed(m0, syns0)


def test_syn_and_ack_floods_together(px: Proxied) -> None:
    """Spoofed SYNs and bogus-cookie ACKs at once, from two hosts (~10,000 a second each, within one
    worker's capacity; at both generators' full speed see README "Limits"): the SYNs are answered
    and the ACKs dropped, the legitimate client is served, the server's stack sees neither."""
    server_before, m0, syns0 = px.snmp("server"), px.metrics(), px.server_syns()
    floods = [px.lab.popen(host, ["timeout", "15", "hping3", "-q", flag, "-p", "8080", "--rand-source", "-i", "u100",
                                  "-c", "40000", px.server_addr(4)])
              for host, flag in (("client2", "-S"), ("client3", "-A"))]

    def legit_ok_while_acks_flood() -> None:
        legit_ok(px)
        assert floods[1].poll() is None, "the ACK flood ended before the legitimate client did"

    try:
        during(floods[0], legit_ok_while_acks_flood, "the legitimate client")
    finally:
        for flood in floods:
            flood.wait(20)
    server_after, m1 = px.snmp("server"), px.metrics()

    def delta(name: str) -> float:
        return m1.get(name, 0) - m0.get(name, 0)

    bogus = delta('synproxy_ack_invalid_total{reason="cookie"}')
    assert bogus > 10000
    assert delta("synproxy_synack_sent_total") > 10000
    assert_forgeries_within_chance(delta("synproxy_ack_valid_total"), 20, bogus)
    assert server_after["OutRsts"] - server_before["OutRsts"] < 10
    px.assert_only_validated_crossed(m0, syns0)


@pytest.mark.parametrize("family, prefix", [(4, "198.18.77.0/24"), (6, "fd53:5059:0:77::/64")])
def test_syn_flood_from_one_subnet_is_rate_limited(px: Proxied, family: int, prefix: str) -> None:
    """Spoofed SYNs from all over one /24 (IPv6: /64): SYN-ACKs toward it stay within its token bucket."""
    m0, syns0 = px.metrics(), px.server_syns()
    flood = px.lab.popen("client3", [PYTHON, "-m", "synproxy.peers", "synflood", px.server_addr(family), "8080",
                                     "--prefix", prefix, "--count", "20000", "--rate", "10000"],
                         stdout=subprocess.PIPE)
    legit_ok_during(px, flood, family)
    out = json.loads(flood.stdout.read())  # type: ignore[union-attr]
    m1 = px.metrics()
    answered = m1["synproxy_synack_sent_total"] - m0["synproxy_synack_sent_total"]
    shed = m1['synproxy_shed_total{reason="synack_rate_source"}'] - m0.get(
        'synproxy_shed_total{reason="synack_rate_source"}', 0)
    seconds = float(out["seconds"])
    assert answered <= 400 + 200 * (seconds + 1), (answered, seconds)  # burst + rate x time
    assert shed > 10000, shed
    assert px.syn_recv() == 0
    px.assert_only_validated_crossed(m0, syns0)


def test_connection_exhaustion_from_one_source(px: Proxied) -> None:
    """A client completing real handshakes to hold connections open: capped at its source's share,
    while a client on another address is served."""
    code = (
        "import socket,sys,time,json\n"
        "held=[];refused=0\n"
        "for i in range(int(sys.argv[3])):\n"
        "  try:\n"
        "    s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1.5)\n"
        "    s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n');s.settimeout(1.5)\n"
        "    if s.recv(100): held.append(s)\n"
        "    else: refused+=1\n"
        "  except OSError: refused+=1\n"
        "print(json.dumps({'held':len(held),'refused':refused}))\n"
        "time.sleep(float(sys.argv[4]))\n"
    )
    m0, syns0 = px.metrics(), px.server_syns()
    hog = px.lab.popen("client2", [PYTHON, "-c", code, px.server_addr(4), "8080", str(CAP + 20), "20"],
                       stdout=-1, text=True)
    line = hog.stdout.readline()  # type: ignore[union-attr]
    got = json.loads(line)
    assert got["held"] <= CAP and got["held"] >= CAP - 5, got
    m = px.metrics()
    assert m.get('synproxy_shed_total{reason="per_source_established"}', 0) >= 10
    legit_ok(px)  # while the hog holds its connections
    hog.kill()
    hog.wait(10)
    px.assert_only_validated_crossed(m0, syns0)


def test_download_through_a_syn_flood(px: Proxied) -> None:
    """A SYN flood at hping3's full speed fills only the SYN queue: a download running through it
    arrives intact and the traffic queue drops nothing, while the SYN queue overflows."""
    m0, syns0 = px.metrics(), px.server_syns()
    flood = px.lab.popen("client3", ["timeout", "8", "hping3", "-q", "-S", "-p", "8080", "--rand-source", "--flood",
                                     "-c", "2000000", px.server_addr(4)])
    size = 20_000_000
    res = during(flood, lambda: px.client("get", px.url(4, f"/bytes/{size}"), timeout=60), "the download")
    m1 = px.metrics()

    def delta(name: str) -> float:
        return m1[name] - m0.get(name, 0)  # KeyError if the series is missing

    assert res["status"] == 200 and res["bytes"] == size and res["sha256"] == pattern_sha256(size), res
    assert delta('synproxy_nfqueue_dropped_total{cause="queue_full",queue="traffic"}') == 0
    assert delta('synproxy_nfqueue_dropped_total{cause="socket_full",queue="traffic"}') == 0
    # It was overloaded: the worker shed first attempts, or the kernel dropped the SYN queue's overflow.
    assert delta('synproxy_shed_total{reason="overload"}') + delta(
        'synproxy_nfqueue_dropped_total{cause="queue_full",queue="syn"}') > 0
    px.assert_only_validated_crossed(m0, syns0)


def connects_during_full_speed_flood(px: Proxied, attacker: str, flood_seconds: int, client_seconds: int,
                                     timeout: int = 3) -> list[dict[str, Any]]:
    """A legitimate connection every 20 ms while hping3 floods at full speed, bounded in time and
    count: one result per connection."""
    flood = px.lab.popen(attacker, ["timeout", str(flood_seconds), "hping3", "-q", "-S", "-p", "8080",
                                    "--rand-source", "--flood", "-c", "3000000", px.server_addr(4)])
    out = during(flood, lambda: px.lab.run("client", [PYTHON, "-m", "synproxy.peers", "loop", px.url(4, "/"),
                                                      "--seconds", str(client_seconds), "--interval", "0.02",
                                                      "--timeout", str(timeout)], timeout=30).stdout,
                 "the legitimate client")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_syn_flood_beyond_capacity_answers_retransmissions(px: Proxied) -> None:
    """hping3 at full speed offers more SYNs than one worker answers. The worker sheds first
    attempts itself, before the kernel would drop the queue's overflow at random, and answers
    their retransmissions: every legitimate connection succeeds, some on its first retransmission
    (1 s), hardly any on its second (3 s, within the clients' 4 s), and the kernel hardly drops
    a SYN. (Left to the kernel, with --overload-backlog 0, it dropped 20-25% of this flood's SYNs,
    retransmissions included; in the flood benchmark 1-4 of about 300 legitimate connections
    failed per run, none in two runs of this test.) With clients that gave up after 3 s, before
    their second retransmission, one CI run failed 1 of 255: a spoofed SYN had taken its
    retransmission's answer (RetryMemory had one bit a key then) or the kernel dropped it."""
    m0, syns0 = px.metrics(), px.server_syns()
    results = connects_during_full_speed_flood(px, "client3", 12, 6, timeout=4)
    m1 = px.metrics()

    def delta(name: str) -> float:
        return m1[name] - m0.get(name, 0)

    failed = [r for r in results if not r["ok"]]
    retried = [r for r in results if r["ok"] and r["connect_ms"] >= 900]
    twice = [r for r in retried if r["connect_ms"] >= 2900]  # on the second retransmission
    shed = delta('synproxy_shed_total{reason="overload"}')
    overflow = delta('synproxy_nfqueue_dropped_total{cause="queue_full",queue="syn"}')
    syns = delta("synproxy_syn_received_total")
    summary = dict(attempts=len(results), failed=failed, retried=len(retried), twice=len(twice), shed=shed,
                   overflow=overflow, syns=syns, retries_answered=delta("synproxy_syn_retries_answered_total"))
    assert len(results) >= 200 and not failed, summary
    assert len(twice) <= 0.01 * len(results), summary
    assert shed > 0.05 * syns, summary  # it was beyond capacity, and the worker shed
    assert retried and delta("synproxy_syn_retries_answered_total") >= len(retried), summary
    assert overflow < 0.01 * syns, summary  # the kernel hardly had to drop any
    px.assert_only_validated_crossed(m0, syns0)


def fail_open_flood(p: Proxied, *extra: str) -> dict[str, float]:
    """A full-speed flood against a worker started with --queue-bypass (and `extra`): SYNs it
    handled and shed, SYNs that crossed to the server without it, legitimate connections."""
    p.start_proxy("--queue-bypass", *extra)
    try:
        p.count_server_syns()
        m0, syns0 = p.metrics(), p.server_syns()
        results = connects_during_full_speed_flood(p, "client2", 12, 5)
        m1 = p.metrics()
        key = 'synproxy_packets_sent_total{kind="syn"}'
        crossed = p.server_syns() - syns0 - (m1.get(key, 0) - m0.get(key, 0))
        syns = m1["synproxy_syn_received_total"] - m0["synproxy_syn_received_total"]
        shed_key = 'synproxy_shed_total{reason="overload"}'
        return dict(crossed=crossed, syns=syns, shed=m1.get(shed_key, 0) - m0.get(shed_key, 0),
                    crossed_share=crossed / (crossed + syns), attempts=len(results),
                    failed=sum(not r["ok"] for r in results))
    finally:
        p.stop_proxy()


def test_fail_open_syn_flood_beyond_capacity_is_shed_not_passed() -> None:
    """--queue-bypass passes what does not fit a full queue to the server, unprotected, and the kernel
    counts no drop. A full SYN queue must start the worker's shedding as a drop would, and then, as
    an overflow crosses rather than drops, the worker sheds every full batch with a SYN behind it,
    so the queue stays far from full. Measured against the same flood with shedding off: on this VM
    0.1-2.1% of the SYNs crossed in six runs and no legitimate connection failed, against 66-73%
    and 83-134 of ~220 (0 in nine runs since the queue has room for 4,096 SYNs while shedding);
    but in a seventh (a CI run) 54% crossed against 73%: beyond what the
    worker sheds, crossed SYNs make the server's own stack (on the same two cores) answer them,
    which leaves the worker less CPU still. So the test asks what holds in every run: shedding
    starts on a full queue, and less crosses and no more legitimate connections fail than with
    it off. A legitimate SYN that crosses gets the server's own SYN-ACK, whose ACK the proxy
    drops: its connection fails."""
    with proxied("local", clients=2, start=False) as p:
        reference = fail_open_flood(p, "--overload-backlog", "0")
        shedding = fail_open_flood(p)
        summary = dict(shedding=shedding, reference=reference)
        assert shedding["shed"] > 0.05 * shedding["syns"] and reference["shed"] == 0, summary
        assert shedding["crossed_share"] < reference["crossed_share"], summary
        assert shedding["attempts"] >= 150 and shedding["failed"] <= reference["failed"], summary

HOLD_OPEN = (
    "import json,socket,sys\n"
    "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=30)\n"
    "s.sendall(b'first')\n"
    "print(json.dumps({'port':s.getsockname()[1]}),flush=True)\n"
) + FINISH_ON_CUE

# Sent to the router's MAC address: the clients share a subnet, so routing by address would
# deliver the packet straight to the client, past the router.
SPOOF_SERVER = (
    "import sys\n"
    "from scapy.all import IP,IPv6,TCP,Ether,getmacbyip,getmacbyip6,sendp\n"
    "server,client,router,sport,cport=sys.argv[1],sys.argv[2],sys.argv[3],int(sys.argv[4]),int(sys.argv[5])\n"
    "v6=':' in server\n"
    "mac=(getmacbyip6 if v6 else getmacbyip)(router)\n"
    "assert mac,'no MAC address for the router'\n"
    "ip=(IPv6 if v6 else IP)(src=server,dst=client)\n"
    "for flags in ('R','RA','FA','A'):\n"
    "  sendp(Ether(dst=mac)/ip/TCP(sport=sport,dport=cport,flags=flags,seq=1,ack=1),iface='eth0',verbose=False)\n"
)
ROUTER = {4: "198.18.0.1", 6: "fd53:5059::1"}  # the router's address on the clients' link (synproxy.lab)


def test_gateway_packets_spoofed_as_the_server_from_outside_are_dropped() -> None:
    """In gateway mode the proxy takes packets from a protected port as the server's. An outside host
    that sends them with the server's address (here RST, FIN and ACK toward a client's open
    connection, IPv4 and IPv6) must not reach the proxy: the rules drop packets from a protected port
    that arrive where the route to their source does not lead (rpfilter). Before, its RST ended the
    proxy's state for the connection within the 10 s linger, and the client's data after that was
    never answered."""
    with proxied("gateway", clients=2) as p:
        victims = {family: p.lab.popen("client", [PYTHON, "-c", HOLD_OPEN, p.server_addr(family), "9000"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                   for family in (4, 6)}
        try:
            ports = {}
            for family, victim in victims.items():
                assert victim.stdout is not None
                ports[family] = json.loads(victim.stdout.readline())["port"]
            before = p.metrics()
            for family, cport in ports.items():
                p.lab.run("client2", [PYTHON, "-c", SPOOF_SERVER, p.server_addr(family), p.lab.addr("client", family),
                                      ROUTER[family], "9000", str(cport)])
            time.sleep(11)  # past the closing linger
            after = p.metrics()
            rst = 'synproxy_connections_closed_total{reason="rst"}'
            assert after[rst] == before[rst] and after['synproxy_connections{state="established"}'] == 2
            for victim in victims.values():
                assert finish_on_cue(victim) == "first-second"
        finally:
            for victim in victims.values():
                victim.kill()
                victim.wait(5)
