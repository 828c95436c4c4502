"""The batched raw sender against the real kernel.

RawSender queues packets and sends them with sendmmsg(2); these tests prove that
what leaves is what was queued, in order (a packet too long for a slot included),
and that a refused packet is counted by errno without losing the rest. The
shell's ordering of sends and verdicts is tested in test_shell.py.
"""

from __future__ import annotations

import json
import sys

import pytest

from synproxy.lab import Lab

PORT = 9122

# Runs in the server namespace: sends UDP datagrams to the client through RawSender.
SENDER = r"""
import json, socket, sys
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from synproxy.rawsend import RawSender

family, src, dst, bodies = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].split(",")
af = socket.AF_INET if family == 4 else socket.AF_INET6
sender = RawSender(0x5350)
for body in bodies:
    ip = IP(src=src, dst=dst) if family == 4 else IPv6(src=src, dst=dst)
    payload = body.encode() * (300 if body.startswith("big") else 1)  # longer than a slot
    to = dst
    if body == "refused":  # broadcast without SO_BROADCAST: the kernel says EACCES
        ip, to = IP(src=src, dst="255.255.255.255"), "255.255.255.255"
    sender.send(4 if body == "refused" else family, socket.inet_pton(af if body != "refused" else socket.AF_INET, to),
                bytes(ip / UDP(sport=4000, dport=9122) / payload), "data")
assert sender.pending, "nothing may leave before flush() while the batch has room"
sender.flush()
print(json.dumps({"sent": dict(sender.sent), "errors": dict(sender.errors)}), flush=True)
"""

RECEIVER = r"""
import json, socket, sys, time
af = socket.AF_INET if sys.argv[1] == "4" else socket.AF_INET6
rx = socket.socket(af, socket.SOCK_DGRAM)
rx.bind(("::" if sys.argv[1] == "6" else "0.0.0.0", 9122))
rx.settimeout(3)
print("ready", flush=True)
got = []
try:
    while len(got) < int(sys.argv[2]):
        got.append(rx.recv(65536).decode()[:5])
except socket.timeout:
    pass
print(json.dumps(got), flush=True)
"""


@pytest.mark.e2e
@pytest.mark.parametrize("family", [4, 6])
def test_queued_packets_leave_on_flush_in_order_and_a_refused_one_is_counted(family: int) -> None:
    """Datagrams queued with RawSender arrive in queue order, a long one among them; a refused one costs only itself."""
    bodies = ["one", "two", "big", "refused", "three"] if family == 4 else ["one", "two", "big", "three"]
    with Lab(mode="local") as lab:
        rx = lab.popen("client", [sys.executable, "-c", RECEIVER, str(family), str(4)], stdout=-1, text=True)
        assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
        out = lab.python("server", SENDER, str(family), lab.addr("server", family), lab.addr("client", family),
                         ",".join(bodies)).stdout
        report = json.loads(out.splitlines()[-1])
        got = json.loads(rx.communicate(timeout=10)[0].splitlines()[-1])
    assert got == ["one", "two", "bigbi", "three"]  # the long one: "big" * 300, first 5 characters
    assert report["sent"] == {"data": 4}
    assert report["errors"] == ({"EACCES": 1} if family == 4 else {})


# ---------------------------------------------------------------- ordering in the shell
