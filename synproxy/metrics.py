"""Prometheus metrics, read from the engine's and shell's counters at scrape time.

A custom collector costs nothing on the packet path: the hot path bumps plain
ints and the exporter turns them into metric families only when scraped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from .engine import Engine
from .limits import Shed
from .nfqueue import PROC_PATH, read_queue_status
from .shell import LatencyHistogram, ShellStats

def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


# Label values known in advance are exported at 0 from the start: a series that first
# appears at value N hides those N events from rate(), so a first burst of sheds would
# never reach an alert.
KNOWN_LABELS: dict[str, tuple[str, ...]] = {
    "synproxy_shed": tuple(shed.value for shed in Shed),
    "synproxy_backend_handshakes": ("established", "refused", "timeout", "aborted"),
    "synproxy_ack_invalid": ("cookie",),
    "synproxy_connections_closed": ("fin", "rst", "idle"),
    "synproxy_evictions": ("profiles", "advertised_wscale", "synack_plans", "shapes"),
    "synproxy_client_resets": ("exact", "in_window", "out_of_window", "refuted", "confirmed", "unanswered"),
    "synproxy_icmp_too_big": ("translated", "not_held", "not_proxied"),
    "synproxy_ecn_handshakes": ("negotiated", "refused"),
}


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=[label])
    merged = {key: 0 for key in KNOWN_LABELS.get(name, ())}
    merged.update(values)
    for key, val in sorted(merged.items()):
        fam.add_metric([key], val)
    return fam


def histogram_family(name: str, doc: str, hist: LatencyHistogram) -> HistogramMetricFamily:
    buckets = []
    acc = 0
    for bound, count in zip(hist.BOUNDS, hist.counts):
        acc += count
        buckets.append((repr(bound), acc))
    acc += hist.counts[-1]
    buckets.append(("+Inf", acc))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.total)


class SynproxyCollector(Collector):
    """Exports one worker's counters."""

    def __init__(
        self,
        engine: Engine,
        shell: ShellStats,
        queues: dict[str, int],
        key_age: Callable[[float], float],
        proc_path: Path = Path(PROC_PATH),
        workers: int = 1,
        key_file_ok: Callable[[], bool] = lambda: True,
    ) -> None:
        self.engine = engine
        self.key_file_ok = key_file_ok  # False: the key file is missing or unusable (the keys in use stay)
        self.workers = workers  # --workers: lets `synproxy status` name a worker that does not answer
        self.shell = shell
        self.queues = queues  # role ("traffic", "syn") -> NFQUEUE number
        self.key_age = key_age
        self.proc_path = proc_path

    def collect(self) -> Iterator[Metric]:
        st = self.engine.stats
        yield InfoMetricFamily("synproxy_build", "synproxy version", value={"version": __version__})
        yield GaugeMetricFamily("synproxy_workers", "Workers the daemon runs (--workers), each exporting on its own "
                                "port: metrics port + worker index", value=self.workers)
        yield _counter("synproxy_syn_received", "SYNs seen from clients", st.syn_received)
        yield _counter("synproxy_synack_sent", "Cookie SYN-ACKs sent to clients", st.synack_sent)
        yield _counter("synproxy_synack_resent", "SYN-ACKs sent again because no ACK had come (--synack-retries)",
                       st.synack_resent)
        yield _counter("synproxy_synack_resends_skipped", "Due SYN-ACK resends not sent: more unanswered SYN-ACKs "
                       "in a second than 64 plus twice the ACKs validated the second before (a spoofed trickle)",
                       st.synack_resends_skipped)
        yield _counter("synproxy_ack_valid", "Client ACKs whose cookie validated", st.ack_valid)
        yield _labelled("synproxy_ack_invalid", "Client ACKs without state whose cookie failed", "reason", st.ack_invalid)
        yield _labelled(
            "synproxy_backend_handshakes", "Handshakes with the protected server by outcome", "outcome",
            st.backend_handshakes,
        )
        yield _labelled("synproxy_shed", "Packets refused because a cap or rate limit was reached, or the proxy "
                        "was behind (overload)", "reason", st.shed)
        yield _counter("synproxy_syn_retries_answered", "SYNs let through while the proxy was behind because they "
                       "repeated a SYN it had shed (retransmissions; caps and rate limits still apply)",
                       st.retries_answered)
        yield _labelled("synproxy_icmp_too_big", "ICMP fragmentation-needed / packet-too-big messages to servers, "
                        "by outcome (translated: the quoted sequence number put back; not_held: no established "
                        "connection here, handed to the next worker or passed; not_proxied)", "outcome",
                        st.icmp_too_big)
        yield _labelled("synproxy_ecn_handshakes", "Server handshakes in which the proxy asked for ECN (it had agreed "
                        "ECN with the client), by outcome (refused: the server would not; that connection then "
                        "reaches the server without ECN and CE-marked packets are dropped)", "outcome", st.ecn)
        yield _labelled("synproxy_packets_dropped", "Queued packets the proxy dropped, by reason", "reason", st.dropped)
        yield _labelled("synproxy_malformed_packets", "Queued packets that did not parse", "reason", st.malformed)
        yield _counter("synproxy_packets_translated", "Packets of established connections rewritten", st.translated)
        yield _labelled("synproxy_connections_closed", "Established connections ended, by cause", "reason", st.closed)
        yield _labelled(
            "synproxy_client_resets", "Clients' RSTs on established connections, by where they fell in the window "
            "the server last announced (exact: closed; out_of_window: dropped, as the server would; in_window: passed "
            "on and the server probed), and what the probe found (refuted: the server kept the connection, so did the "
            "proxy; confirmed; unanswered: closed)", "kind", st.client_resets,
        )
        yield _labelled("synproxy_evictions", "Table entries evicted to stay within bounds", "table", st.evicted)
        yield _labelled("synproxy_packets_sent", "Packets the proxy made and sent, by kind", "kind", self.shell.sent)
        yield _labelled("synproxy_send_errors", "Raw socket send failures, by errno", "errno", self.shell.send_errors)
        yield _counter("synproxy_handler_errors", "Packets dropped because the engine raised", self.shell.handler_errors)
        yield _counter("synproxy_packets_queued", "Packets received from the queue", self.shell.packets)
        pending = GaugeMetricFamily("synproxy_connections", "Connections tracked, by state", labels=["state"])
        pending.add_metric(["pending"], self.engine.pending)
        pending.add_metric(["established"], self.engine.established)
        pending.add_metric(["closing"], len(self.engine.conns) - self.engine.pending - self.engine.established)
        yield pending
        yield GaugeMetricFamily(
            "synproxy_held_packets", "Client packets left in the traffic queue until their server handshake "
            f"completes (at most {Engine.MAX_HELD_PACKETS} a worker; beyond, held_limit drops)",
            value=self.engine.held_packets,
        )
        yield histogram_family(
            "synproxy_packet_handling_seconds", "Time to handle one queued packet", self.shell.handling
        )
        waiting = GaugeMetricFamily("synproxy_nfqueue_waiting", "Packets waiting in the NFQUEUE, by queue role",
                                    labels=["queue"])
        drops = CounterMetricFamily("synproxy_nfqueue_dropped", "Packets the kernel dropped, by queue role and cause",
                                    labels=["queue", "cause"])
        for role, number in self.queues.items():
            q = read_queue_status(number, self.proc_path)
            if q is not None:
                waiting.add_metric([role], q.waiting)
                drops.add_metric([role, "queue_full"], q.dropped_queue_full)
                drops.add_metric([role, "socket_full"], q.dropped_socket_full)
        yield waiting
        yield drops
        yield GaugeMetricFamily(
            "synproxy_cookie_key_age_seconds", "Age of the current cookie key", value=self.key_age(time.time())
        )
        yield GaugeMetricFamily(
            "synproxy_cookie_key_file_ok", "1 if the key file was readable and valid at the last look (once a "
            "second); 0: missing or unusable, the keys in use stay, rotations do not take, and a restart would "
            "make a new key (missing) or fail (unusable)",
            value=1.0 if self.key_file_ok() else 0.0,
        )


def serve(registry: CollectorRegistry, addr: str) -> None:
    """Start the HTTP exporter on HOST:PORT (IPv6 literal in brackets)."""
    from prometheus_client import start_http_server

    host, port = parse_addr(addr)
    start_http_server(port, addr=host, registry=registry)


def parse_addr(addr: str) -> tuple[str, int]:
    """A metrics address: '127.0.0.1:9531', '[::1]:9531' or ':9531' (127.0.0.1) -> (host, port)."""
    return parse_host_port(addr, "metrics address", default_host="127.0.0.1")


def parse_host_port(text: str, what: str, default_host: str | None = None) -> tuple[str, int]:
    """'192.0.2.7:443', 'example.org:443' or '[2001:db8::7]:443' -> (host, port); ValueError naming
    `what` otherwise. An IPv6 address must be in brackets: in 'fd00::2:80' the port cannot be told
    from the address. An empty host is `default_host`, where there is one."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    bare = (host[1:-1] if bracketed else host) or default_host
    if not sep or not bare or (":" in host and not bracketed) or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT (IPv6: [ADDR]:PORT), got {text!r}")
    return bare, int(port)
