"""The queue bindings against the real kernel: batches, verdicts, rewrites, limits, flags.

A consumer in the lab's server namespace binds an NFQUEUE that catches UDP to a
test port; the client sends datagrams; what the server's socket receives shows
what each verdict did.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from synproxy.lab import Lab

pytestmark = pytest.mark.e2e

PORT = 9111
QUEUE = 31

# Runs in the server namespace: binds the queue, handles packets as told, reports JSON.
CONSUMER = r"""
import json, select, socket, sys, time
from synproxy.shell import Binding, open_queue

binding, family, want, maxlen, fail_open, action = sys.argv[1:7]
want, maxlen = int(want), int(maxlen)
q = open_queue(Binding(binding), 31, maxlen, fail_open == "1")
af = socket.AF_INET if family == "4" else socket.AF_INET6
rx = socket.socket(af, socket.SOCK_DGRAM)
rx.bind(("::" if family == "6" else "0.0.0.0", 9111))
rx.setblocking(False)
print("bound", flush=True)
time.sleep(1.5 if action != "idle" else 4)  # let the client's datagrams queue up

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

seen, batches, handles, lengths, got = 0, [], set(), [], []
deadline = time.time() + 10
while action != "idle" and seen < want and time.time() < deadline:
    batch = q.receive()
    if not batch:
        select.select([q], [], [], 0.1)
        continue
    batches.append(len(batch))
    for handle, pkt in batch:
        seen += 1
        handles.add(id(handle) if binding == "netfilterqueue" else handle)
        lengths.append(len(pkt))
        l3 = 20 if family == "4" else 40
        body = pkt[l3 + 8:]
        if action == "pass":
            q.verdict(handle, True)
        elif action in ("drop", "drop-later"):
            q.verdict(handle, False)
        elif int(body[-2:]) % 2:
            q.verdict(handle, False)
        else:  # rewrite: upper-case the payload; scapy recomputes lengths and checksums
            new = (IP if family == "4" else IPv6)(pkt)
            new[UDP].remove_payload()
            new[UDP].add_payload(Raw(body.upper()))
            del new[UDP].chksum
            q.verdict(handle, True, bytes(new))
    q.flush(drops_may_wait=action == "drop-later")
time.sleep(0.5)
def queued():
    return [int(line.split()[2]) for line in open("/proc/net/netfilter/nfnetlink_queue") if line.split()[0] == "31"]
held = queued()
if action == "drop-later":
    q.flush()
    time.sleep(0.2)
waiting = queued()
while True:
    try:
        got.append(rx.recv(65536).decode(errors="replace")[:40])
    except BlockingIOError:
        break
q.close()
print(json.dumps({"seen": seen, "held": held, "waiting": waiting, "batches": batches, "distinct": len(handles), "lengths": lengths,
                  "got": got}), flush=True)
"""

CLIENT = r"""
import socket, sys, time
family, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
af = socket.AF_INET if family == "4" else socket.AF_INET6
s = socket.socket(af, socket.SOCK_DGRAM)
for i in range(count):
    body = b"msg-%02d" % i
    s.sendto(body.rjust(size, b".") if size else body, (sys.argv[4], 9111))
