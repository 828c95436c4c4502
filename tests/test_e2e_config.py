"""Configuration as an operator gives it: every mistake is one sentence and exit status 2 before
anything is bound or installed (the systemd unit does not restart on 2); the config file's keys all
take effect; rules the operator installed stay the operator's."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from synproxy.lab import Lab

from .e2e import SERVER_PORT, SINK_PORT, SYNPROXY, bound_queues, eventually, proxied, ruleset, synproxy_rules_in

pytestmark = pytest.mark.e2e

QUEUE = 1500 + os.getpid() % 500


def run_args(tmp_path: Path, *extra: str) -> list[str]:
    return [SYNPROXY, "run", "--port", "8080", "--queue", str(QUEUE), "--metrics-addr", "off",
            "--key-file", str(tmp_path / "cookie.key"), *extra]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--synack-burst-per-source", "0.5"], "--synack-burst-per-source must be at least 1 SYN-ACK, got 0.5"),
    (["--synack-burst-per-source", "0"], "--synack-burst-per-source must be at least 1"),
    (["--synack-rate-per-source", "nan"], "--synack-rate-per-source must be a number of SYN-ACKs per second"),
    (["--synack-rate-global", "-3"], "--synack-rate-global must be a number of SYN-ACKs per second"),
    (["--max-pending", "-1"], "--max-pending must be 0 (unlimited) or more, got -1"),
    (["--queue", "65535"], "--queue 65535 with 1 worker(s) needs queues 65535..65536"),
    (["--workers", "2", "--metrics-addr", "127.0.0.1:65535"], "leaves no room for 2 workers"),
    (["--backend", "iptables", *[a for p in range(9000, 9016) for a in ("--port", str(p))]],
     "iptables can match at most 15 ports"),
    (["--server", "198.18.0.1/16"], "Invalid value for '--server': 198.18.0.1/16 has host bits set"),
])
def test_configuration_errors_are_one_sentence_and_status_2(lab: Lab, tmp_path: Path, extra: list[str],
                                                            needle: str) -> None:
    res = lab.run("server", run_args(tmp_path, *extra), check=False, timeout=30)
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("synproxy: ") and needle in res.stderr, res.stderr
    assert not bound_queues(lab) and not synproxy_rules_in(lab, "server")


def test_metrics_port_in_use_is_named(lab: Lab, tmp_path: Path) -> None:
    holder = lab.popen("server", ["python3", "-c", "import socket, time; s = socket.socket(); "
                                  "s.bind(('127.0.0.1', 19531)); s.listen(); print('up', flush=True); time.sleep(30)"],
                       stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
        res = lab.run("server", run_args(tmp_path, "--metrics-addr", "127.0.0.1:19531"), check=False, timeout=30)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last == ("synproxy: cannot serve metrics on 127.0.0.1:19531: address already in use "
                    "(give another --metrics-addr, or off)"), res.stderr
    assert "Traceback" not in res.stderr and not synproxy_rules_in(lab, "server")


def test_config_file_log_level_takes_effect(lab: Lab, tmp_path: Path) -> None:
    conf = tmp_path / "synproxy.toml"
    conf.write_text('log_level = "loud"\n')
    bad = lab.run("server", [SYNPROXY, "--config", str(conf), *run_args(tmp_path)[1:]], check=False, timeout=30)
    assert bad.returncode == 2 and "log_level in" in bad.stderr and "'loud'" in bad.stderr, bad.stderr
    conf.write_text('log_level = "warning"\n')
    out = serve_briefly(lab, [SYNPROXY, "--config", str(conf), *run_args(tmp_path)[1:]])
    assert " INFO " not in out, out  # "synproxy ready" and the rest are INFO lines
    # the flag still wins over the file
    out = serve_briefly(lab, [SYNPROXY, "--config", str(conf), "--log-level", "info", *run_args(tmp_path)[1:]])
    assert "synproxy ready" in out, out


def serve_briefly(lab: Lab, argv: list[str]) -> str:
    """Start the daemon, stop it once its queues are bound; its output."""
    proc = lab.popen("server", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    eventually(lambda: bound_queues(lab), bool, 15, interval=0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    return out


def test_operator_rules_with_their_own_mark_are_used_and_left_in_place() -> None:
    """synproxy-rules.service installs the rules (`rules install`, here with mark 7); `run` uses the
    same mark, serves through them, and leaves them when it stops: they are not its to remove."""
    with proxied("local", start=False) as px:
        ports = ["--port", str(SERVER_PORT), "--port", str(SINK_PORT)]
        px.lab.run("server", [SYNPROXY, "rules", "install", *ports, "--queue", str(px.queue), "--mark", "7"])
        shown = px.lab.run("server", [SYNPROXY, "rules", "show", "--backend", "iptables"], check=False)
        assert "installed by synproxy rules install" in shown.stdout and "0x7" in shown.stdout
        assert shown.returncode == 4 and "no process reads queue(s)" in shown.stdout  # nothing runs yet
        px.start_proxy("--mark", "7")  # with --rules (the default): the operator's rules are used as they are
        assert "using the iptables rules `synproxy rules install` put in place" in px.log()
        shown = px.lab.run("server", [SYNPROXY, "rules", "show", "--backend", "iptables"])  # exit 0: all read
        assert "no process reads" not in shown.stdout
        assert px.client("get", px.url(4, "/"))["status"] == 200
        assert px.client("get", px.url(6, "/"))["status"] == 200
        assert px.stop_proxy() == 0
        assert synproxy_rules_in(px.lab, "server"), "run removed rules the operator installed"
        assert "removed the" not in px.log()
        px.lab.run("server", [SYNPROXY, "rules", "remove"])


def test_run_refuses_rules_of_another_configuration_in_one_line(lab: Lab, tmp_path: Path) -> None:
    """Rules of another configuration (other options, or an older synproxy's layout) are not run's to
    take: it says how to proceed, in one line, exits 1 and leaves them and their ports' protection."""
    lab.run("server", [SYNPROXY, "rules", "install", "--port", "8080", "--queue", str(QUEUE), "--backend", "iptables"])
    before = ruleset(lab)
    res = lab.run("server", run_args(tmp_path, "--port", "8081", "--backend", "iptables"), check=False, timeout=30)
    assert res.returncode == 1, res
    last = res.stderr.strip().splitlines()[-1]
    assert "another configuration" in last and "synproxy rules remove" in last and "same options" in last, res.stderr
    assert "older synproxy" in last and "Traceback" not in res.stderr
    assert ruleset(lab) == before and not bound_queues(lab)
    lab.run("server", [SYNPROXY, "rules", "remove"])


def test_rules_replaced_while_run_serves_stay_when_it_stops() -> None:
    """`rules install --replace` over the rules a run installed makes them the operator's: the run,
    stopping, leaves them (it removed them, leaving the new configuration's ports unprotected)."""
    with proxied("local", start=False) as px:
        px.start_proxy()
        other = px.queue + 7
        px.lab.run("server", [SYNPROXY, "rules", "install", "--replace", "--port", str(SERVER_PORT),
                              "--queue", str(other), "--backend", "iptables"])
        assert px.stop_proxy() == 0
        shown = px.lab.run("server", [SYNPROXY, "rules", "show", "--backend", "iptables"], check=False).stdout
        assert f"--queue-num {other}" in shown and "installed by synproxy rules install" in shown, shown
        assert "left the iptables rules in place" in px.log() and "removed the" not in px.log()
        px.lab.run("server", [SYNPROXY, "rules", "remove"])


def test_rules_a_killed_run_left_are_taken_over_and_removed() -> None:
    """A clean stop removes the rules `run` installed, also those a killed predecessor left."""
    with proxied("local") as px:
        shown = px.lab.run("server", [SYNPROXY, "rules", "show", "--backend", "iptables"]).stdout
        assert "installed by synproxy run, removed when it stops" in shown
        assert px.proc is not None
        px.proc.send_signal(signal.SIGKILL)
        px.proc.wait(10)
        assert synproxy_rules_in(px.lab, "server")  # fail-closed while it is down
        shown = eventually(  # its worker follows it (PR_SET_PDEATHSIG)
            lambda: px.lab.run("server", [SYNPROXY, "rules", "show", "--backend", "iptables"], check=False),
            lambda res: res.returncode == 4, seconds=10)
        assert shown.returncode == 4, shown
        assert ("so their packets are dropped (fail-closed): the `synproxy run` that installed them is gone "
                "(killed?): start it again, or `synproxy rules remove`") in shown.stdout, shown.stdout
        px.start_proxy()
        assert px.client("get", px.url(4, "/"))["status"] == 200
        assert px.stop_proxy() == 0
        assert not synproxy_rules_in(px.lab, "server")


@pytest.mark.parametrize("mode", ["local", "gateway"])
def test_server_option_proxies_only_connections_to_the_servers(mode: str) -> None:
    """--server: connections to the servers' addresses are proxied; to another address, or in a
    family given no server, they pass unproxied and still work (the rules do not match them)."""
    with proxied(mode, start=False) as px:
        def proxied_syns(family: int) -> float:
            before = px.metrics().get("synproxy_syn_received_total", 0)
            res = px.client("get", px.url(family, "/bytes/1000"), timeout=30)
            assert res["status"] == 200 and res["bytes"] == 1000, res
            return px.metrics().get("synproxy_syn_received_total", 0) - before

        px.start_proxy("--server", px.server_addr(4))
        try:
            assert proxied_syns(4) == 1  # the server's IPv4 address: proxied
            assert proxied_syns(6) == 0  # no IPv6 server given: not proxied, and it works
        finally:
            px.stop_proxy()
        px.start_proxy("--server", "192.0.2.1", "--server", px.server_addr(6))
        assert proxied_syns(4) == 0  # another IPv4 address is the protected one
        assert proxied_syns(6) == 1
