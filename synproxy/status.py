"""`synproxy status` and `synproxy probe`: read a running daemon, or a server, for the operator."""

from __future__ import annotations

import http.client
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class NotSynproxy(Exception):
    """Something answers at a metrics address, but not synproxy's exporter."""


def scrape(addr: str, timeout: float = 3.0) -> Samples:
    """All samples of synproxy's exporter at ADDR, keyed by (name, sorted labels).

    Raises OSError when nothing answers there and NotSynproxy when something else does: an
    HTML page used to end `synproxy status` in the parser's traceback. synproxy_build_info is
    what every synproxy exports, and other exporters do not.
    """
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:
        raise NotSynproxy(f"{addr} is not a synproxy metrics endpoint: /metrics answered HTTP {err.code}") from None
    except http.client.HTTPException:
        raise NotSynproxy(f"{addr} is not a synproxy metrics endpoint: it does not answer in HTTP") from None
    out: Samples = {}
    try:
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    except ValueError:  # UnicodeDecodeError included
        raise NotSynproxy(f"{addr} is not a synproxy metrics endpoint: its /metrics is not Prometheus text") from None
    if not any(name == "synproxy_build_info" for name, _ in out):
        raise NotSynproxy(f"{addr} is not a synproxy metrics endpoint: its /metrics has no synproxy_build_info")
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


@dataclass(frozen=True)
class Workers:
    """The workers' exporters at a metrics address: worker i serves port + i."""

    answering: list[str]  # addresses whose exporter answered
    missing: list[tuple[int, str]]  # (index, address) of configured workers that did not answer


def _refused(err: OSError) -> bool:
    """Nothing listens there (urllib wraps the connect error in URLError)."""
    return isinstance(getattr(err, "reason", err), ConnectionRefusedError)


def find_workers(addr: str, limit: int = 64) -> Workers:
    """The workers' exporters at ADDR (worker 0), ADDR's port + 1, ...

    Each worker exports how many there are (synproxy_workers), so one that is down (dying
    and being restarted, its own systemd unit stopped) or hung is named, worker 0 included:
    when ADDR does not answer the following ports are tried, as long as nothing listens
    there. An exporter without that gauge (an older synproxy) counts workers up to the
    first port that does not serve synproxy's metrics.

    Raises what scrape() raises for ADDR itself when no worker answers.
    """
    host, _, port = addr.rpartition(":")

    def at(i: int) -> str:
        return f"{host}:{int(port) + i}"

    try:
        index, samples = 0, scrape(addr)
    except OSError as err:  # worker 0 down or hung; or no synproxy there at all
        for index in range(1, limit):
            try:
                samples = scrape(at(index))
                break
            except NotSynproxy:
                raise err from None
            except OSError as later:
                if not _refused(later):
                    raise err from None
        else:
            raise err from None
    configured = int(total(samples, "synproxy_workers"))
    answering, missing = [at(index)], [(i, at(i)) for i in range(index)]
    for i in range(index + 1, configured if configured else limit):
        try:
            scrape(at(i))
            answering.append(at(i))
        except (OSError, NotSynproxy):
            if not configured:
                break  # an older synproxy: whatever else listens there is not a worker
            missing.append((i, at(i)))
    return Workers(answering, missing)


def label_workers(per_worker: list[Samples]) -> Samples:
    """The samples of all workers in one, each series labelled with its worker's index.

    The label keeps the workers' series apart, so a counter reset in one is seen per series
    (see increases) before anything is summed.
    """
    return {(name, labels + (("worker", str(i)),)): value
            for i, samples in enumerate(per_worker) for (name, labels), value in samples.items()}


def increases(before: Samples, after: Samples) -> Samples:
    """How much each counter series (name ending in _total) grew between two scrapes.

    Prometheus's reset rule, per series: a value below the one before means the counter
    restarted from 0 (its worker restarted), so it grew by the value itself. The difference
    went negative there: `status --interval 4` across a SIGKILL of one of two workers said
    `SYNs -1,616/s`. A series new in `after` grew from 0. Gauges are left out.
    """
    out: Samples = {}
    for key, now in after.items():
        if key[0].endswith("_total"):
            then = before.get(key, 0.0)
            out[key] = now if now < then else now - then
    return out


