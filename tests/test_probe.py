"""`synproxy probe`: the MSS a server announced in its SYN-ACK, exactly, and one-line errors.

Servers in a lab announce a known MSS (TCP_MAXSEG set before listen() caps what the SYN-ACK
carries; without it Linux announces the MTU less the IP and TCP headers), and the probe must
report exactly that, over lo and over the lab's 1500-byte veth, IPv4 and IPv6. The kernel's
send MSS (TCP_INFO's tcpi_snd_mss, which the probe used to read) is clamped to half the
server's largest window: over lo probe said 32780 where the server announced 65495, and 588
for a server with a small receive buffer that announced 1460 over the veth.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from synproxy.lab import Lab

SYNPROXY = str(Path(sys.executable).parent / "synproxy")
PYTHON = sys.executable
PORTS = {0: 8000, 1460: 8001, 1200: 8002, 536: 8003}  # MSS set on the listener (0: none) -> its port
SMALL_WINDOW_PORT = 8004  # default MSS, SO_RCVBUF 1024: a window smaller than two segments
DEFAULT_MSS = {("lo", 4): 65495, ("lo", 6): 65476, ("veth", 4): 1460, ("veth", 6): 1440}

SERVE = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    port, mss, rcvbuf = map(int, spec.split(":"))
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if mss:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((host, port))
        s.listen()
        sel.register(s, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in sel.select():
        key.fileobj.accept()[0].close()
"""

ONE_CONNECTION_PORT = 8010
ONE_CONNECTION = f"""
import socket
s = socket.create_server(("127.0.0.1", {ONE_CONNECTION_PORT}))
print("listening", flush=True)
conn = s.accept()[0]
conn.settimeout(5)
try:
    print("end of stream" if conn.recv(1) == b"" else "data", flush=True)
except TimeoutError:
    print("still established", flush=True)
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SYNPROXY, *args], capture_output=True, text=True, env=os.environ)


def target(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@pytest.fixture(scope="module")
def mss_lab() -> Iterator[Lab]:
    """A local-mode lab whose server listens on PORTS, each announcing its MSS, and on SMALL_WINDOW_PORT,
    IPv4 and IPv6."""
    specs = [f"{port}:{mss}:0" for mss, port in PORTS.items()] + [f"{SMALL_WINDOW_PORT}:0:1024"]
    with Lab(mode="local") as lab:
        proc = lab.popen("server", [PYTHON, "-c", SERVE, *specs], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield lab


@pytest.mark.e2e
@pytest.mark.parametrize("path", ["lo", "veth"])
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mss", list(PORTS))
def test_probe_reports_the_announced_mss(mss_lab: Lab, path: str, family: int, mss: int) -> None:
    assert_probe_says(mss_lab, path, family, PORTS[mss], min(mss or 65535, DEFAULT_MSS[path, family]))


@pytest.mark.e2e
@pytest.mark.parametrize("path", ["lo", "veth"])
@pytest.mark.parametrize("family", [4, 6])
def test_probe_reports_the_mss_of_a_server_with_a_small_window(mss_lab: Lab, path: str, family: int) -> None:
    """SO_RCVBUF 1024 makes the server's window smaller than two segments; its MSS is still the default."""
    assert_probe_says(mss_lab, path, family, SMALL_WINDOW_PORT, DEFAULT_MSS[path, family])


def assert_probe_says(lab: Lab, path: str, family: int, port: int, want: int) -> None:
    """`synproxy probe` from the server itself (lo) or from the client (veth) reports MSS `want`, exactly."""
    if path == "lo":
        host, addr = "server", "127.0.0.1" if family == 4 else "::1"
    else:
        host, addr = "client", lab.addr("server", family)
    probed = target(addr, port)
    out = lab.run(host, [SYNPROXY, "probe", probed]).stdout
    assert out.startswith(f"{probed}: mss {want}, window scale "), out
    assert f"synproxy run --mss {want} " in out and "estimate" not in out, out


