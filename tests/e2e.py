"""Helpers for end-to-end tests: a proxied lab with a real server, real clients and `synproxy run`.

The proxy is started exactly as an operator would (`synproxy run ...` in the
namespace that holds it: the server's host in local mode, the router in
gateway mode), and stopped with SIGTERM so it removes its rules.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from synproxy.daemon import READY_LINE
from synproxy.lab import Lab
from synproxy.nfqueue import PROC_PATH, parse_bound_queues
from synproxy.rules import NFT_TABLE

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SYNPROXY = str(VENV_BIN / "synproxy")
PYTHON = sys.executable
SERVER_PORT = 8080
SINK_PORT = 9000
T = TypeVar("T")


@dataclass
class Proxied:
    """A lab with a server, the proxy in front of it and handles to run clients."""

    lab: Lab
    mode: str
    proxy_host: str
    queue: int
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None
    server_proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="synproxy-e2e-", suffix=".log")[1]))
    key_file: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="synproxy-key-")) / "cookie.key")

    def server_addr(self, family: int) -> str:
        return self.lab.addr("server", family)

    def url(self, family: int, path: str, port: int = SERVER_PORT) -> str:
        host = self.server_addr(family)
        return f"http://[{host}]:{port}{path}" if family == 6 else f"http://{host}:{port}{path}"

    def client(self, *args: str, host: str = "client", timeout: float = 120.0) -> dict[str, object]:
        """Run a peers client in a client namespace; its one JSON line."""
        out = self.lab.run(host, [PYTHON, "-m", "synproxy.peers", *args], timeout=timeout)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def restart_server(self, *extra: str) -> None:
        """Restart the HTTP server (e.g. with --rcvbuf or --slow-read)."""
        if self.server_proc is not None:
            self.server_proc.terminate()
            self.server_proc.wait(10)
        self.server_proc = self.lab.popen(
            "server", [PYTHON, "-m", "synproxy.peers", "server", "--port", str(SERVER_PORT), *extra]
        )
        wait_listening(self.lab, SERVER_PORT)

    def snmp(self, host: str) -> dict[str, int]:
        """The TCP counters of a host's namespace (/proc/net/snmp)."""
        lines = [ln.split() for ln in self.lab.run(host, ["cat", "/proc/net/snmp"]).stdout.splitlines()
                 if ln.startswith("Tcp:")]
        return dict(zip(lines[0][1:], map(int, lines[1][1:])))

    def start_proxy(self, *extra: str) -> None:
        args = [
            SYNPROXY, "run", "--port", str(SERVER_PORT), "--port", str(SINK_PORT), "--queue", str(self.queue),
            "--mode", self.mode, "--key-file", str(self.key_file),
            "--metrics-addr", f"127.0.0.1:{self.metrics_port}", *extra,
        ]
        log = self.log_path.open("ab")
        start = len(self.log())
        self.proc = self.lab.popen(self.proxy_host, args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"synproxy exited {self.proc.returncode}:\n{self.log()}")
            if READY_LINE in self.log()[start:]:  # queues bound, rules in place, any number of workers
                time.sleep(0.2)
                return
            time.sleep(0.05)
        raise RuntimeError(f"synproxy did not start:\n{self.log()}")

    def stop_proxy(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """The proxy's metrics (label sets folded into the name) read inside its namespace."""
        out = self.lab.run(
            self.proxy_host,
            [PYTHON, "-c", f"import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                           f"'http://127.0.0.1:{self.metrics_port}/metrics',timeout=5).read().decode())"],
        )
        values: dict[str, float] = {}
        for line in out.stdout.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    SYN_PROBE = "synproxy-e2e-server-syns"

    def worker_metrics(self, index: int) -> dict[str, float]:
        """Worker `index`'s metrics (with --workers N, worker i exports on the metrics port + i)."""
        port = self.metrics_port
        self.metrics_port = port + index
        try:
            return self.metrics()
        finally:
            self.metrics_port = port

    def count_server_syns(self) -> None:
        """Count, from now on, the SYNs to the protected ports that reach the server host's
        INPUT chain: past the proxy's queues, so only the proxy's own (replayed) SYNs, unless
        something crossed that the proxy did not validate. Once: a second call adds no second
        rule (each would count every SYN again)."""
        for tool in ("iptables", "ip6tables"):
            for port in (SERVER_PORT, SINK_PORT):
                rule = ["INPUT", "-p", "tcp", "--syn", "--dport", str(port), "-m", "comment", "--comment", self.SYN_PROBE]
                if self.lab.run("server", [tool, "-w", "-C", *rule], check=False).returncode != 0:
                    self.lab.run("server", [tool, "-w", "-I", *rule])

    def server_syns(self) -> int:
        """SYNs (IPv4 and IPv6) counted since `count_server_syns`."""
        return sum(
            int(line.split()[0])
            for tool in ("iptables", "ip6tables")
            for line in self.lab.run("server", [tool, "-w", "-L", "INPUT", "-v", "-x", "-n"]).stdout.splitlines()
            if self.SYN_PROBE in line
        )

    def assert_only_validated_crossed(self, metrics_before: dict[str, float], syns_before: int) -> None:
        """Every SYN that reached the server since was one the proxy sent after validating a cookie."""
        key = 'synproxy_packets_sent_total{kind="syn"}'
        sent = self.metrics().get(key, 0) - metrics_before.get(key, 0)
        assert self.server_syns() - syns_before == sent, (self.server_syns() - syns_before, sent)

    def syn_recv(self) -> int:
        """Half-open sockets on the server toward other peers than the lab's clients: what a flood
        that crossed the proxy would fill. (A legitimate client's connection is half-open there
        for the moment between the proxy's replayed SYN and its ACK; a sample can catch one.)"""
        clients = {plain_addr(self.lab.addr(name, family)) for name in self.lab.hosts if name.startswith("client")
                   for family in (4, 6)}
        out = self.lab.run("server", ["ss", "-Htan", "state", "syn-recv"])
        peers = [line.split()[-1].rsplit(":", 1)[0].strip("[]") for line in out.stdout.splitlines() if line.strip()]
        return sum(plain_addr(peer) not in clients for peer in peers)