def summary(before: Samples, after: Samples, seconds: float, workers: Workers) -> str:
    """A readable account of what the proxy did between two scrapes (by the workers answering)."""
    grown = increases(before, after)

    def rate(name: str, **labels: str) -> float:
        return total(grown, name, **labels) / seconds

    def per_label(name: str, label: str) -> list[str]:
        """'value X/s (N total)' for each label value with a non-zero total."""
        now, inc = by_label(after, name, label), by_label(grown, name, label)
        return [f"{k} {inc.get(k, 0.0) / seconds:,.0f}/s ({v:,.0f} total)" for k, v in sorted(now.items()) if v]

    def queue(role: str) -> str:
        drops = rate("synproxy_nfqueue_dropped_total", queue=role)
        held_packets = total(after, "synproxy_held_packets") if role == "traffic" else 0.0
        held = f" ({held_packets:,.0f} of them client data held for a server handshake)" if held_packets else ""
        line = (f"  {role + ' queue':15s} waiting {total(after, 'synproxy_nfqueue_waiting', queue=role):,.0f}{held}, "
                f"kernel drops {drops:,.0f}/s ({total(after, 'synproxy_nfqueue_dropped_total', queue=role):,.0f} total)")
        if drops and role == "syn":
            line += ": more SYNs than the workers answer (add workers or cores)"
        elif drops:
            line += ": established traffic is being lost"
        return line

    syn, valid = rate("synproxy_syn_received_total"), rate("synproxy_ack_valid_total")
    handshakes = by_label(after, "synproxy_backend_handshakes_total", "outcome")
    version = next((dict(lbl).get("version", "?") for (n, lbl) in after if n == "synproxy_build_info"), "?")
    answering = len(workers.answering)
    head = f"synproxy {version}: {answering} worker(s) answering"
    if workers.missing:
        head = (f"synproxy {version}: {answering} of {answering + len(workers.missing)} workers answering; not "
                + ", ".join(f"worker {i} ({addr})" for i, addr in workers.missing)
                + ": its share of new connections goes unanswered (a dying worker is restarted; see its log)")
    lines = [
        head,
        f"  SYNs            {syn:10,.0f}/s   (SYN-ACKs {rate('synproxy_synack_sent_total'):,.0f}/s)",
        f"  valid ACKs      {valid:10,.0f}/s   (invalid {rate('synproxy_ack_invalid_total'):,.0f}/s)",
        f"  connections     pending {total(after, 'synproxy_connections', state='pending'):.0f}, "
        f"established {total(after, 'synproxy_connections', state='established'):.0f}, "
        f"closing {total(after, 'synproxy_connections', state='closing'):.0f}",
        "  server handshakes " + (", ".join(f"{k} {v:,.0f}" for k, v in sorted(handshakes.items())) or "none yet"),
        "  shed            " + (", ".join(per_label("synproxy_shed_total", "reason")) or "nothing"),
        queue("syn"),
        queue("traffic"),
        f"  cookie key age  {max((v for (n, _), v in after.items() if n == 'synproxy_cookie_key_age_seconds'), default=0) / 3600:.1f} h"
        + ("; the key file is missing or unusable (see the log): rotations do not take, a restart would fail or "
           "make a new key"
           if any(n == "synproxy_cookie_key_file_ok" and not v for (n, _), v in after.items()) else ""),
    ]
    verdict = "under a SYN flood" if syn > 1000 and valid < 0.1 * syn else "normal"
    if rate("synproxy_shed_total", reason="overload"):
        verdict += (", beyond capacity: first SYNs are shed, clients connect on a retransmission "
                    f"({rate('synproxy_syn_retries_answered_total'):,.0f}/s answered; add workers or cores)")
    lines.insert(1, f"  state           {verdict}")
    return "\n".join(lines)


# linux/tcp.h; not in Python's socket module
TCP_REPAIR = 19
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1


@dataclass(frozen=True)
class ProbeResult:
    """What a server announced in its SYN-ACK, as the kernel negotiated it."""

    mss: int
    mss_exact: bool  # False: repair mode (CAP_NET_ADMIN) was refused, mss is the kernel's clamped send MSS
    wscale: int | None
    sack: bool
    timestamps: bool
    connect_ms: float


def announced_mss(sock: socket.socket) -> int | None:
    """The MSS option of the peer's SYN-ACK, or None when repair mode is refused (no CAP_NET_ADMIN).

    In repair mode TCP_MAXSEG reads tp->rx_opt.mss_clamp, which tcp_parse_options set from the
    SYN-ACK (lowered only by a TCP_MAXSEG of our own, and the probe sets none; 536 for IPv4 and
    1220 for IPv6 when the SYN-ACK carried no MSS). Outside repair mode it reads the send MSS,
    which is clamped. The socket leaves repair mode before it is closed: closed in repair mode it
    sends neither FIN nor RST and the server's end stays established.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    except OSError:
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    finally:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)  # no window probe: just the FIN
        except OSError:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF)  # kernels before TCP_REPAIR_OFF_NO_WP


@dataclass(frozen=True)
class OwnAddress:
    """The interface holding one of this host's own addresses, and the MSS it gives clients."""

    dev: str  # "?" when it could not be found
    mtu: int  # 0 when unknown
    mss: int  # MTU less the IP and TCP headers (40, IPv6 60); 0 when unknown


def own_address(host: str) -> OwnAddress | None:
    """HOST's interface if HOST is one of this host's own addresses, else None.

    A probe of such an address goes over lo, whose MTU (65,536) sets the MSS the server
    announces (65,495 over IPv4): clients on the network see the MSS of the interface
    they come in on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))  # only this host's own addresses can be bound
    except OSError:
        return None
    try:
        out = subprocess.run(["ip", "-o", "addr", "show", "to", host], capture_output=True, text=True,
                             timeout=5).stdout
        dev = out.split()[1]
        mtu = int(Path(f"/sys/class/net/{dev}/mtu").read_text())
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return OwnAddress("?", 0, 0)
    return OwnAddress(dev, mtu, mtu - (60 if family == socket.AF_INET6 else 40))


def probe(host: str, port: int, timeout: float = 3.0) -> ProbeResult:
    """A real handshake with the server; the SYN-ACK's MSS from repair mode, the rest from TCP_INFO.

    The probe offers every option, so a missing one in the result is one the server refused.
    Without CAP_NET_ADMIN the MSS is TCP_INFO's send MSS plus the timestamp option, which the
    kernel clamps to half the server's largest window: over lo 32,753 or 32,780 (measured) where
    the server announced 65,495.
    """
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        elapsed = (time.perf_counter() - start) * 1000
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        exact = announced_mss(sock)
    options, wscale = raw[5], raw[6]
    snd_mss = struct.unpack_from("=I", raw, 16)[0]
    ts = bool(options & 1)
    return ProbeResult(
        # snd_mss excludes the timestamp option; the announced MSS (mss_clamp) excludes no option
        mss=exact if exact is not None else snd_mss + (12 if ts else 0),
        mss_exact=exact is not None,
        wscale=(wscale & 0x0F) if options & 4 else None,
        sack=bool(options & 2),
        timestamps=ts,
        connect_ms=elapsed,
    )
