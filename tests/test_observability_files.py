"""Checks of the operator-facing files: Grafana dashboard and provisioning, Prometheus config,
alert rules and their unit tests, systemd units, sysctl and modules snippets, example config.

None needs a kernel feature. Tools (promtool, prometheus, systemd-analyze) are used where they
exist; a check is skipped, with the reason, only when its tool is absent. The last test runs a
real Prometheus against an exporter fed by an engine driven through a simulated flood and asks
every panel's query: the dashboard must show data, not "No data".
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from synproxy import cli
from synproxy.engine import Direction, Engine, Send
from synproxy.limits import LimitsConfig, Shed
from synproxy.metrics import SynproxyCollector
from synproxy import packet as P
from synproxy.packet import ACK, RST, SYN, TcpOptions
from synproxy.shell import ShellStats

from .e2e import synproxy_rules_in
from tests.promql import DASHBOARD, instant_query, iter_panels, metric_names, panel_queries
from tests.test_engine import T0, Flow, handshake, make_engine

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "grafana"
DEPLOY = REPO / "deploy"
C2S, S2C = Direction.FROM_CLIENT, Direction.FROM_SERVER

PROVISIONED_UID = "synproxy-prometheus"
REQUIRED_ALERTS = {
    "SynFloodDetected", "ProxySheddingLegitimateLoad", "NfqueueDrops", "CookieKeyTooOld",
    "BackendHandshakesFailing", "ProxyDown", "ProxyAtCapacity",
}


def tool(name: str) -> str:
    """The tool's path, or skip: these checks need the real tool, not an imitation."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install prometheus / systemd)")
    return path


def fake_proc(tmp: Path, queue: int = 0, waiting: int = 3, qfull: int = 7, sfull: int = 2) -> Path:
    """A /proc/net/netfilter/nfnetlink_queue with one line for `queue`."""
    path = tmp / "nfnetlink_queue"
    path.write_text(f"{queue:>5} 123456 {waiting:>5} 2  4016 {qfull:>5} {sfull:>5}  98765  1\n")
    return path


# ---------------------------------------------------------------- exported names


def exported_names(collector: Collector) -> set[str]:
    """Sample names the collector can produce, from its families' types (a labelled counter that
    has not counted yet has no samples but is still a name the dashboard may use)."""
    suffixes = {
        "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",),
        "gauge": ("",), "summary": ("_sum", "_count", ""),
    }
    names: set[str] = set()
    for fam in collector.collect():
        names.update(fam.name + s for s in suffixes[fam.type])
    return names


@pytest.fixture(scope="module")
def collector_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    proc = fake_proc(tmp_path_factory.mktemp("proc"))
    names = exported_names(SynproxyCollector(make_engine(), ShellStats(), {"traffic": 0, "syn": 1}, lambda now: 1.0, proc_path=proc))
    assert "synproxy_shed_total" in names and "synproxy_nfqueue_dropped_total" in names
    return names


# ---------------------------------------------------------------- dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in iter_panels(dashboard) if p.get("type") not in ("row", "text")]


