"""`synproxy demo`: a SYN flood against a legacy server, unprotected and then behind synproxy.

The lab (network namespaces, torn down on exit or Ctrl-C):

    client  ──┐
              ├── switch ── router (synproxy runs here) ── legacy server
    attacker ─┘

The legacy server is deliberately ordinary and weak: kernel SYN cookies off,
a SYN backlog of 128, a plain HTTP server. The attacker floods it with spoofed
SYNs (hping3, bounded in count and time) while the client keeps connecting;
the same run is then repeated with synproxy in front of the server.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

from .daemon import READY_LINE
from .lab import Lab

PORT = 8080
METRICS_PORT = 9531
FLOOD_MAX_PACKETS = 20_000_000  # upper bound whatever the duration


@dataclass
class Phase:
    """What one run of the flood measured."""

    name: str
    attempts: int = 0
    ok: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    syn_recv_max: int = 0
    syns_answered: int | None = None
    flood_seconds: float = 0.0
    flood_sent: int = 0  # packets the attacker's interface sent: hping3's pacing is coarse

    @property
    def flood_rate(self) -> str:
        return f"{self.flood_sent / self.flood_seconds:,.0f}" if self.flood_seconds else "-"

    @property
    def success(self) -> str:
        pct = 100.0 * self.ok / self.attempts if self.attempts else 0.0
        return f"{self.ok}/{self.attempts} ({pct:.0f}%)"

    def pct(self, q: float) -> str:
        if not self.latencies_ms:
            return "-"
        lat = sorted(self.latencies_ms)
        return f"{lat[min(len(lat) - 1, int(len(lat) * q))]:.1f}"


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


class Demo:
    def __init__(self, seconds: float, echo: Callable[[str], None], hold: bool = False, rate: int = 20000) -> None:
        self.seconds = seconds
        self.rate = rate
        self.echo = echo
        self.hold = hold
        self.python = sys.executable
        self.synproxy = str(Path(sys.executable).parent / "synproxy")

    def run(self) -> tuple[Phase, Phase]:
        self.echo("building the lab: client, attacker, router, legacy server (network namespaces)")
        with Lab(mode="gateway", clients=2, host_link=True) as lab, TemporaryDirectory() as tmp:
            # tcp_synack_retries=1: half-open sockets die in seconds, so the second phase
            # starts from a clean server instead of the first phase's leftovers.
            for key, value in (("net.ipv4.tcp_syncookies", "0"), ("net.ipv4.tcp_max_syn_backlog", "128"),
                               ("net.core.somaxconn", "128"), ("net.ipv4.tcp_synack_retries", "1")):
                lab.sysctl("server", key, value)
            lab.popen("server", [self.python, "-m", "synproxy.peers", "server", "--port", str(PORT)])
            time.sleep(0.5)
            url = f"http://{lab.addr('server')}:{PORT}/"
            self.echo(f"legacy server: {url} (kernel SYN cookies off, SYN backlog 128)")
            plain = self.phase(lab, "unprotected", url)
            self.echo("")
            self._drain(lab)
            metrics_url = f"http://{lab.host_addr}:{METRICS_PORT}/metrics"
            log = Path(tmp) / "synproxy.log"
            proxy = lab.popen(
                "router",
                [self.synproxy, "run", "--port", str(PORT), "--mode", "gateway", "--queue", "0",
                 "--key-file", str(Path(tmp) / "cookie.key"), "--metrics-addr", f"{lab.host_addr}:{METRICS_PORT}"],
                stdout=log.open("wb"), stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 15
            while READY_LINE not in log.read_text() and time.monotonic() < deadline:
                if proxy.poll() is not None:
                    raise RuntimeError(f"synproxy failed to start:\n{log.read_text()}")
                time.sleep(0.1)
            self.echo(f"synproxy runs on the router; its metrics: {metrics_url}")
            guarded = self.phase(lab, "synproxy", url, metrics_url)
            self.summary(plain, guarded)
            if self.hold:
                self.echo(f"\nthe lab stays up; metrics at {metrics_url}. Ctrl-C tears it down.")
                while proxy.poll() is None:
                    time.sleep(1)
            return plain, guarded

    def phase(self, lab: Lab, name: str, url: str, metrics_url: str | None = None) -> Phase:
        """Flood for `seconds` while the client connects every 100 ms; report every second."""
        result = Phase(name)
        before = self._answered(metrics_url)
        interval = "u1" if self.rate <= 0 else f"u{max(1, 1_000_000 // self.rate)}"
        shown = ("as fast as hping3 can" if self.rate <= 0
                 else f"paced for {self.rate:,} SYN/s (hping3 sends fewer: the table counts them)")
        self.echo(f"[{name}] the attacker floods the server with spoofed SYNs {shown} for {self.seconds:.0f} s; "
                  "the client connects every 100 ms (3 s timeout each)")
        sent0 = self._sent(lab)
        flood = lab.popen("client2", [
            "timeout", str(self.seconds), "hping3", "-q", "-S", "-p", str(PORT), "--rand-source",
            "-i", interval, "-c", str(FLOOD_MAX_PACKETS), lab.addr("server"),
        ])
        start = time.monotonic()
        time.sleep(0.5)  # let the flood fill the backlog first
        prober = lab.popen(
            "client",
            [self.python, "-m", "synproxy.peers", "loop", url, "--seconds", str(max(1.0, self.seconds - 1)),
             "--interval", "0.1", "--timeout", "3"],
            stdout=subprocess.PIPE, text=True,
        )
        lines: list[dict[str, object]] = []
        reader = threading.Thread(target=lambda: [lines.append(json.loads(x)) for x in prober.stdout], daemon=True)  # type: ignore[union-attr]
        reader.start()
        while prober.poll() is None or reader.is_alive():
            time.sleep(1.0)
            syn_recv = self._syn_recv(lab)
            result.syn_recv_max = max(result.syn_recv_max, syn_recv)
            done = list(lines)
            ok = [d for d in done if d["ok"]]
            lat = [float(d["connect_ms"]) for d in ok]  # type: ignore[arg-type]
            p50 = f"{statistics.median(lat):6.1f} ms" if lat else "     - "
            self.echo(f"  [{name:11s}] t={time.monotonic() - start:4.1f}s  client: {len(ok):3d}/{len(done):3d} "
                      f"connected, p50 {p50}   server half-open (SYN-RECV): {syn_recv}")
            if prober.poll() is not None and not reader.is_alive():
                break
        flood.wait()
        result.flood_seconds = time.monotonic() - start
        result.flood_sent = self._sent(lab) - sent0
        result.attempts = len(lines)
        result.ok = sum(1 for d in lines if d["ok"])
        result.latencies_ms = [float(d["connect_ms"]) for d in lines if d["ok"]]  # type: ignore[arg-type]
        after = self._answered(metrics_url)
        if before is not None and after is not None:
            result.syns_answered = int(after - before)
        return result

    def _drain(self, lab: Lab) -> None:
        """Wait (at most 15 s) for the unprotected phase's half-open sockets to expire."""
        deadline = time.monotonic() + 15
        while self._syn_recv(lab) and time.monotonic() < deadline:
            time.sleep(0.5)

    def _sent(self, lab: Lab) -> int:
        """Packets the attacker's host has sent (its only traffic is the flood)."""
        return int(lab.run("client2", ["cat", "/sys/class/net/eth0/statistics/tx_packets"]).stdout)

    def _syn_recv(self, lab: Lab) -> int:
        out = lab.run("server", ["ss", "-Htan", "state", "syn-recv"], check=False).stdout
        return sum(1 for line in out.splitlines() if line.strip())

    def _answered(self, metrics_url: str | None) -> float | None:
        if metrics_url is None:
            return None
        import urllib.request

        try:
            text = urllib.request.urlopen(metrics_url, timeout=3).read().decode()
        except OSError:
            return None
        return _metric(text, "synproxy_synack_sent_total")

    def summary(self, plain: Phase, guarded: Phase) -> None:
        rows = [
            ("spoofed SYNs sent per second", plain.flood_rate, guarded.flood_rate),
            ("legitimate connections", plain.success, guarded.success),
            ("connect p50 (ms)", plain.pct(0.5), guarded.pct(0.5)),
            ("connect p99 (ms)", plain.pct(0.99), guarded.pct(0.99)),
            ("server half-open sockets (max)", str(plain.syn_recv_max), str(guarded.syn_recv_max)),
            ("cookie SYN-ACKs sent by synproxy", "-", f"{guarded.syns_answered:,}" if guarded.syns_answered else "-"),
        ]
        self.echo("")
        self.echo(f"{'':34s}{'unprotected':>18s}{'behind synproxy':>18s}")
        for label, a, b in rows:
            self.echo(f"{label:34s}{a:>18s}{b:>18s}")


def run_demo(seconds: float, echo: Callable[[str], None], hold: bool = False, rate: int = 20000) -> tuple[Phase, Phase]:
    if os.geteuid() != 0:
        raise PermissionError("the demo builds network namespaces and needs root: run it with sudo")
    return Demo(seconds, echo, hold, rate).run()
