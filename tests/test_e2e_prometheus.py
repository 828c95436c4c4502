"""Prometheus (Debian's package) scrapes a real synproxy in the lab during a short flood: every
Grafana panel's query returns data through the HTTP API, and the alert rules load and evaluate."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .e2e import proxied
from .promql import REPO, instant_query, panel_queries

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float = 20) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="Debian's prometheus package is not installed")
def test_every_panel_has_data_during_a_flood() -> None:
    with proxied("gateway", clients=2, start=False, host_link=True) as px, tempfile.TemporaryDirectory() as tmp:
        metrics_port = 20000 + random.randrange(5000)
        px.metrics_port = metrics_port
        proxy_target = f"{px.lab.host_addr}:{metrics_port}"
        px.stop_proxy()
        px.start_proxy("--metrics-addr", proxy_target, "--synack-rate-per-source", "50")
        rules = Path(tmp) / "alerts.yml"
        shutil.copy(REPO / "grafana" / "alerts.yml", rules)
        conf = Path(tmp) / "prometheus.yml"
        conf.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: [{rules}]\n"
            "scrape_configs:\n  - job_name: synproxy\n"
            f"    static_configs:\n      - targets: ['{proxy_target}']\n"
        )
        web = f"127.0.0.1:{free_port()}"
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={conf}", f"--storage.tsdb.path={tmp}/data",
             f"--web.listen-address={web}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/prom.log", "wb"), start_new_session=True,
        )
        try:
            base = f"http://{web}"
            wait_http(f"{base}/-/ready")
            # Legitimate traffic and a bounded flood (random sources, plus one /24 that gets shed).
            px.client("many", px.url(4, "/"), "--count", "40", "--concurrency", "4")
            px.lab.run("client2", ["timeout", "10", "hping3", "-q", "-S", "-p", "8080", "--rand-source",
                                   "-i", "u200", "-c", "20000", px.server_addr(4)], check=False, timeout=20)
            px.client("synflood", px.server_addr(4), "8080", "--prefix", "198.18.77.0/24", "--count", "3000",
                      "--rate", "2000", host="client2", timeout=30)
            px.client("synflood", px.server_addr(4), "8080", "--prefix", "198.18.78.0/24", "--count", "2000",
                      "--rate", "2000", "--ack", host="client2", timeout=30)
            px.client("many", px.url(4, "/"), "--count", "40", "--concurrency", "4")
            time.sleep(4)  # a few more scrapes after the flood
            empty = []
            for q in panel_queries(instance_regex=".*"):
                if not instant_query(base, q.expr):
                    empty.append(f"{q.panel} [{q.ref}]: {q.expr}")
            assert not empty, "panels without data:\n" + "\n".join(empty)
            up = instant_query(base, 'up{job="synproxy"}')
            assert up and float(up[0]["value"][1]) == 1.0
            import json
            import urllib.request

            groups = json.load(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5))["data"]["groups"]
            assert groups, "no rule group loaded"
            bad = [r["name"] for g in groups for r in g["rules"] if r.get("health") not in ("ok", None)]
            assert not bad, f"rules failing to evaluate: {bad}"
        finally:
            prom.terminate()
            prom.wait(10)