"""


def consume(lab: Lab, binding: str, family: int, count: int, *, maxlen: int = 1024, fail_open: bool = False,
            action: str = "rewrite", size: int = 0) -> dict:
    ip = "ip6tables" if family == 6 else "iptables"
    lab.run("server", [ip, "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", str(PORT),
                       "-j", "NFQUEUE", "--queue-num", str(QUEUE)])
    proc = lab.popen("server", [lab_python(), "-c", CONSUMER, binding, str(family), str(count), str(maxlen),
                                "1" if fail_open else "0", action],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "bound", proc.stderr.read() if proc.stderr else ""
    lab.python("client", CLIENT, str(family), str(count), str(size), lab.addr("server", family))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out)


def lab_python() -> str:
    import sys

    return sys.executable


@pytest.mark.parametrize("binding", ["netlink", "netfilterqueue"])
@pytest.mark.parametrize("family", [4, 6])
def test_verdicts_drop_accept_and_rewrite(lab: Lab, binding: str, family: int) -> None:
    """Every queued datagram gets its own verdict: odd ones dropped, even ones rewritten and delivered."""
    res = consume(lab, binding, family, 40)
    assert res["seen"] == 40 and res["distinct"] == 40
    assert sorted(res["got"]) == [f"MSG-{i:02d}" for i in range(0, 40, 2)]
    assert res["waiting"] == [0]  # every packet got its verdict
    if binding == "netlink":  # 40 datagrams waited: read 8 per system call (the consumer's batch)
        assert max(res["batches"]) > 1


def test_netlink_batches_are_bounded(lab: Lab) -> None:
    """One receive() returns at most `batch` packets (64) and never loses one between batches."""
    res = consume(lab, "netlink", 4, 150, action="pass")
    assert res["seen"] == 150
    assert max(res["batches"]) == 64, res["batches"]
    assert sorted(res["got"]) == sorted(f"msg-{i:02d}" for i in range(150))


def test_netlink_drops_whole_batches(lab: Lab) -> None:
    """Batches of drops go out as one batch verdict: nothing is delivered, nothing is left queued."""
    res = consume(lab, "netlink", 4, 150, action="drop")
    assert res["seen"] == 150 and res["got"] == []
    assert res["waiting"] == [0]


def test_netlink_drops_may_wait_for_one_write(lab: Lab) -> None:
    """Held drop verdicts keep their packets queued (fewer than 64) until a plain flush drops them all."""
    res = consume(lab, "netlink", 4, 40, action="drop-later")
    assert res["seen"] == 40 and res["got"] == []
    assert res["held"] == [40]  # nothing written yet: all 40 still queued
    assert res["waiting"] == [0]


def test_netlink_copies_jumbo_packets_whole(make_lab) -> None:  # type: ignore[no-untyped-def]
    """With MTU 9000, an 8000-byte datagram reaches userspace whole (NetfilterQueue stops at 4016)."""
    lab = make_lab(mode="local", mtu=9000)
    res = consume(lab, "netlink", 4, 2, action="pass", size=8000)
    assert res["lengths"] == [8028, 8028]
    assert len(res["got"]) == 2


@pytest.mark.parametrize("fail_open", [False, True])
def test_full_queue_fails_closed_unless_asked(lab: Lab, fail_open: bool) -> None:
    """A full queue drops what does not fit (default) or lets it pass (fail-open flag)."""
    res = consume(lab, "netlink", 4, 20, maxlen=4, fail_open=fail_open, action="idle")
    # The consumer never reads: 4 packets wait in the queue and are dropped when it closes.
    assert len(res["got"]) == (16 if fail_open else 0), res["got"]


def test_second_binder_is_refused_with_one_sentence(lab: Lab) -> None:
    """Only one process may serve a queue; the second gets the operator's sentence."""
    holder = lab.popen("server", [lab_python(), "-c",
                                  "import time; from synproxy.nfqueue import NfQueue, QueueConfig; "
                                  "q = NfQueue(QueueConfig(31)); print('bound', flush=True); time.sleep(20)"],
                       stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
    t0 = time.monotonic()
    res = lab.python("server", "from synproxy.shell import Binding, open_queue\n"
                     "open_queue(Binding.NETLINK, 31, 100, False)", check=False)
    assert res.returncode != 0 and time.monotonic() - t0 < 10
    assert "ShellError: cannot bind NFQUEUE 31" in res.stderr
    assert "another process holds it (another synproxy on the same --queue?)" in res.stderr


def test_a_verdict_to_another_queue_carries_its_number_and_the_fail_open_flag() -> None:
    """NF_QUEUE with the queue number in the upper 16 bits (and the bypass flag when failing open)."""
    import struct as _struct

    from synproxy import nfqueue as N

    for fail_open, want in ((False, 3 | 7 << 16), (True, 3 | 7 << 16 | 0x8000)):
        q = N.NfQueue.__new__(N.NfQueue)
        q.config, q._res_id, q._pending = N.QueueConfig(5, fail_open=fail_open), 0, []
        q.pass_to(0x01000000, 7)
        (msg,) = q._pending
        verdict, packet_id = _struct.unpack_from(">II", msg, 24)
        assert verdict == want and _struct.unpack_from("=I", msg, 28)[0] == 0x01000000
