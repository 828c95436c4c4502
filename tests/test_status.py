"""`synproxy status`: the summary from two scrapes (rates where rates matter, the operator's next step),
and which endpoints count as synproxy's workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from synproxy import __version__
from synproxy.metrics import SynproxyCollector
from synproxy.shell import ShellStats
from synproxy.status import Samples, Workers, label_workers, summary

from .test_engine import make_engine

SYNPROXY = str(Path(sys.executable).parent / "synproxy")


def answering(n: int) -> Workers:
    return Workers([f"127.0.0.1:{9531 + i}" for i in range(n)], [])


def scrape(syn: float, shed: float, syn_drops: float, traffic_drops: float = 0.0) -> Samples:
    return {
        ("synproxy_build_info", (("version", "9.9"),)): 1.0,
        ("synproxy_syn_received_total", ()): syn,
        ("synproxy_synack_sent_total", ()): syn - shed,
        ("synproxy_ack_valid_total", ()): 10.0,
        ("synproxy_shed_total", (("reason", "synack_rate_source"),)): shed,
        ("synproxy_shed_total", (("reason", "global_pending"),)): 0.0,
        ("synproxy_nfqueue_waiting", (("queue", "syn"),)): 900.0,
        ("synproxy_nfqueue_waiting", (("queue", "traffic"),)): 0.0,
        ("synproxy_nfqueue_dropped_total", (("cause", "queue_full"), ("queue", "syn"))): syn_drops,
        ("synproxy_nfqueue_dropped_total", (("cause", "socket_full"), ("queue", "syn"))): 0.0,
        ("synproxy_nfqueue_dropped_total", (("cause", "queue_full"), ("queue", "traffic"))): traffic_drops,
    }


def test_flood_beyond_capacity() -> None:
    text = summary(scrape(1_000_000, 5_000, 200_000), scrape(1_080_000, 6_000, 230_000), 2.0, answering(1))
    assert "state           under a SYN flood" in text
    assert "SYNs                40,000/s" in text
    assert "shed            synack_rate_source 500/s (6,000 total)" in text  # zero reasons left out
    assert ("syn queue       waiting 900, kernel drops 15,000/s (230,000 total): more SYNs than the workers "
            "answer (add workers or cores)") in text
    assert "traffic queue   waiting 0, kernel drops 0/s (0 total)" in text
    assert "established traffic is being lost" not in text


def test_flood_beyond_capacity_with_overload_shedding() -> None:
    """The worker sheds first attempts itself: status says what that means for clients."""
    before, after = scrape(1_000_000, 5_000, 0), scrape(1_080_000, 6_000, 0)
    before[("synproxy_shed_total", (("reason", "overload"),))] = 300_000.0
    after[("synproxy_shed_total", (("reason", "overload"),))] = 330_000.0
    before[("synproxy_syn_retries_answered_total", ())] = 4_000.0
    after[("synproxy_syn_retries_answered_total", ())] = 4_600.0
    text = summary(before, after, 2.0, answering(1))
    assert ("state           under a SYN flood, beyond capacity: first SYNs are shed, clients connect on a "
            "retransmission (300/s answered; add workers or cores)") in text
    assert "overload 15,000/s (330,000 total)" in text
    quiet = summary(scrape(1_000_000, 5_000, 0), scrape(1_080_000, 6_000, 0), 2.0, answering(1))
    assert "beyond capacity" not in quiet


def test_quiet_proxy_and_lost_traffic() -> None:
    text = summary(scrape(100, 0, 0, 5), scrape(110, 0, 0, 9), 1.0, answering(2))
    assert "2 worker(s) answering" in text and "state           normal" in text
    assert "shed            nothing" in text
    assert "syn queue       waiting 900, kernel drops 0/s (0 total)" in text
    assert "traffic queue   waiting 0, kernel drops 4/s (9 total): established traffic is being lost" in text


def test_a_restarted_worker_counts_from_zero_not_below_zero() -> None:
    """Worker 1 restarted between the scrapes (SIGKILL, the supervisor starts it again): its
    counters began again at 0. Each series grew by its own new value, before the workers are
    summed; the plain difference said SYNs -400,000/s here (-1,616/s in a lab run)."""
    before = label_workers([scrape(1_000_000, 5_000, 200_000), scrape(900_000, 4_000, 100_000)])
    after = label_workers([scrape(1_080_000, 6_000, 230_000), scrape(20_000, 1_000, 3_000)])
    text = summary(before, after, 2.0, answering(2))
    assert "-" not in text.replace("SYN-ACKs", ""), text
    # worker 0: +80,000 SYNs, +79,000 SYN-ACKs; worker 1: +20,000 and +19,000 since its restart
    # (a reset of the sums instead would say 550,000/s)
    assert "SYNs                50,000/s   (SYN-ACKs 49,000/s)" in text, text
    assert "shed            synack_rate_source 1,000/s (7,000 total)" in text, text
    assert "syn queue       waiting 1,800, kernel drops 16,500/s (233,000 total)" in text, text  # a gauge: summed


class Html(BaseHTTPRequestHandler):
    """Any web server that is not synproxy's exporter."""

    def do_GET(self) -> None:  # noqa: N802
        body = b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:  # quiet
        pass


