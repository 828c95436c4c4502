"""Flood benchmark (not a test): the same SYN flood against five defences, side by side.

    sudo .venv/bin/python bench/flood.py [--seconds 8] [--rates 5000,20000,100000,max]

Each run builds a fresh lab (legitimate client, attacker, server; local mode), floods the server
with spoofed SYNs from hping3 (bounded by count and time; "max" is hping3 --flood, its full speed) while the client starts a connection
every 20 ms (3 s timeout each; ~350 per row, so p99 is not just the second-slowest), and measures:
  offered/s   SYNs that reached the server host (a counter rule first in raw PREROUTING)
  SYN-ACK/s   SYN-ACKs that left it, whoever made them (a counter rule in mangle POSTROUTING)
  legit ok    legitimate connections completed within 3 s
  p50/p99     their connect latency
  CPU         synproxy: its processes' CPU time / wall time; kernel defences: softirq time
  per core    SYN-ACK/s divided by that CPU share: what one fully used core would answer
  sirq        softirq time / wall time on the whole machine, for every defence: receiving the
              flood (for synproxy up to the queue) and delivering the SYN-ACKs in the lab
  all/core    SYN-ACK/s divided by CPU + sirq for synproxy (its processes and the kernel work the
              flood causes), by sirq for the kernel's defences: the whole machine's cost
  RSS         synproxy's resident memory
Defences: unprotected (SYN cookies off, backlog 128), kernel syncookies (on, backlog 128),
kernel SYNPROXY (iptables SYNPROXY target), synproxy with 1 and 2 workers.
--ack-flood adds a second hping3 at the same pace from a third host: bare ACKs with random
numbers (bogus cookies) from random sources, which the proxy must read and check one by one.
--client-lane (an experiment, not a feature) sends the legitimate client's SYNs to synproxy's
traffic queue instead of the SYN queue, as a priority lane for known sources would: none of them
is shed, so what remains of p99 is the wait in the queues (see docs/results.md).
Timings are noisy on shared machines: compare rows of the same run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from synproxy.daemon import READY_LINE
from synproxy.lab import Lab

PORT = 8080
PY = sys.executable
SYNPROXY = str(Path(sys.executable).parent / "synproxy")
MAX_PACKETS = 5_000_000


@dataclass
class Row:
    defence: str
    rate: str
    offered: float = 0.0
    synacks: float = 0.0
    ok: int = 0
    attempts: int = 0
    p50: float | None = None
    p99: float | None = None
    cpu: float = 0.0  # % of a core: synproxy's processes, or softirq for the kernel's defences
    softirq: float = 0.0  # % of a core in softirq on the whole machine, for every defence
    rss_mb: float | None = None

    @property
    def all_cpu(self) -> float:
        """% of a core the defence costs the whole machine: softirq, plus synproxy's processes."""
        return self.cpu + self.softirq if self.defence.startswith("synproxy") else self.cpu


def _counter(lab: Lab, table: str, chain: str, match: list[str]) -> int:
    out = lab.run("server", ["iptables", "-t", table, "-L", chain, "-v", "-x", "-n"]).stdout
    for line in out.splitlines():
        if "spx-bench" in line:
            return int(line.split()[0])
    return 0


def _add_counters(lab: Lab) -> None:
    lab.run("server", ["iptables", "-t", "raw", "-I", "PREROUTING", "1", "-p", "tcp", "--dport", str(PORT),
                       "--syn", "-m", "comment", "--comment", "spx-bench"])
    lab.run("server", ["iptables", "-t", "mangle", "-I", "POSTROUTING", "1", "-p", "tcp", "--sport", str(PORT),
                       "--tcp-flags", "SYN,ACK", "SYN,ACK", "-m", "comment", "--comment", "spx-bench"])


