"""A lab of real hosts in network namespaces: clients, an optional router, a server.

    with Lab(mode="local") as lab:           # client(s) <-> server
        lab.run("client", ["curl", ...])
    with Lab(mode="gateway") as lab:         # client(s) <-> router <-> server

Every namespace and interface name carries a random run id, so parallel runs
never collide; everything is torn down on exit, on an exception and at
interpreter exit, and `cleanup_stale()` removes what a killed run left behind.
Addresses come from 198.18.0.0/15 (RFC 2544, benchmarking) and the ULA
fd53:5059::/32; traffic never leaves the namespaces the lab made.

Clients sit on a bridge in a "switch" namespace so several of them (a
legitimate client, an attacker, ...) share the link to the server or router.

    with Lab(mode="gateway", clients=2, mtu=9000) as lab:
        lab.popen("server", [sys.executable, "-m", "synproxy.peers", "sink", "--port", "9000"])
        lab.python("client2", "import socket, sys; socket.create_connection((sys.argv[1], 9000))",
                   lab.addr("server", 6))
        lab.sysctl("server", "net.ipv4.tcp_syncookies", "0")

Raw sockets and marks, as checked on kernel 6.18 (tests/test_lab_raw.py keeps
checking them), which the proxy's datapath relies on:
  (a) an IPv4 `SOCK_RAW/IPPROTO_RAW` socket with `SO_MARK` sends a packet with a
      spoofed (client) source to a local address of its own namespace: it
      passes raw OUTPUT with the mark, loops over lo, and raw PREROUTING
      still sees the mark and the spoofed source;
  (b) the same holds for IPv6 (`AF_INET6, SOCK_RAW, IPPROTO_RAW`: the header
      is sent verbatim, a non-local source is accepted);
  (c) in the gateway topology the router can send such a packet with the
      client's source to the server, which receives it (and its reply goes
      back to the client through the router). The mark is visible in the
      router's OUTPUT but not in the server: a mark never crosses a veth
      into another namespace.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "spx"
REGISTRY = Path("/run/synproxy-lab")
V4_CLIENT_NET = "198.18.{n}.0/24"
V6_CLIENT_NET = "fd53:5059:{n:x}::/64"


class LabError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass
class Host:
    name: str  # logical: client, client2, router, server, switch
    netns: str
    v4: str = ""
    v6: str = ""


@dataclass
class Lab:
    """Build on __enter__, tear down on __exit__ (or `close()`)."""

    mode: str = "local"
    clients: int = 1
    mtu: int = 1500
    host_link: bool = False  # a veth from the host to the proxy's namespace (metrics, Prometheus)
    host_addr: str = ""  # the proxy host's address on that link
    keep_flow_order: bool = False  # steer each flow to one CPU's backlog (RPS), as a NIC's RSS does: see _steer_flows
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, Host] = field(default_factory=dict)
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    _closed: bool = False

    # ------------------------------------------------------------ build and teardown

    def __enter__(self) -> Lab:
        if self.mode not in ("local", "gateway"):
            raise LabError(f"unknown lab mode {self.mode!r}")
        cleanup_stale()
        REGISTRY.mkdir(parents=True, exist_ok=True)
        tmp = REGISTRY / f".{self.run_id}"  # written whole, then renamed: never seen half-written
        tmp.write_text(_owner_id(os.getpid()))
        tmp.rename(REGISTRY / self.run_id)
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ns(self, role: str) -> str:
        return f"{PREFIX}{self.run_id}{role}"

    def _add_host(self, name: str, role: str) -> Host:
        host = Host(name, self._ns(role))
        _ip("netns", "add", host.netns)
        self.hosts[name] = host
        self.run(name, ["ip", "link", "set", "lo", "up"])
        for key, value in (
            ("net.ipv4.tcp_no_metrics_save", "1"),  # no TCP metrics from earlier runs: each test starts clean
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ):
            self.sysctl(name, key, value)
        return host

    def _veth(self, a: Host, a_if: str, b: Host, b_if: str) -> None:
        _ip("link", "add", a_if, "netns", a.netns, "type", "veth", "peer", "name", b_if, "netns", b.netns)
        for host, ifname in ((a, a_if), (b, b_if)):
            self.run(host.name, ["ip", "link", "set", ifname, "mtu", str(self.mtu), "up"])

    def _addr(self, host: Host, ifname: str, v4: str, v6: str) -> None:
        self.run(host.name, ["ip", "addr", "add", v4, "dev", ifname])
        self.run(host.name, ["ip", "-6", "addr", "add", v6, "dev", ifname, "nodad"])
        host.v4, host.v6 = v4.split("/")[0], v6.split("/")[0]

    def _build(self) -> None:
        rid = self.run_id
        server = self._add_host("server", "s")
        switch = self._add_host("switch", "w")
        self.run("switch", ["ip", "link", "add", "br0", "type", "bridge"])
        self.run("switch", ["ip", "link", "set", "br0", "up"])
        # The host the clients reach: the server itself (local) or the router (gateway).
        if self.mode == "gateway":
            router = self._add_host("router", "r")
            self._veth(router, "eth1", server, "eth0")
            self._addr(router, "eth1", "198.19.0.1/24", "fd53:5059:ffff::1/64")
            self._addr(server, "eth0", "198.19.0.2/24", "fd53:5059:ffff::2/64")
            self.sysctl("router", "net.ipv4.ip_forward", "1")
            self.sysctl("router", "net.ipv6.conf.all.forwarding", "1")
            self.run("server", ["ip", "route", "add", "default", "via", "198.19.0.1"])
            self.run("server", ["ip", "-6", "route", "add", "default", "via", "fd53:5059:ffff::1"])
            front, front_if = router, "eth0"
        else:
            front, front_if = server, "eth0"
        self._veth(front, front_if, switch, f"up{rid}")
        self.run("switch", ["ip", "link", "set", f"up{rid}", "master", "br0"])
        self._addr(front, front_if, "198.18.0.1/16", "fd53:5059::1/48")
        for i in range(1, self.clients + 1):
            name = "client" if i == 1 else f"client{i}"
            client = self._add_host(name, f"c{i}")
            self._veth(client, "eth0", switch, f"p{i}{rid}")
            self.run("switch", ["ip", "link", "set", f"p{i}{rid}", "master", "br0"])
            self._addr(client, "eth0", f"198.18.{i}.2/16", f"fd53:5059::{i:x}:2/48")
            # Default routes so replies to spoofed flood sources leave quietly instead of erroring.
            self.run(name, ["ip", "route", "add", "default", "via", "198.18.0.1"])
            self.run(name, ["ip", "-6", "route", "add", "default", "via", "fd53:5059::1"])
        # Replies to spoofed flood sources leave through a dummy interface: no ARP for
        # addresses that do not exist, so the neighbour table never overflows and never
        # evicts the real clients' entries (which would drop their packets too).
        # (No dummy driver everywhere: a veth whose peer stays down, and a default route via
        # a next hop with a permanent neighbour entry, so all such replies share one entry.)
        edge = "server" if self.mode == "local" else "router"
        self.run(edge, ["ip", "link", "add", "sink0", "type", "veth", "peer", "name", "sink1"])
        self.run(edge, ["ip", "link", "set", "sink0", "up"])
        self.run(edge, ["ip", "addr", "add", "198.19.254.1/30", "dev", "sink0"])
        self.run(edge, ["ip", "-6", "addr", "add", "fd53:5059:fffe::1/64", "dev", "sink0", "nodad"])
        for nexthop, family in (("198.19.254.2", "-4"), ("fd53:5059:fffe::2", "-6")):
            self.run(edge, ["ip", family, "neigh", "add", nexthop, "lladdr", "02:00:00:00:00:02", "dev", "sink0",
                            "nud", "permanent"])
            self.run(edge, ["ip", family, "route", "add", "default", "via", nexthop, "dev", "sink0", "onlink"])

        if self.host_link:
            self._link_host()
        if self.keep_flow_order:
            for name in self.hosts:
                self._steer_flows(name)

    def _steer_flows(self, host: str) -> None:
        """Turn on RPS for every interface of `host` over all CPUs, so a wire keeps each flow's order.

        A veth hands each packet to the backlog of the CPU that sent it, so two packets of one
        flow sent from different CPUs (a server's TCP sends from the application's CPU and from
        the one that took the ACK) can swap places when one backlog waits, which a real wire and
        a NIC's RSS never do. Captured at the lab server's interface and at the router's (no proxy
        between), the TCP timestamps of 20 MB downloads went back by 1-2 ms one to three times in
        5 of 6 batches of 30 (in the sixth, once past the router's interface, on its way into the
        proxy's queue); an end drops a segment whose timestamp is over 1 ms older than one before
        it (TcpExtPAWSEstab). RPS queues each flow to one CPU chosen by its hash, in the order it
        was sent: none in 180 downloads.
        Off by default: it moves work between CPUs, and the benchmarks were measured without it.
        """
        mask = cpu_mask(os.cpu_count() or 1)
        self.run(host, ["sh", "-c", f"for f in /sys/class/net/*/queues/rx-*/rps_cpus; do echo {mask} > $f; done"])

    def _link_host(self) -> None:
        """Reach the proxy's namespace from the host over a /30 of 198.19.100-249.0/24
        (picked by run id, so two labs rarely share one): host .1, proxy host .2."""
        target = self.hosts["router" if self.mode == "gateway" else "server"]
        outside = f"{PREFIX}{self.run_id}h"
        net = f"198.19.{100 + int(self.run_id[:2], 16) % 150}"
        _ip("link", "add", outside, "type", "veth", "peer", "name", "host0", "netns", target.netns)
        _ip("addr", "add", f"{net}.1/30", "dev", outside)
        _ip("link", "set", outside, "up")
        self.run(target.name, ["ip", "addr", "add", f"{net}.2/30", "dev", "host0"])
        self.run(target.name, ["ip", "link", "set", "host0", "up"])
        self.host_addr = f"{net}.2"

    def close(self) -> None:
        """Stop every process started in the lab and delete its namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            _stop(proc)
        for host in self.hosts.values():
            _kill_netns_pids(host.netns)
            _ip("netns", "del", host.netns, check=False)
        if self.host_link:
            _ip("link", "del", f"{PREFIX}{self.run_id}h", check=False)  # gone with its peer, normally
        (REGISTRY / self.run_id).unlink(missing_ok=True)
        try:
            atexit.unregister(self.close)
        except Exception:  # pragma: no cover - interpreter shutting down
            pass

    # ------------------------------------------------------------ use

    def netns(self, host: str) -> str:
        return self.hosts[host].netns

    def addr(self, host: str, family: int = 4) -> str:
        """A host's address; family 4 or 6 (socket.AF_INET / AF_INET6 work too)."""
        h = self.hosts[host]
        if family in (4, socket.AF_INET):
            return h.v4
        if family in (6, socket.AF_INET6):
            return h.v6
        raise LabError(f"unknown address family {family!r}")

    def cmd(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host].netns, *argv]

    def run(
        self, host: str, argv: list[str], check: bool = True, timeout: float = 60.0, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in a host; output captured as text."""
        res = subprocess.run(self.cmd(host, argv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise LabError(f"{host}: {' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def popen(self, host: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a background process in a host; it is stopped at teardown."""
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(self.cmd(host, argv), start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def sysctl(self, host: str, key: str, value: str) -> None:
        self.run(host, ["sysctl", "-q", "-w", f"{key}={value}"])

    def python(
        self, host: str, code: str, *args: str, check: bool = True, timeout: float = 60.0, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run Python source in a host (`sys.argv[1:]` = args) with this interpreter,
        so the venv's packages (synproxy, scapy) are importable there too."""
        return self.run(host, [sys.executable, "-c", code, *args], check=check, timeout=timeout, **kw)


def cpu_mask(cpus: int) -> str:
    """CPUs 0..cpus-1 in the kernel's bitmap format (rps_cpus): hex in comma-separated 32-bit words."""
    digits = f"{(1 << cpus) - 1:x}"
    digits = digits.zfill(-(-len(digits) // 8) * 8)
    return ",".join(digits[i:i + 8] for i in range(0, len(digits), 8))


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def _kill_netns_pids(netns: str) -> None:
    res = _ip("netns", "pids", netns, check=False)
    for pid in res.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    if res.stdout.strip():
        time.sleep(0.05)


def cleanup_stale() -> list[str]:
    """Delete lab namespaces whose creating process is gone; returns their names."""
    removed: list[str] = []
    if not REGISTRY.exists():
        return removed
    existing = _ip("netns", "list", check=False).stdout.split("\n")
    names = [line.split()[0] for line in existing if line.strip()]
    for entry in REGISTRY.iterdir():
        if entry.name.startswith("."):
            continue  # being written
        try:
            owner = entry.read_text().strip()
        except FileNotFoundError:
            continue  # another run is cleaning it up right now
        try:
            if _owner_id(int(owner.split()[0])) == owner or owner.isdigit():
                continue  # its creator still runs (a bare pid: written by an older version)
        except (ValueError, IndexError, OSError):
            pass
        for name in names:
            if name.startswith(f"{PREFIX}{entry.name}"):
                _kill_netns_pids(name)
                _ip("netns", "del", name, check=False)
                removed.append(name)
        entry.unlink(missing_ok=True)
    return removed


def _owner_id(pid: int) -> str:
    """'pid starttime': a recycled pid of a dead run does not look alive.

    Raises OSError when the process does not exist.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    start = stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
    return f"{pid} {start}"
