"""Several workers on --queue-balance sharing one key file; a dead worker is restarted."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from synproxy import __version__, keys
from synproxy.cookie import CookieMaker
from synproxy.engine import Engine, EngineConfig

from .e2e import SYNPROXY, Proxied, during, eventually, proxied
from synproxy.packet import ACK

from .test_engine import C2S, T0, Flow, one

pytestmark = pytest.mark.e2e


def test_cookie_from_one_worker_validates_in_another(tmp_path: Path) -> None:
    """Two engines loading the same key file: a SYN-ACK from one, the ACK to the other."""
    path = tmp_path / "cookie.key"
    a = Engine(EngineConfig(ports=frozenset({80})), CookieMaker(keys.load_or_create(path, T0)))
    b = Engine(EngineConfig(ports=frozenset({80})), CookieMaker(keys.load_or_create(path, T0)))
    f = Flow()
    synack = one(a.handle(f.syn(), C2S, T0), "synack")
    out = b.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK, ts=(501, synack.options.ts[0])), C2S, T0 + 1)
    assert one(out, "syn").seq == f.client_isn


@pytest.fixture(scope="module")
def px2() -> Iterator[Proxied]:
    with proxied("local", clients=3, start=False) as px:
        px.start_proxy("--workers", "2")
        px.count_server_syns()
        yield px


def test_two_workers_share_the_flood_and_serve_clients(px2: Proxied) -> None:
    """Both workers answer a spoofed flood; clients on two other addresses connect while it runs,
    and only the SYNs the workers sent after validating a cookie reach the server."""
    sent_syn = 'synproxy_packets_sent_total{kind="syn"}'
    syns0 = px2.server_syns()
    sent0 = sum(px2.worker_metrics(i).get(sent_syn, 0) for i in (0, 1))
    flood = px2.lab.popen("client3", ["timeout", "10", "hping3", "-q", "-S", "-p", "8080", "--rand-source", "-i",
                                      "u100", "-c", "30000", px2.server_addr(4)])
    results = during(flood, lambda: [px2.client("many", px2.url(4, "/"), "--count", "30", "--concurrency", "5",
                                                host=client) for client in ("client", "client2")], "the clients")
    for res in results:
        assert res["ok"] == 30, res
    after = [px2.worker_metrics(i) for i in (0, 1)]
    answered = [m["synproxy_synack_sent_total"] for m in after]
    assert min(answered) > 500, answered  # random sources hash onto both queues
    sent = sum(m.get(sent_syn, 0) for m in after) - sent0
    assert px2.server_syns() - syns0 == sent >= 60, (px2.server_syns() - syns0, sent)


def proxy_pids(px: Proxied) -> set[int]:
    """synproxy processes in this lab's server namespace (pgrep alone would see other labs' too)."""
    mine = {int(p) for p in px.lab.run("server", ["ip", "netns", "pids", px.lab.netns("server")]).stdout.split()}
    found = px.lab.run("server", ["pgrep", "-f", "synproxy run"], check=False).stdout  # exit 1: none
    return mine & {int(p) for p in found.split()}


def test_dead_worker_is_restarted(px2: Proxied) -> None:
    pids = sorted(proxy_pids(px2))
    assert len(pids) >= 3  # supervisor + 2 workers
    victim = pids[-1]  # a worker (started after the supervisor)
    os.kill(victim, signal.SIGKILL)
    time.sleep(1.5)
    after = proxy_pids(px2)
    assert victim not in after and len(after) == len(pids)
    assert "restarting it" in px2.log()
    for client in ("client", "client2", "client3"):
        res = px2.client("many", px2.url(4, "/"), "--count", "10", "--concurrency", "2", host=client)
        assert res["ok"] == 10, res


def test_status_names_a_worker_that_does_not_answer(px2: Proxied) -> None:
    """Worker 0 stopped (SIGSTOP: alive, so not restarted, and its exporter hangs): status names it,
    reports worker 1, and exits 1. Before, it said no synproxy ran at that address."""
    listeners = px2.lab.run("server", ["ss", "-Htlnp", f"sport = :{px2.metrics_port}"]).stdout
    match = re.search(r"pid=(\d+)", listeners)
    assert match, listeners
    worker0 = int(match.group(1))
    addr = f"127.0.0.1:{px2.metrics_port}"
    os.kill(worker0, signal.SIGSTOP)
    try:
        res = px2.lab.run("server", [SYNPROXY, "status", "--metrics-addr", addr, "--interval", "0.2"], check=False)
    finally:
        os.kill(worker0, signal.SIGCONT)
    assert res.returncode == 1, res
    assert res.stdout.startswith(f"synproxy {__version__}: 1 of 2 workers answering; not worker 0 ({addr}): "), res
    res = px2.lab.run("server", [SYNPROXY, "status", "--metrics-addr", addr, "--interval", "0.2"])
    assert res.stdout.startswith(f"synproxy {__version__}: 2 worker(s) answering\n"), res.stdout


def test_workers_stop_with_a_killed_supervisor_and_run_starts_again() -> None:
    """A SIGKILLed supervisor takes its workers with it (they served on as orphans, holding the queues
    and metrics ports, so the next `synproxy run` could not start); the rules it left are taken over."""
    with proxied("local", start=False) as px:
        px.start_proxy("--workers", "2")
        assert px.proc is not None and len(proxy_pids(px)) == 3
        px.proc.kill()
        px.proc.wait(5)
        assert not eventually(lambda: proxy_pids(px), lambda pids: not pids, 5, interval=0.1)
        px.start_proxy("--workers", "2")
        res = px.client("many", px.url(4, "/"), "--count", "10", "--concurrency", "2")
        assert res["ok"] == 10, res