def status(addr: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SYNPROXY, "status", "--metrics-addr", addr, "--interval", "0.2"], capture_output=True,
                          text=True, env=os.environ, timeout=60)


class WithoutWorkerCount(Collector):
    """An exporter of a synproxy from before synproxy_workers."""

    def __init__(self, inner: SynproxyCollector) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        return (fam for fam in self.inner.collect() if fam.name != "synproxy_workers")


def serve(kind: str, port: int, tmp: Path, workers: int) -> HTTPServer | None:
    """'s': a synproxy exporter (the real collector, of `workers` workers) on `port`; 'o': one from before
    synproxy_workers; 'h': an HTML page; '-': nothing (a worker down). OSError if the port is taken."""
    if kind == "-":
        return None
    if kind == "h":
        html = ThreadingHTTPServer(("127.0.0.1", port), Html)
        threading.Thread(target=html.serve_forever, daemon=True).start()
        return html
    proc = tmp / "nfnetlink_queue"
    proc.write_text("")
    registry = CollectorRegistry()
    collector = SynproxyCollector(make_engine(), ShellStats(), {"traffic": 0, "syn": 1}, lambda now: 1.0,
                                  proc_path=proc, workers=workers)
    registry.register(WithoutWorkerCount(collector) if kind == "o" else collector)
    return start_http_server(port, "127.0.0.1", registry)[0]


@contextmanager
def endpoints(kinds: str, tmp: Path, workers: int = 1) -> Iterator[int]:
    """One server per letter of `kinds` (see serve) on consecutive ports of 127.0.0.1; yields the first.
    The ports of '-' are bound without listening, so nothing else takes them meanwhile."""
    for _ in range(20):
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            first = free.getsockname()[1]
        servers: list[HTTPServer] = []
        holes: list[socket.socket] = []
        try:
            for port, kind in enumerate(kinds, first):
                server = serve(kind, port, tmp, workers)
                if server is None:
                    holes.append(socket.socket())
                    holes[-1].bind(("127.0.0.1", port))
                else:
                    servers.append(server)
            yield first
            return
        except OSError:
            if len(servers) + len(holes) == len(kinds):
                raise  # not a port taken: the test's own
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()
            for hole in holes:
                hole.close()
    raise RuntimeError(f"no {len(kinds)} consecutive free ports on 127.0.0.1")


def test_status_of_something_else_is_one_line(tmp_path: Path) -> None:
    with endpoints("h", tmp_path) as port:
        res = status(f"127.0.0.1:{port}")
    assert res.returncode == 1 and res.stdout == "", res
    assert res.stderr == (f"synproxy: 127.0.0.1:{port} is not a synproxy metrics endpoint: "
                          "its /metrics is not Prometheus text\n"), res.stderr


def test_status_with_nothing_there_is_one_line() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening
        addr = f"127.0.0.1:{closed.getsockname()[1]}"
        res = status(addr)
    assert res.returncode == 1
    assert res.stderr == (f"synproxy: no synproxy metrics at {addr}: "
                          "is `synproxy run` running with that --metrics-addr?\n"), res.stderr


@pytest.mark.parametrize("kinds, workers", [("sh", 1), ("ssh", 2), ("s", 1), ("ooh", 2)])
def test_only_synproxy_exporters_count_as_workers(tmp_path: Path, kinds: str, workers: int) -> None:
    """Workers serve PORT, PORT+1, ...; another service listening right after them is not one
    (an older synproxy, without synproxy_workers, is counted up to it)."""
    with endpoints(kinds, tmp_path, workers=kinds.count("s")) as port:
        res = status(f"127.0.0.1:{port}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"synproxy {__version__}: {workers} worker(s) answering\n"), res.stdout


@pytest.mark.parametrize("kinds, missing", [("-s", [0]), ("s-s", [1]), ("--s", [0, 1]), ("s-", [1])])
def test_a_worker_down_is_named_and_status_exits_1(tmp_path: Path, kinds: str, missing: list[int]) -> None:
    """Each worker exports how many there are, so one that does not answer is named, worker 0
    included (before, worker 0 down read as no synproxy at all, and a later one as fewer workers)."""
    with endpoints(kinds, tmp_path, workers=len(kinds)) as port:
        res = status(f"127.0.0.1:{port}")
    assert res.returncode == 1, res
    names = ", ".join(f"worker {i} (127.0.0.1:{port + i})" for i in missing)
    assert res.stdout.startswith(f"synproxy {__version__}: {len(kinds) - len(missing)} of {len(kinds)} workers "
                                 f"answering; not {names}: "), res.stdout
    assert "SYNs" in res.stdout  # the summary of the others follows


def test_held_client_data_is_shown_in_the_traffic_queue_line() -> None:
    """Packets held for server handshakes wait in the traffic queue: status says how many of its
    waiting packets they are, and says nothing while there are none."""
    before, after = scrape(100, 0, 0), scrape(110, 0, 0)
    after[("synproxy_nfqueue_waiting", (("queue", "traffic"),))] = 12.0
    after[("synproxy_held_packets", ())] = 9.0
    text = summary(before, after, 1.0, answering(1))
    assert ("traffic queue   waiting 12 (9 of them client data held for a server handshake), kernel drops "
            "0/s (0 total)") in text
    assert "held for" not in summary(before, scrape(110, 0, 0), 1.0, answering(1))