def test_every_panel_has_a_query(dashboard: dict[str, Any]) -> None:
    panels = query_panels(dashboard)
    assert len(panels) >= 15
    for panel in panels:
        assert panel.get("targets"), f"panel {panel.get('title')!r} has no target"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} target {target.get('refId')} is empty"
            assert target.get("refId")
    ids = [p["id"] for p in iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_queries_use_only_exported_metrics(collector_names: set[str]) -> None:
    used: set[str] = set()
    for q in panel_queries():
        names = metric_names(q.expr)
        assert names, f"{q.panel}/{q.ref}: no metric in {q.expr!r}"
        unknown = names - collector_names
        assert not unknown, f"{q.panel}/{q.ref} uses {sorted(unknown)}, not exported by synproxy/metrics.py"
        used |= names
    # The metrics the brief's panels are about are all shown somewhere.
    for name in ("synproxy_syn_received_total", "synproxy_ack_valid_total", "synproxy_ack_invalid_total",
                 "synproxy_backend_handshakes_total", "synproxy_shed_total", "synproxy_connections",
                 "synproxy_packet_handling_seconds_bucket", "synproxy_nfqueue_waiting",
                 "synproxy_nfqueue_dropped_total", "synproxy_send_errors_total", "synproxy_cookie_key_age_seconds"):
        assert name in used, f"no panel shows {name}"


def test_every_selector_follows_the_instance_variable(dashboard: dict[str, Any]) -> None:
    """A panel that ignores the worker selector would show other workers' data."""
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for m in re.finditer(r"\bsynproxy_\w+", expr):
                rest = expr[m.end():]
                assert re.match(r'\{[^}]*instance=~"\$instance"', rest), (
                    f"{panel['title']}: {m.group(0)} is not filtered by instance=~\"$instance\" in {expr!r}")


def test_datasource_variable_is_consistent(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert ds["current"]["value"] == PROVISIONED_UID
    inst = variables["instance"]
    assert inst["type"] == "query" and inst["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert inst["includeAll"] and inst["multi"] and inst["allValue"] == ".*"
    assert "synproxy_build_info" in inst["definition"]
    for panel in query_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    provisioned = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert re.search(rf"^\s+uid:\s*{PROVISIONED_UID}\s*$", provisioned, re.M)
    assert re.search(r"^\s+type:\s*prometheus\s*$", provisioned, re.M)


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    """Grafana 10/11 loads it; the top row answers 'attack?' and 'legit clients through?'."""
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] == "synproxy" and dashboard.get("id") is None
    top = [p for p in dashboard["panels"] if p["gridPos"]["y"] == 0]
    assert len(top) >= 6 and all(p["type"] == "stat" for p in top)
    top_metrics = set().union(*(metric_names(t["expr"]) for p in top for t in p["targets"]))
    for name in ("synproxy_syn_received_total", "synproxy_ack_valid_total", "synproxy_backend_handshakes_total",
                 "synproxy_shed_total", "synproxy_nfqueue_dropped_total"):
        assert name in top_metrics, f"the top row does not show {name}"
    # No two panels overlap and all fit in Grafana's 24 columns.
    cells: dict[tuple[int, int], str] = {}
    for p in iter_panels(dashboard):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    provider = (GRAFANA / "provisioning" / "dashboards" / "synproxy.yml").read_text()
    assert re.search(r"^\s+type:\s*file\s*$", provider, re.M) and re.search(r"^\s+path:\s*/\S+", provider, re.M)


def test_panel_queries_parse_with_promtool(tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule): a syntax error fails here."""
    promtool = tool("promtool")
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, q in enumerate(panel_queries()):
        lines += [f"      - record: dashboard:panel_{i}", f"        expr: {json.dumps(q.expr)}"]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text("\n".join(lines) + "\n")
    res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- Prometheus config and rules


def test_promtool_check_config() -> None:
    res = subprocess.run([tool("promtool"), "check", "config", str(GRAFANA / "prometheus.yml")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout + res.stderr


def test_promtool_check_rules() -> None:
    res = subprocess.run([tool("promtool"), "check", "rules", str(GRAFANA / "alerts.yml")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules() -> None:
    """SynFloodDetected fires on a flood and not on heavy legitimate traffic, and so on."""
    res = subprocess.run([tool("promtool"), "test", "rules", str(GRAFANA / "alerts_test.yml")],
                         capture_output=True, text=True, cwd=GRAFANA)
    assert res.returncode == 0, res.stdout + res.stderr


def test_rule_expressions_use_only_exported_metrics(collector_names: set[str]) -> None:
    text = (GRAFANA / "alerts.yml").read_text()
    recorded = set(re.findall(r"^\s+- record:\s*(\S+)", text, re.M))
    alerts = set(re.findall(r"^\s+- alert:\s*(\S+)", text, re.M))
    assert REQUIRED_ALERTS <= alerts
    for raw in re.findall(r"expr:[ ]*(?:>-\n((?:[ ]{10}.*\n)+)|(.*)\n)", text):
        expr = " ".join((raw[0] or raw[1]).split())
        unknown = metric_names(expr) - collector_names - recorded - {"up"}
        assert not unknown, f"{expr!r} uses {sorted(unknown)}"
    assert text.count("severity:") >= len(alerts)


# ---------------------------------------------------------------- systemd units


UNITS = ("synproxy.service", "synproxy@.service", "synproxy-rules.service")


def unit_settings(name: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (systemd allows a key several times)."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on copies whose ExecStart points at this checkout's console script
    (it refuses a unit whose executable does not exist; /usr/local/bin/synproxy is the installer's).
    It exits 0 even for unknown keys and bad values ("ignoring"), so any output fails too."""
    analyze = tool("systemd-analyze")
    script = shutil.which("synproxy") or str(Path(sys.executable).parent / "synproxy")
    if not os.access(script, os.X_OK):
        pytest.skip("the synproxy console script is not installed (make install)")
    for name in UNITS:
        text = (DEPLOY / name).read_text()
        assert "/usr/local/bin/synproxy " in text
        (tmp_path / name).write_text(text.replace("/usr/local/bin/synproxy", script))
    args = [str(tmp_path / "synproxy.service"), str(tmp_path / "synproxy-rules.service"),
            str(tmp_path / "synproxy@0.service")]
    res = subprocess.run([analyze, "verify", *args], capture_output=True, text=True, cwd=tmp_path)
    if res.returncode != 0 and "Failed to" in res.stderr and "manager" in res.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {res.stderr.strip()}")
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


@pytest.mark.parametrize("name", ["synproxy.service", "synproxy@.service"])
def test_daemon_units_are_confined(name: str) -> None:
    s = unit_settings(name)
    expected = {
        "Type": "notify", "Restart": "on-failure", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "StateDirectory": "synproxy", "StateDirectoryMode": "0700", "ProtectHome": "yes", "PrivateTmp": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelTunables": "yes", "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes", "RestrictRealtime": "yes", "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "CAP_NET_ADMIN CAP_NET_RAW", "AmbientCapabilities": "CAP_NET_ADMIN CAP_NET_RAW",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_NETLINK AF_UNIX",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], f"{name}: {key}={s.get(key)}, want {value}"
    assert "/var/lib/synproxy" in s["ReadWritePaths"]


def test_rules_unit_is_a_oneshot_that_removes_on_stop() -> None:
    s = unit_settings("synproxy-rules.service")
    assert s["Type"] == ["oneshot"] and s["RemainAfterExit"] == ["yes"]
    assert "rules install" in s["ExecStart"][0] and "rules remove" in s["ExecStop"][0]
    w = unit_settings("synproxy@.service")
    assert "--no-rules" in w["ExecStart"][0] and "--worker-index %i" in w["ExecStart"][0]
    assert "synproxy-rules.service" in " ".join(w["Wants"]) and "ExecStartPre" not in w


def _argv(exec_line: str, config: Path, instance: str = "1") -> list[str]:
    words = exec_line.replace("%i", instance).split()
    assert words[0] == "/usr/local/bin/synproxy"
    return [str(config) if w == "/etc/synproxy/synproxy.toml" else w for w in words[1:]]


def _unit_env(name: str, instance: str = "1") -> dict[str, str]:
    env = {}
    for item in unit_settings(name).get("Environment", []):
        key, _, value = item.partition("=")
        env[key] = value.replace("%i", instance)
    return env


def test_unit_command_lines_are_accepted_by_the_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each ExecStart/ExecStop, with the example config (and `workers = 2` for the per-worker units),
    parses into what the unit means."""
    import synproxy.daemon
    import synproxy.rules

    seen: list[Any] = []
    monkeypatch.setattr(synproxy.daemon, "run", seen.append)
    monkeypatch.setattr(cli, "_need_root", lambda *args, **kwargs: None)
    monkeypatch.setattr(synproxy.rules, "remove", lambda backend: seen.append(("removed", backend)) or True)
    config = DEPLOY / "synproxy.toml.example"
    runner = CliRunner()
    clean = {k: None for k in os.environ if k.startswith("SYNPROXY_")}

    res = runner.invoke(cli.main, _argv(unit_settings("synproxy.service")["ExecStart"][0], config), env=clean)
    assert res.exit_code == 0, res.output
    single = seen.pop()
    assert single.ports == (8080,) and single.install_rules and single.metrics_addr == "127.0.0.1:9531"

    two = tmp_path / "synproxy.toml"
    two.write_text(config.read_text().replace("# workers = 1", "workers = 2"))
    worker = unit_settings("synproxy@.service")["ExecStart"][0]
    res = runner.invoke(cli.main, _argv(worker, two, "1"), env={**clean, **_unit_env("synproxy@.service", "1")})
    assert res.exit_code == 0, res.output
    w = seen.pop()
    assert (w.worker_index, w.workers, w.install_rules) == (1, 2, False)
    assert synproxy.daemon.worker_queues(w, 1) == (1, 3)  # traffic and SYN queue: what the rules below feed
    assert synproxy.daemon._metrics_addr(w, 1) == "127.0.0.1:9532"
    assert str(w.key_file) == "/var/lib/synproxy/cookie.key"
    res = runner.invoke(cli.main, _argv(worker, two, "2"), env={**clean, **_unit_env("synproxy@.service", "2")})
    assert res.exit_code == 2 and "--worker-index 2 needs --workers 3" in res.output

    rules = unit_settings("synproxy-rules.service")
    env = {**clean, **_unit_env("synproxy-rules.service"), "SYNPROXY_BACKEND": "iptables"}
    res = runner.invoke(cli.main, [*_argv(rules["ExecStart"][0], two), "--dry-run"], env=env)
    assert res.exit_code == 0, res.output
    # `workers = 2` from the config: traffic on queues 0-1, SYNs on 2-3.
    assert "--queue-balance 0:1" in res.output and "--syn --dport 8080 -m addrtype --dst-type LOCAL -j NFQUEUE " \
        "--queue-balance 2:3" in res.output
    res = runner.invoke(cli.main, _argv(rules["ExecStop"][0], config), env=env)
    assert res.exit_code == 0 and seen.pop()[0] == "removed", res.output


def test_modules_load_lists_the_queue_modules() -> None:
    mods = [l.strip() for l in (DEPLOY / "modules-load.d" / "synproxy.conf").read_text().splitlines()
            if l.strip() and not l.lstrip().startswith(("#", ";"))]
    assert {"nfnetlink_queue", "xt_NFQUEUE", "nft_queue"} <= set(mods)
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", m) for m in mods), mods


# ---------------------------------------------------------------- sysctl and example config


def test_sysctl_snippet() -> None:
    """Every setting is a real key, commented with its reason; forwarding stays opt-in."""
    lines = (DEPLOY / "sysctl.d" / "90-synproxy.conf").read_text().splitlines()
    active = {}
    for i, line in enumerate(lines):
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        assert lines[i - 1].startswith("#"), f"{key} has no comment saying why"
        active[key] = value
        proc = Path("/proc/sys") / key.replace(".", "/")
        if Path("/proc/sys/net/core").is_dir():
            assert proc.exists(), f"{key} is not a sysctl on this kernel"
    assert active["net.ipv4.tcp_syncookies"] == "1"
    assert int(active["net.core.rmem_max"]) >= 2455552  # NetfilterQueue's netlink socket request
    assert int(active["net.core.wmem_max"]) >= 4 << 20  # the raw sockets' SO_SNDBUF
    assert "net.ipv4.ip_forward" not in active and "net.ipv6.conf.all.forwarding" not in active
    text = "\n".join(lines)
    assert "# net.ipv4.ip_forward = 1" in text and "# net.ipv6.conf.all.forwarding = 1" in text
    assert "nf_conntrack_tcp_loose" in text


def _uncommented(text: str) -> str:
    """The example with every commented-out `key = value` line enabled."""
    return re.sub(r"^# ([a-z0-9_]+ = )", r"\1", text, flags=re.M)


def test_example_config_parses_and_matches_defaults() -> None:
    text = (DEPLOY / "synproxy.toml.example").read_text()
    data = tomllib.loads(text)
    assert data["port"] == [8080] and data["queue"] == 0 and data["mode"] == "local"
    assert data["wscale"] == "auto" and data["mss"] == "auto"
    assert data["key_file"] == "/var/lib/synproxy/cookie.key" and data["metrics_addr"] == "127.0.0.1:9531"
    full = tomllib.loads(_uncommented(text))
    d = LimitsConfig()
    for key in ("max_pending_per_source", "max_established_per_source", "max_pending", "max_established",
                "source_prefix_v4", "source_prefix_v6", "synack_rate_per_source", "synack_burst_per_source",
                "synack_rate_global"):
        assert full[key] == getattr(d, key), f"the example documents {key} = {full[key]}, the default is {getattr(d, key)}"
    assert full["backend_timeout"] == 3.0 and full["idle_timeout"] == 7440


def test_example_config_is_accepted_by_synproxy_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key (commented ones enabled) is a real option of `synproxy run` with a valid value."""
    import synproxy.daemon

    seen: list[Any] = []
    monkeypatch.setattr(synproxy.daemon, "run", seen.append)
    monkeypatch.setattr(cli, "_need_root", lambda *args, **kwargs: None)
    path = tmp_path / "synproxy.toml"
    path.write_text(_uncommented((DEPLOY / "synproxy.toml.example").read_text()))
    clean = {k: None for k in os.environ if k.startswith("SYNPROXY_")}
    res = CliRunner().invoke(cli.main, ["--config", str(path), "run"], env=clean)
    assert res.exit_code == 0, res.output
    opts = seen[0]
    assert opts.ports == (8080,) and opts.wscale is None and opts.mss is None and opts.limits == LimitsConfig()
    assert opts.backend_timeout == 3.0 and opts.idle_timeout == 7440


# ---------------------------------------------------------------- panels against a real Prometheus


class LockedCollector(Collector):
    """Scrapes see the engine between batches, never in the middle of one."""

    def __init__(self, inner: Collector, lock: threading.Lock) -> None:
        self.inner, self.lock = inner, lock

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            return iter(list(self.inner.collect()))


def _addr(i: int) -> bytes:
    return bytes((198, 19, (i >> 8) & 0xFF, i & 0xFF))


class FloodSimulation:
    """An engine fed what a proxy sees during a short spoofed flood with legitimate clients
    connecting through it, so every counter and label the dashboard asks about has data."""

    def __init__(self) -> None:
        self.engine: Engine = make_engine(
            limits=LimitsConfig(max_established_per_source=2, synack_rate_per_source=20, synack_burst_per_source=20))
        self.shell = ShellStats()
        self.now = T0
        self.n = 0
        self.rng = random.Random(7)

    def _flow(self, client: bytes) -> Flow:
        self.n += 1
        f = Flow(cport=10000 + self.n % 50000, client_isn=self.rng.getrandbits(32))
        f.client = client
        return f

    def batch(self) -> None:
        eng, now = self.engine, self.now
        for i in range(300):  # spoofed SYNs, one source each
            eng.handle(self._flow(_addr(self.rng.getrandbits(16))).syn(), C2S, now)
        for _ in range(40):  # one loud source: the per-source SYN-ACK rate limit sheds it
            eng.handle(self._flow(bytes((203, 0, 113, 9))).syn(), C2S, now)
        bogus = self._flow(bytes((203, 0, 113, 10)))
        eng.handle(bogus.c(bogus.client_isn + 1, 12345, ACK), C2S, now)  # forged ACK
        eng.handle_raw(b"\x45\x00garbage", now)  # malformed
        client = bytes((192, 0, 2, self.n % 200 + 1))
        flows = [self._flow(client) for _ in range(3)]
        late = self._synack(flows[2])  # answered while the source is under its cap ...
        for f in flows[:2]:
            synack, _, _ = handshake(eng, f, now)
            eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK, payload=b"x"), C2S, now)  # translated
        # ... its ACK validates after two others got established: max_established_per_source sheds it.
        eng.handle(flows[2].c(flows[2].client_isn + 1, late.seq + 1, ACK), C2S, now)
        for f in flows[:2]:  # they close with a RST
            eng.handle(f.c(f.client_isn + 2, 0, RST | ACK), C2S, now)
        refused = self._flow(bytes((192, 0, 2, 250)))
        self._validated_only(refused)
        eng.handle(refused.s(0, refused.client_isn + 1, RST | ACK), S2C, now)
        # The server stays silent: a timeout. A source per batch: the pending connections of earlier
        # batches count against max_established_per_source until they time out.
        self._validated_only(self._flow(bytes((198, 51, 100, self.n % 250 + 1))))
        # Beyond capacity: the worker sheds first attempts and answers their retransmissions.
        server = Flow().server
        syns = [P.build(4, _addr(self.rng.getrandbits(16)), server, 20000 + k, 80, self.rng.getrandbits(32), 0, SYN,
                        64240, TcpOptions(mss=1460)) for k in range(20)]
        eng.overloaded = True
        for raw in syns + syns[:5]:  # 20 shed, 5 of them sent again and answered
            eng.handle_raw(raw, now)
        eng.overloaded = False
        self.now += 1.0
        eng.handle_timer(self.now)  # SYN retries, then the silent server's timeout
        self.shell.packets += 360
        self.shell.sent.update({"synack": 300, "syn": 3, "ack": 2, "rst": 3})
        self.shell.send_errors["ENOBUFS"] += 1
        for k in range(360):
            self.shell.handling.observe(2e-5 + k * 1e-7)

    def _synack(self, f: Flow) -> P.Packet:
        out = self.engine.handle(f.syn(), C2S, self.now)
        return P.parse(next(a for a in out if isinstance(a, Send) and a.kind == "synack").data)

    def _validated_only(self, f: Flow) -> None:
        """SYN and a valid cookie ACK; the server's answer is up to the caller."""
        sa = self._synack(f)
        self.engine.handle(f.c(f.client_isn + 1, sa.seq + 1, ACK), C2S, self.now)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _ready(base: str) -> bool:
    with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as resp:
        return resp.status == 200


def test_panel_queries_return_data_on_a_simulated_flood(tmp_path: Path) -> None:
    """Prometheus scrapes an exporter over an engine taken through a flood; every panel's
    query returns at least one finite value, and Prometheus loads alerts.yml with every
    alert labelled with a severity and annotated."""
    prometheus = tool("prometheus")
    from prometheus_client import start_http_server

    sim = FloodSimulation()
    lock = threading.Lock()
    proc_file = fake_proc(tmp_path)
    registry = CollectorRegistry()
    registry.register(LockedCollector(
        SynproxyCollector(sim.engine, sim.shell, {"traffic": 0, "syn": 1}, lambda now: 3600.0, proc_path=proc_file), lock))
    exporter_port, prom_port = _free_port(), _free_port()
    server, _thread = start_http_server(exporter_port, addr="127.0.0.1", registry=registry)
    shutil.copy(GRAFANA / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 900ms, evaluation_interval: 1s}\n"
        "rule_files: [alerts.yml]\n"
        "scrape_configs:\n"
        f"  - job_name: synproxy\n    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n")
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{prom_port}"
    try:
        _wait_for("Prometheus to be ready", lambda: _ready(base), 30)
        # The flood: a batch every 0.25 s until Prometheus has scraped it 4 times (once a second).
        deadline = time.monotonic() + 30
        while not ((r := instant_query(base, "count_over_time(up[1m])")) and float(r[0]["value"][1]) >= 4):
            assert time.monotonic() < deadline, "Prometheus did not scrape the exporter 4 times in 30 s"
            for _ in range(2):
                with lock:
                    sim.batch()
                time.sleep(0.25)
        empty, nonfinite = [], []
        for q in panel_queries():
            result = instant_query(base, q.expr)
            if not result:
                empty.append(f"{q.panel}/{q.ref}: {q.expr}")
            elif not all(math.isfinite(float(r["value"][1])) for r in result):
                nonfinite.append(f"{q.panel}/{q.ref}: {q.expr} -> {[r['value'][1] for r in result]}")
        assert not empty, "panels with no data:\n" + "\n".join(empty)
        assert not nonfinite, "panels with NaN/Inf:\n" + "\n".join(nonfinite)
        # The engine really produced the labels the panels break down by.
        shed = {r["metric"]["reason"] for r in instant_query(base, "synproxy_shed_total")}
        assert {Shed.SYNACK_RATE_SOURCE.value, Shed.PER_SOURCE_ESTABLISHED.value, Shed.OVERLOAD.value} <= shed
        assert float(instant_query(base, "sum(synproxy_syn_retries_answered_total)")[0]["value"][1]) > 0
        outcomes = {r["metric"]["outcome"] for r in instant_query(base, "synproxy_backend_handshakes_total")}
        assert {"established", "refused", "timeout"} <= outcomes
        # The rules as Prometheus itself parsed them.
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as resp:
            groups = json.load(resp)["data"]["groups"]
        alerts = {r["name"]: r for g in groups for r in g["rules"] if r["type"] == "alerting"}
        assert REQUIRED_ALERTS <= set(alerts)
        for name, rule in alerts.items():
            assert rule["labels"].get("severity") in ("warning", "critical"), name
            assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
            assert rule["duration"] > 0, f"{name} has no `for:`"
        assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    finally:
        proc.terminate()
        proc.wait(10)
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- the daemon inside the units' sandbox

