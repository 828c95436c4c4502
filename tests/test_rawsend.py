"""The batched raw sender against the real kernel, and the shell's ordering of sends and verdicts.

RawSender queues packets and sends them with sendmmsg(2); these tests prove that
what leaves is what was queued, in order (a packet too long for a slot included),
that a refused packet is counted by errno without losing the rest, and that the
shell keeps sends and accept verdicts in the order the engine made them.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any

import pytest

from synproxy.engine import Accept, Direction, Drop, Send
from synproxy.lab import Lab
from synproxy.shell import Shell, ShellStats

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


class _Wire:
    """What left, in order: sends when the sender flushes, verdicts when the queue does."""

    def __init__(self) -> None:
        self.out: list[str] = []


class _Sender:
    def __init__(self, wire: _Wire) -> None:
        self.wire, self.queued = wire, []
        self.sent: Counter[str] = Counter()

    @property
    def pending(self) -> bool:
        return bool(self.queued)

    def send(self, family: int, dst: bytes, data: bytes, kind: str) -> None:
        self.queued.append(data.decode())

    def flush(self) -> None:
        self.wire.out.extend(self.queued)
        self.queued = []


class _BatchedQueue:
    """Like the netlink binding: verdicts leave on flush()."""

    def __init__(self, wire: _Wire) -> None:
        self.wire, self.queued = wire, []

    def verdict(self, handle: Any, accept: bool, payload: bytes | None = None) -> None:
        self.queued.append(f"{'accept' if accept else 'drop'} {handle}")

    def flush(self, drops_may_wait: bool = False) -> None:
        self.wire.out.extend(self.queued)
        self.queued = []


class _ImmediateQueue(_BatchedQueue):
    """Like NetfilterQueue: a verdict leaves when it is given."""

    def verdict(self, handle: Any, accept: bool, payload: bytes | None = None) -> None:
        self.wire.out.append(f"{'accept' if accept else 'drop'} {handle}")


class _ScriptedEngine:
    def __init__(self, script: dict[bytes, list[Any]]) -> None:
        self.script = script

    def handle_raw(self, data: bytes, now: float) -> list[Any]:
        return self.script[data]


def _send(name: str) -> Send:
    return Send(4, b"\x01\x02\x03\x04", name.encode(), Direction.FROM_SERVER, "data")


@pytest.mark.parametrize("queue_kind", [_BatchedQueue, _ImmediateQueue])
def test_shell_releases_sends_and_accepts_in_the_order_the_engine_made_them(queue_kind: type) -> None:
    """An accept never overtakes an earlier packet's send, and a send never overtakes an earlier accept."""
    script = {
        b"p1": [Drop("syn_answered"), _send("synack1")],
        b"p2": [Accept(), _send("ack-for-p2")],  # its send first, then its verdict
        b"p3": [Drop("syn_answered"), _send("synack3")],  # after p2's accept
        b"p4": [Accept()],
        b"p5": [Drop("x")],
    }
    wire = _Wire()
    shell = Shell.__new__(Shell)  # no queues or sockets: the batch logic alone
    shell.engine, shell.clock = _ScriptedEngine(script), lambda: 0.0  # type: ignore[assignment]
    shell.stats = ShellStats()
    shell.sender = _Sender(wire)  # type: ignore[assignment]
    queue = queue_kind(wire)
    shell._handle_batch(queue, [(i, f"p{i}".encode()) for i in range(1, 6)])
    order = [w for w in wire.out if not w.startswith("drop")]
    assert order == ["synack1", "ack-for-p2", "accept 2", "synack3", "accept 4"]
    assert sorted(w for w in wire.out if w.startswith("drop")) == ["drop 1", "drop 3", "drop 5"]
