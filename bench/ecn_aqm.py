"""Benchmark (not a test): what ECN through the proxy is worth behind a congested link.

    sudo .venv/bin/python bench/ecn_aqm.py [--size 20000000] [--probability 0.005] [--runs 3]

The gateway lab, with an AQM toward the clients modelled in the router's mangle POSTROUTING (this
kernel has no fq_codel, codel, red or pie): it signals congestion on a fraction of the server's
packets, by a CE mark on an ECN-capable packet and by a drop on any other. Downloads go direct and
through synproxy, from a client that asks for ECN (net.ipv4.tcp_ecn=1) and from one that does not
(Linux's default, 2). Printed per download: throughput and the server's retransmitted segments
(every drop costs one; a CE mark costs none).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e import SERVER_PORT, Proxied, proxied  # noqa: E402


def model_aqm(px: Proxied, probability: float) -> None:
    for tool in ("iptables", "ip6tables"):
        base = ["-t", "mangle", "-A", "POSTROUTING", "-o", "eth0", "-p", "tcp", "--sport", str(SERVER_PORT)]
        signal = ["-m", "statistic", "--mode", "random", "--probability", str(probability)]
        px.lab.run("router", [tool, *base, "-m", "ecn", "!", "--ecn-ip-ect", "0", *signal,
                              "-j", "TOS", "--set-tos", "0x03/0x03"])
        px.lab.run("router", [tool, *base, "-m", "ecn", "--ecn-ip-ect", "0", *signal, "-j", "DROP"])


def downloads(px: Proxied, label: str, size: int, runs: int) -> None:
    for _ in range(runs):
        before = px.snmp("server")
        res = px.client("get", px.url(4, f"/bytes/{size}"), timeout=300)
        after = px.snmp("server")
        resent, sent = after["RetransSegs"] - before["RetransSegs"], after["OutSegs"] - before["OutSegs"]
        print(f"{label:36s} {size / float(res['total_s']) / 1e6:7.1f} MB/s   retransmitted {resent:5d} "
              f"of {sent:6d} segments ({100 * resent / max(sent, 1):.2f}%)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20_000_000, help="bytes per download")
    ap.add_argument("--probability", type=float, default=0.005, help="share of packets the AQM signals on")
    ap.add_argument("--runs", type=int, default=3, help="downloads per row")
    args = ap.parse_args()
    with proxied("gateway", start=False) as px:
        model_aqm(px, args.probability)
        for asks, sysctl in (("asks for ECN", "1"), ("does not ask", "2")):
            px.lab.sysctl("client", "net.ipv4.tcp_ecn", sysctl)
            downloads(px, f"direct, client {asks}", args.size, args.runs)
            px.start_proxy()
            downloads(px, f"synproxy, client {asks}", args.size, args.runs)
            px.stop_proxy()


if __name__ == "__main__":
    main()