def _proc_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _softirq() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[7]) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _pids(lab: Lab) -> list[int]:
    mine = set(map(int, lab.run("server", ["ip", "netns", "pids", lab.netns("server")]).stdout.split()))
    out = subprocess.run(["pgrep", "-f", "synproxy run"], capture_output=True, text=True).stdout.split()
    return sorted(mine & set(map(int, out)))


def client_lane(lab: Lab) -> None:
    """--client-lane: the legitimate client's SYNs to the first traffic queue (0), just ahead of
    the rule that sends SYNs to their own queue (or queues: --queue-balance with 2 workers). A
    worker answers any SYN statelessly, so the one that reads it need not be the connection's."""
    rules = lab.run("server", ["iptables", "-t", "raw", "-S", "SYNPROXY_PY_PRE"]).stdout.splitlines()[1:]
    at = next(i for i, rule in enumerate(rules, 1) if "--tcp-flags FIN,SYN,RST,ACK SYN" in rule and "NFQUEUE" in rule)
    lab.run("server", ["iptables", "-t", "raw", "-I", "SYNPROXY_PY_PRE", str(at), "-s", lab.addr("client"),
                       "-p", "tcp", "--syn", "--dport", str(PORT), "-j", "NFQUEUE", "--queue-num", "0"])


def setup(lab: Lab, defence: str, tmp: str) -> subprocess.Popen[bytes] | None:
    """Configure the server namespace for one defence; returns the synproxy process if any."""
    for key, value in (("net.ipv4.tcp_max_syn_backlog", "128"), ("net.core.somaxconn", "128"),
                       ("net.ipv4.tcp_synack_retries", "2")):
        lab.sysctl("server", key, value)
    lab.sysctl("server", "net.ipv4.tcp_syncookies", "1" if defence in ("kernel syncookies", "kernel SYNPROXY") else "0")
    if defence == "kernel SYNPROXY":
        lab.sysctl("server", "net.netfilter.nf_conntrack_tcp_loose", "0")
        for rule in (
            ["-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", str(PORT), "--syn", "-j", "CT", "--notrack"],
            ["-A", "INPUT", "-p", "tcp", "--dport", str(PORT), "-m", "conntrack", "--ctstate", "INVALID,UNTRACKED",
             "-j", "SYNPROXY", "--sack-perm", "--timestamp", "--wscale", "7", "--mss", "1460"],
            ["-A", "INPUT", "-p", "tcp", "--dport", str(PORT), "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
        ):
            lab.run("server", ["iptables", *rule])
        return None
    if defence.startswith("synproxy"):
        workers = defence.split()[1]
        proc = lab.popen("server", [SYNPROXY, "run", "--port", str(PORT), "--workers", workers,
                                    "--key-file", f"{tmp}/cookie.key", "--metrics-addr", "off"],
                         stdout=open(f"{tmp}/proxy.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = Path(f"{tmp}/proxy.log").read_text()
            if READY_LINE in text:
                time.sleep(0.5)
                return proc
            time.sleep(0.1)
        raise RuntimeError(Path(f"{tmp}/proxy.log").read_text())
    return None


def measure(defence: str, rate: str, seconds: float, ack_flood: bool = False, lane: bool = False) -> Row:
    row = Row(defence, rate)
    with Lab(mode="local", clients=3) as lab, tempfile.TemporaryDirectory() as tmp:
        lab.popen("server", [PY, "-m", "synproxy.peers", "server", "--port", str(PORT)])
        time.sleep(0.5)
        setup(lab, defence, tmp)
        if lane and defence.startswith("synproxy"):
            client_lane(lab)
        _add_counters(lab)  # first in their chains, after any rules the defence installed
        pids = _pids(lab)
        url = f"http://{lab.addr('server')}:{PORT}/"
        pace = ["--flood"] if rate == "max" else ["-i", f"u{max(1, 1_000_000 // int(rate))}"]
        cpu0, soft0, t0 = _proc_cpu(pids), _softirq(), time.monotonic()
        off0, sa0 = _counter(lab, "raw", "PREROUTING", []), _counter(lab, "mangle", "POSTROUTING", [])
        floods = [lab.popen(host, ["timeout", str(seconds), "hping3", "-q", flag, "-p", str(PORT),
                                   "--rand-source", *pace, "-c", str(MAX_PACKETS), lab.addr("server")])
                  for host, flag in (("client2", "-S"), ("client3", "-A"))[:2 if ack_flood else 1]]
        time.sleep(0.5)
        out = lab.run("client", [PY, "-m", "synproxy.peers", "loop", url, "--seconds", str(seconds - 1),
                                 "--interval", "0.02", "--timeout", "3"], timeout=seconds + 30).stdout
        for flood in floods:
            flood.wait(seconds + 10)
        wall = time.monotonic() - t0
        row.offered = (_counter(lab, "raw", "PREROUTING", []) - off0) / wall
        row.synacks = (_counter(lab, "mangle", "POSTROUTING", []) - sa0) / wall
        row.softirq = 100 * (_softirq() - soft0) / wall
        if pids:
            row.cpu = 100 * (_proc_cpu(pids) - cpu0) / wall
            row.rss_mb = _rss_mb(pids)
        else:
            row.cpu = row.softirq
        results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        lat = sorted(r["connect_ms"] for r in results if r["ok"])
        row.attempts, row.ok = len(results), len(lat)
        if lat:
            row.p50 = statistics.median(lat)
            row.p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return row


def table(rows: list[Row]) -> str:
    head = f"{'defence':20s} {'flood':>7s} {'offered/s':>10s} {'SYN-ACK/s':>10s} {'legit ok':>14s} " \
           f"{'p50 ms':>8s} {'p99 ms':>8s} {'CPU %':>6s} {'per core':>9s} {'sirq %':>6s} {'all/core':>9s} " \
           f"{'RSS MB':>7s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        pct = 100 * r.ok / r.attempts if r.attempts else 0
        lines.append(
            f"{r.defence:20s} {r.rate:>7s} {r.offered:10,.0f} {r.synacks:10,.0f} "
            f"{f'{r.ok}/{r.attempts} ({pct:.1f}%)':>14s} "
            f"{'-' if r.p50 is None else f'{r.p50:.1f}':>8s} {'-' if r.p99 is None else f'{r.p99:.1f}':>8s} "
            f"{r.cpu:6.0f} {f'{100 * r.synacks / r.cpu:,.0f}' if r.cpu >= 1 else '-':>9s} "
            f"{r.softirq:6.0f} {f'{100 * r.synacks / r.all_cpu:,.0f}' if r.all_cpu >= 1 else '-':>9s} "
            f"{'-' if r.rss_mb is None else f'{r.rss_mb:.0f}':>7s}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rates", default="5000,20000,100000,max",
                    help="comma separated SYN/s (hping3 pacing), or max (hping3 --flood)")
    ap.add_argument("--defences", default="unprotected,kernel syncookies,kernel SYNPROXY,synproxy 1,synproxy 2")
    ap.add_argument("--ack-flood", action="store_true",
                    help="also flood bare ACKs with bogus cookies at the same pace, from another host")
    ap.add_argument("--client-lane", action="store_true",
                    help="experiment: the legitimate client's SYNs skip synproxy's SYN queue (its traffic queue)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/flood.py builds network namespaces: run it as root")
    rows = []
    for rate in args.rates.split(","):
        for defence in args.defences.split(","):
            print(f"  {defence} at {rate} SYN/s{' and ACK/s' if args.ack_flood else ''} ...", file=sys.stderr, flush=True)
            rows.append(measure(defence, rate, args.seconds, args.ack_flood, args.client_lane))
    print(table(rows))
    print("\n(synproxy N = N worker processes; CPU: synproxy processes, or softirq for kernel defences; "
          "the flood generator runs on the same 2-core machine)")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