@pytest.mark.e2e
@pytest.mark.parametrize("family", [4, 6])
def test_probe_of_the_hosts_own_address_says_the_mss_came_over_lo(mss_lab: Lab, family: int) -> None:
    """From the server's host its own address is reached over lo: the server announces lo's MSS,
    and the probe said to mimic it with --mss 65495. Now it names the interface that holds the
    address and suggests that interface's MSS (MTU 1500: 1460 for IPv4, 1440 for IPv6)."""
    addr = mss_lab.addr("server", family)
    probed = target(addr, PORTS[0])
    out = mss_lab.run("server", [SYNPROXY, "probe", probed]).stdout
    lo_mss, net_mss = DEFAULT_MSS["lo", family], DEFAULT_MSS["veth", family]
    assert out.startswith(f"{probed}: mss {lo_mss}, window scale "), out
    assert f"{addr} is this host's own address (on " in out and f"(MTU 1500) see at most {net_mss}" in out, out
    assert f"synproxy run --mss {net_mss} " in out, out


@pytest.mark.e2e
def test_without_cap_net_admin_the_mss_is_called_an_estimate(mss_lab: Lab) -> None:
    """Repair mode needs CAP_NET_ADMIN; without it the probe falls back to the kernel's send MSS and says so."""
    res = mss_lab.run("server", ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYNPROXY, "probe",
                                 f"127.0.0.1:{PORTS[0]}"])
    mss = int(res.stdout.split("mss ", 1)[1].split()[0])
    assert mss < 65495, res.stdout  # over lo the send MSS is clamped to half the server's window
    assert "estimate" in res.stdout and "CAP_NET_ADMIN" in res.stdout, res.stdout


@pytest.mark.e2e
def test_probe_closes_with_a_fin(mss_lab: Lab) -> None:
    """The probe leaves repair mode before closing: a socket closed in repair mode sends neither
    FIN nor RST, and the server's end would stay established."""
    server = mss_lab.popen("server", [PYTHON, "-c", ONE_CONNECTION], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    mss_lab.run("server", [SYNPROXY, "probe", f"127.0.0.1:{ONE_CONNECTION_PORT}"])
    assert server.stdout.readline().strip() == "end of stream"


def test_target_without_port_names_the_probe_target() -> None:
    for bad in ("10.99.0.2", "fd00::2:80", "[fd00::2]", ":80", "10.99.0.2:0", "10.99.0.2:http"):
        res = cli("probe", bad)
        assert res.returncode == 2, (bad, res)
        assert res.stderr == f"synproxy: probe target must be HOST:PORT (IPv6: [ADDR]:PORT), got {bad!r}\n", res.stderr


@pytest.mark.parametrize("value", ["0", "-1"])
def test_timeout_must_be_positive(value: str) -> None:
    res = cli("probe", "127.0.0.1:9", "--timeout", value)
    assert res.returncode == 2 and "Invalid value for '--timeout'" in res.stderr and "x>0" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_connect_timeout_is_one_line() -> None:
    """A listener whose accept queue is full drops further SYNs: the probe gets no SYN-ACK."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        addr = target(*full.getsockname())
        with socket.create_connection(full.getsockname()):  # fills the queue of length 0
            res = cli("probe", addr, "--timeout", "0.5")
    assert res.returncode == 1, res
    assert res.stderr == f"synproxy: no SYN-ACK from {addr} within 0.5 s (is a firewall dropping the SYN?)\n", res.stderr


def test_refused_is_one_line() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: the SYN is answered with a RST
        addr = target(*closed.getsockname())
        res = cli("probe", addr)
    assert res.returncode == 1 and res.stderr == f"synproxy: cannot connect to {addr}: Connection refused\n", res.stderr


def test_help_reads_well() -> None:
    out = cli("probe", "--help").stdout
    assert "--timeout SECONDS" in out and "Seconds to wait for the server's SYN-ACK" in out, out