# What synproxy.service asks of systemd, emulated with a private mount namespace, setpriv and
# prctl: ProtectSystem=strict with ReadWritePaths= the state directory, ProtectKernelTunables
# (/proc/sys and /sys read-only), CapabilityBoundingSet= and AmbientCapabilities= CAP_NET_ADMIN
# CAP_NET_RAW, NoNewPrivileges, MemoryDenyWriteExecute (PR_SET_MDWE). Not emulated: ProtectHome
# (this checkout's interpreter may live under /root), PrivateTmp, RestrictAddressFamilies (the
# socket families are checked from strace instead) and the seccomp filter (the system calls are
# compared with @system-service from strace when strace is installed).
SANDBOX_SH = r"""
set -e
state=$1; shift
mount --make-rprivate /
mount --bind "$state" "$state"
for m in $(awk '{print $2}' /proc/self/mounts | sort -u); do
  case "$m" in /dev|/dev/*|/proc|/proc/*|/sys|/sys/*|"$state") continue;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
mount -o remount,bind,ro /sys
if touch /etc/.synproxy-rw-test 2>/dev/null; then echo "emulation failed: / is writable"; exit 99; fi
if (echo 1 > /proc/sys/net/ipv4/ip_forward) 2>/dev/null; then echo "emulation failed: /proc/sys is writable"; exit 99; fi
exec setpriv --no-new-privs --bounding-set=-all,+net_admin,+net_raw --inh-caps=-all,+net_admin,+net_raw \
     --ambient-caps=-all,+net_admin,+net_raw -- "$@"
"""
MDWE_MAIN = (
    "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
    "assert libc.prctl(65, 1, 0, 0, 0) == 0, 'PR_SET_MDWE failed'; "  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    "sys.argv[0] = 'synproxy'; from synproxy.cli import main; main()"
)


