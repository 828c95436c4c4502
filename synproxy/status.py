"""`synproxy status` and `synproxy probe`: read a running daemon, or a server, for the operator."""

from __future__ import annotations

import socket
import struct
import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(addr: str, timeout: float = 3.0) -> Samples:
    """All samples of one exporter, keyed by (name, sorted labels)."""
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=timeout).read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of a metric over the label sets matching `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, lbl), v in samples.items():
        if n == name:
            key = dict(lbl).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def worker_addrs(addr: str, limit: int = 64) -> list[str]:
    """The exporter of worker 0 and those of further workers (PORT+1, ...) that answer."""
    host, _, port = addr.rpartition(":")
    found = []
    for i in range(limit):
        candidate = f"{host}:{int(port) + i}"
        try:
            with socket.create_connection((host.strip("[]"), int(port) + i), timeout=0.5):
                found.append(candidate)
        except OSError:
            break
    return found


def summary(before: Samples, after: Samples, seconds: float, workers: int) -> str:
    """A readable account of what the proxy did between two scrapes."""
    def rate(name: str, **labels: str) -> float:
        return (total(after, name, **labels) - total(before, name, **labels)) / seconds

    def per_label(name: str, label: str) -> list[str]:
        """'value X/s (N total)' for each label value with a non-zero total."""
        now, then = by_label(after, name, label), by_label(before, name, label)
        return [f"{k} {(v - then.get(k, 0.0)) / seconds:,.0f}/s ({v:,.0f} total)" for k, v in sorted(now.items()) if v]

    def queue(role: str) -> str:
        drops = rate("synproxy_nfqueue_dropped_total", queue=role)
        line = (f"  {role + ' queue':15s} waiting {total(after, 'synproxy_nfqueue_waiting', queue=role):,.0f}, "
                f"kernel drops {drops:,.0f}/s ({total(after, 'synproxy_nfqueue_dropped_total', queue=role):,.0f} total)")
        if drops and role == "syn":
            line += ": more SYNs than the workers answer (add workers or cores)"
        elif drops:
            line += ": established traffic is being lost"
        return line

    syn, valid = rate("synproxy_syn_received_total"), rate("synproxy_ack_valid_total")
    handshakes = by_label(after, "synproxy_backend_handshakes_total", "outcome")
    version = next((dict(lbl).get("version", "?") for (n, lbl) in after if n == "synproxy_build_info"), "?")
    lines = [
        f"synproxy {version}: {workers} worker(s) answering",
        f"  SYNs            {syn:10,.0f}/s   (SYN-ACKs {rate('synproxy_synack_sent_total'):,.0f}/s)",
        f"  valid ACKs      {valid:10,.0f}/s   (invalid {rate('synproxy_ack_invalid_total'):,.0f}/s)",
        f"  connections     pending {total(after, 'synproxy_connections', state='pending'):.0f}, "
        f"established {total(after, 'synproxy_connections', state='established'):.0f}, "
        f"closing {total(after, 'synproxy_connections', state='closing'):.0f}",
        "  server handshakes " + (", ".join(f"{k} {v:,.0f}" for k, v in sorted(handshakes.items())) or "none yet"),
        "  shed            " + (", ".join(per_label("synproxy_shed_total", "reason")) or "nothing"),
        queue("syn"),
        queue("traffic"),
        f"  cookie key age  {max((v for (n, _), v in after.items() if n == 'synproxy_cookie_key_age_seconds'), default=0) / 3600:.1f} h",
    ]
    verdict = "under a SYN flood" if syn > 1000 and valid < 0.1 * syn else "normal"
    lines.insert(1, f"  state           {verdict}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ProbeResult:
    """What a server announced in its SYN-ACK, as the kernel negotiated it."""

    mss: int
    wscale: int | None
    sack: bool
    timestamps: bool
    connect_ms: float


def probe(host: str, port: int, timeout: float = 3.0) -> ProbeResult:
    """A real handshake with the server; TCP_INFO tells what it answered.

    The probe offers every option, so a missing one in the result is one the server refused.
    """
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        elapsed = (time.perf_counter() - start) * 1000
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    options, wscale = raw[5], raw[6]
    snd_mss = struct.unpack_from("=I", raw, 16)[0]
    ts = bool(options & 1)
    return ProbeResult(
        mss=snd_mss + (12 if ts else 0),  # snd_mss is the peer's MSS less the timestamp option
        wscale=(wscale & 0x0F) if options & 4 else None,
        sack=bool(options & 2),
        timestamps=ts,
        connect_ms=elapsed,
    )