@contextmanager
def proxied(mode: str, clients: int = 1, mtu: int = 1500, start: bool = True, **lab_kw: object) -> Iterator[Proxied]:
    """A lab in `mode` with the lab server and sink running and (by default) the proxy started."""
    with Lab(mode=mode, clients=clients, mtu=mtu, **lab_kw) as lab:  # type: ignore[arg-type]
        px = Proxied(
            lab=lab, mode=mode, proxy_host="server" if mode == "local" else "router",
            queue=100 + os.getpid() % 1000, metrics_port=19000 + os.getpid() % 1000,
        )
        px.restart_server()
        lab.popen("server", [PYTHON, "-m", "synproxy.peers", "sink", "--port", str(SINK_PORT)])
        wait_listening(lab, SINK_PORT)
        try:
            if start:
                px.start_proxy()
            yield px
        finally:
            px.stop_proxy()
            shutil.rmtree(px.key_file.parent, ignore_errors=True)
            if os.environ.get("SYNPROXY_E2E_KEEP_LOGS") is None:
                px.log_path.unlink(missing_ok=True)


def listening(lab: Lab, port: int) -> bool:
    """Whether a socket listens on `port` in the server namespace."""
    return bool(lab.run("server", ["ss", "-Htln", f"sport = :{port}"]).stdout.strip())


def wait_listening(lab: Lab, port: int) -> None:
    if not eventually(lambda: listening(lab, port), bool, 10, interval=0.05):
        raise RuntimeError(f"nothing listens on port {port} in the server namespace")


def plain_addr(addr: str) -> str:
    """'::ffff:198.18.0.2' (a v4 client on a dual-stack socket) -> '198.18.0.2'."""
    return addr.removeprefix("::ffff:")


# The end of a client script (which has imported json, socket and sys) holding a connection `s` to
# the sink open after sending b'first': on a line on stdin it sends the rest, closes its side and
# prints what the sink says arrived.
FINISH_ON_CUE = (
    "sys.stdin.readline()\n"
    "s.sendall(b'-second');s.shutdown(socket.SHUT_WR)\n"
    "r=b''\n"
    "while True:\n"
    "  p=s.recv(65536)\n"
    "  if not p: break\n"
    "  r+=p\n"
    "print(bytes.fromhex(json.loads(r)['data']).decode(),flush=True)\n"
)


def finish_on_cue(proc: subprocess.Popen[str]) -> str:
    """Cue a FINISH_ON_CUE script (started with text pipes) and return what it printed last."""
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, _ = proc.communicate(timeout=30)
    return out.strip().splitlines()[-1] if out.strip() else ""


def bound_queues(lab: Lab, host: str = "server") -> set[int]:
    """The NFQUEUE numbers bound in `host`'s namespace (read there: /proc/net is per namespace)."""
    return parse_bound_queues(lab.run(host, ["cat", PROC_PATH]).stdout)


def ruleset(lab: Lab, host: str = "server") -> str:
    """`host`'s iptables rules without iptables-save's comment lines, whose timestamps would make two
    saves of the same rules differ when a second boundary falls between them."""
    out = lab.run(host, ["iptables-save"]).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


def synproxy_rules_in(lab: Lab, host: str) -> bool:
    """Whether synproxy's rules are installed in `host`: its iptables chains or its nft table."""
    ipt = lab.run(host, ["iptables-save", "-t", "raw"]).stdout
    nft = lab.run(host, ["nft", "list", "tables"], check=False).stdout
    return "-j SYNPROXY_PY_PRE" in ipt or f"table inet {NFT_TABLE}" in nft


def during(attack: subprocess.Popen[Any], action: Callable[[], T], who: str = "the client") -> T:
    """`action()` while the bounded `attack` process runs: it must still run when the action is
    done (else nothing was tested). The attack is waited for either way."""
    try:
        time.sleep(0.3)  # under way
        result = action()
        assert attack.poll() is None, f"the attack ended before {who} did: nothing was tested"
        return result
    finally:
        attack.wait(30)


def eventually(probe: Callable[[], T], done: Callable[[T], bool], seconds: float = 5.0,
               interval: float = 0.2) -> T:
    """`probe()` every `interval` until `done` holds for its result or `seconds` pass; the last
    result (the caller asserts on it, so a timeout fails with what was seen)."""
    deadline = time.monotonic() + seconds
    while True:
        result = probe()
        if done(result) or time.monotonic() >= deadline:
            return result
        time.sleep(interval)