def _system_service_syscalls(analyze: str) -> set[str]:
    """@system-service expanded to system call names, as systemd itself lists it."""
    out: set[str] = set()
    todo, seen = ["@system-service"], set()
    while todo:
        group = todo.pop()
        seen.add(group)
        listing = subprocess.run([analyze, "syscall-filter", group], capture_output=True, text=True).stdout
        for line in listing.splitlines()[1:]:
            word = line.strip()
            if word.startswith("@") and word not in seen:
                todo.append(word)
            elif word and not word.startswith(("#", "@")):
                out.add(word)
    return out


def _descendants(pid: int) -> list[int]:
    out = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
            out += _descendants(int(child))
    return out


@pytest.mark.e2e
def test_daemon_runs_inside_the_units_sandbox(lab: Any, tmp_path: Path) -> None:
    """Binds its queue, installs its rules, proxies a connection, exports metrics, removes the
    rules on SIGTERM and exits 0 with the file system and /proc/sys read-only, two capabilities
    and no W+X memory: the unit's hardening does not break it."""
    for name in ("unshare", "setpriv"):
        tool(name)
    strace = shutil.which("strace")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (tmp_path / "sandbox.sh").write_text(SANDBOX_SH)
    lab.popen("server", [sys.executable, "-m", "synproxy.peers", "sink", "--port", "9000"])
    trace = tmp_path / "strace.out"
    argv = ["unshare", "-m", "bash", str(tmp_path / "sandbox.sh"), str(state), sys.executable, "-c", MDWE_MAIN,
            "run", "--port", "9000", "--queue", "7", "--key-file", str(state / "cookie.key"),
            "--metrics-addr", "127.0.0.1:9531"]
    if strace:
        argv = [strace, "-f", "-qq", "-o", str(trace), *argv]
    log_path = tmp_path / "proxy.log"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # as systemd's, for Type=notify
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    with log_path.open("wb") as log:
        proc = lab.popen("server", argv, stdout=log, stderr=subprocess.STDOUT,
                         env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify")))
    try:
        assert notify.recv(100) == b"READY=1", log_path.read_text()
        assert proc.poll() is None and "serving ports" in log_path.read_text(), log_path.read_text()
        client = ("import socket, sys; s = socket.create_connection((sys.argv[1], 9000), timeout=5); "
                  "s.sendall(b'through the proxy'); s.close()")
        lab.run("client", [sys.executable, "-c", client, lab.addr("server")])
        metrics = lab.run("server", [sys.executable, "-c", "import urllib.request, sys; sys.stdout.write("
                                     "urllib.request.urlopen('http://127.0.0.1:9531/metrics').read().decode())"]).stdout
        assert "synproxy_ack_valid_total 1.0" in metrics
        assert 'synproxy_backend_handshakes_total{outcome="established"} 1.0' in metrics
        assert synproxy_rules_in(lab, "server")
        daemon = [p for p in _descendants(proc.pid) if Path(f"/proc/{p}/comm").read_text().startswith("python")]
        assert daemon, "the daemon process was not found"
        os.kill(daemon[0], 15)  # SIGTERM to the daemon itself (strace -o blocks fatal signals)
        assert proc.wait(20) == 0, log_path.read_text()
        assert notify.recv(100) == b"STOPPING=1"
    finally:
        notify.close()
        if proc.poll() is None:
            for pid in reversed(_descendants(proc.pid)):
                os.kill(pid, 9)
            proc.wait(5)
    log = log_path.read_text()
    assert "removed the" in log and "RuntimeWarning" not in log, log  # rcvbuf forced, rules removed
    assert not synproxy_rules_in(lab, "server")
    assert oct((state / "cookie.key").stat().st_mode & 0o777) == "0o600"
    if strace:
        allowed = _system_service_syscalls(tool("systemd-analyze"))
        used: dict[str, str] = {}
        pids: set[str] = set()
        for line in trace.read_text().splitlines():
            m = re.match(r"(\d+)\s+(?:<\.\.\. )?(\w+)[( ]", line)
            if not m:
                continue
            pid, call = m.groups()
            if call == "execve" and line.split('"')[1:2] == [sys.executable]:
                pids.add(pid)  # from here on this pid is the daemon
            if pid not in pids:
                continue
            if call in ("clone", "clone3", "fork", "vfork") and (child := re.search(r"= (\d+)$", line)):
                pids.add(child.group(1))  # threads and iptables/nft children
            used.setdefault(call, line)
        outside = {call: line for call, line in used.items() if call not in allowed}
        assert not outside, f"system calls outside @system-service: {outside}"
        families = set(re.findall(r"socket\((AF_\w+)", trace.read_text()))
        assert families <= {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"}, families
