"""The shell without a kernel: the order in which sends and verdicts leave, and
how many packets its loop asks each queue for.

The SYN queue is read in rounds of Shell.SYN_BATCH while traffic waits and of
Shell.SYN_BATCH_IDLE while the traffic queue is empty (fewer rounds, so fewer
system calls per SYN under a flood).
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

import pytest

from synproxy.engine import Accept, Direction, Drop, Hold, PassOn, Release, Send
from synproxy.nfqueue import QueueStatus
from synproxy.shell import OverloadGate, Shell, ShellStats


class _Queue:
    """A queue whose fd is readable while it holds packets; records every read size."""

    def __init__(self, name: str, packets: int, reads: list[tuple[str, int]]) -> None:
        self.name, self.left, self.reads = name, packets, reads
        self.in_hand = 0  # read and without a verdict
        self._r, self._w = socket.socketpair()
        self._signal()

    def _signal(self) -> None:
        self._r.setblocking(False)
        try:
            while self._r.recv(64):
                pass
        except BlockingIOError:
            pass
        if self.left:
            self._w.send(b"x")

    def fileno(self) -> int:
        return self._r.fileno()

    def receive(self, limit: int = 0) -> list[tuple[Any, bytes]]:
        self.reads.append((self.name, limit))
        n = min(limit, self.left)
        self.left -= n
        self.in_hand = n
        self._signal()
        return [(i, b"pkt") for i in range(n)]

    def verdict(self, handle: Any, accept: bool, payload: bytes | None = None) -> None:
        self.in_hand -= 1

    def flush(self, drops_may_wait: bool = False) -> None:
        pass

    @property
    def drops_waiting(self) -> int:
        return 0

    @property
    def unanswered(self) -> int:
        return self.in_hand

    def close(self) -> None:
        self._r.close()
        self._w.close()


class _Engine:
    """Drops everything; stops the shell once both queues are empty; notes `overloaded` per packet."""

    def __init__(self, shell: Shell, queues: list[_Queue]) -> None:
        self.shell, self.queues = shell, queues
        self.overloaded = False
        self.seen: list[bool] = []

    def handle_raw(self, data: bytes, now: float) -> list[Any]:
        self.seen.append(self.overloaded)
        if not any(q.left for q in self.queues):
            self.shell.stop()
            self.queues[0]._w.send(b"x")  # so the loop's last poll returns at once
        return [Drop("x")]

    def next_deadline(self) -> None:
        return None


class _Depth:
    """The kernel's figures for the SYN queue: it holds everything not yet given a verdict,
    and it has dropped SYNs (so the gate lets the proxy shed from the first batch), unless
    `drops` is False."""

    def __init__(self, queue: _Queue, drops: bool = True) -> None:
        self.queue, self.asked, self.drops = queue, 0, drops

    def status(self) -> QueueStatus:
        self.asked += 1
        dropped = self.asked if self.drops else 0
        return QueueStatus(1, self.queue.left + self.queue.in_hand, dropped, 0, 0)  # the batch in hand counts too


def _run(traffic: int, syns: int, shed: bool = False, engine_log: list[bool] | None = None,
         depth_log: list[int] | None = None, kernel_drops: bool = True) -> list[tuple[str, int]]:
    reads: list[tuple[str, int]] = []
    queues = [_Queue("traffic", traffic, reads), _Queue("syn", syns, reads)]
    shell = Shell.__new__(Shell)  # no kernel queues or sockets: the loop alone
    engine = _Engine(shell, queues)
    shell.engine = engine  # type: ignore[assignment]
    shell.sender, shell.stats, shell.clock = _Sender(_Wire()), ShellStats(), lambda: 0.0  # type: ignore[assignment]
    shell.on_tick, shell._stop, shell._next_tick, shell._service_due = None, False, 0.0, 0.0
    shell.overload_backlog, shell.fail_open = Shell.OVERLOAD_BACKLOG, False
    depth = _Depth(queues[1], kernel_drops) if shed else None
    try:
        shell._serve(queues, depth)  # type: ignore[arg-type]
    finally:
        for q in queues:
            q.close()
    if engine_log is not None:
        engine_log.extend(engine.seen)
    if depth_log is not None and depth is not None:
        depth_log.append(depth.asked)
    return reads


def test_syns_are_read_in_large_rounds_while_no_traffic_waits() -> None:
    reads = _run(traffic=0, syns=3 * Shell.SYN_BATCH_IDLE + 5)
    assert [n for q, n in reads if q == "syn"] == [Shell.SYN_BATCH_IDLE] * 4
    assert reads[0] == ("traffic", Shell.BATCH)  # traffic is looked at first, found empty


def test_syns_are_read_in_small_rounds_while_traffic_waits() -> None:
    # Traffic for three full rounds (TRAFFIC_BATCHES batches each): the SYN queue gets
    # small rounds meanwhile, and large ones once the traffic queue is empty.
    traffic = 3 * Shell.TRAFFIC_BATCHES * Shell.BATCH
    reads = _run(traffic=traffic, syns=10 * Shell.SYN_BATCH)
    syn_reads = [n for q, n in reads if q == "syn"]
    assert syn_reads[:3] == [Shell.SYN_BATCH] * 3
    assert set(syn_reads[3:]) == {Shell.SYN_BATCH_IDLE}
    assert sum(n for q, n in reads if q == "traffic") >= traffic


def test_syns_get_a_turn_after_every_traffic_batch() -> None:
    """A busy traffic queue (a download through the proxy) must not starve new connections: with
    8 traffic batches per round, a 7,000 SYN/s flood beside back-to-back downloads overflowed the
    SYN queue (8,394 drops; 12% of connections waited for a SYN retransmission)."""
    reads = _run(traffic=6 * Shell.BATCH, syns=10 * Shell.SYN_BATCH)
    assert reads[:12] == [("traffic", Shell.BATCH), ("syn", Shell.SYN_BATCH)] * 6


def test_a_full_syn_batch_with_a_long_queue_behind_it_is_handled_overloaded() -> None:
    """Engine.overloaded is set for exactly the SYN batches that found OVERLOAD_BACKLOG or more
    SYNs waiting behind them once the kernel has dropped some (here it keeps dropping: the
    first look only learns its counter), and never for traffic."""
    backlog, batch = Shell.OVERLOAD_BACKLOG, Shell.SYN_BATCH_IDLE
    syns = backlog + 4 * batch + 5  # four batches leave the backlog or more behind them
    seen: list[bool] = []
    asked: list[int] = []
    _run(traffic=0, syns=syns, shed=True, engine_log=seen, depth_log=asked)
    assert len(seen) == syns
    overloaded = [seen[i * batch] for i in range(syns // batch + 1)]
    # Batch k leaves syns - (k + 1) * batch behind it.
    assert overloaded == [k > 0 and syns - (k + 1) * batch >= backlog for k in range(syns // batch + 1)]
    assert overloaded[:4] == [False, True, True, True] and not any(overloaded[4:])
    assert all(seen[i] == seen[i - i % batch] for i in range(syns))  # a whole batch either way
    assert asked == [syns // batch]  # only full batches ask the kernel


def test_a_burst_that_fits_the_queue_is_not_overload() -> None:
    """1,000 connects at once fit the 1,024-SYN queue: the kernel drops none, so the proxy sheds none."""
    gate = OverloadGate(512)
    t = 100.0
    for waiting in (936, 872, 808, 744, 680, 616, 552, 488, 424):
        assert not gate.update(waiting, 0, t)
        t += 0.05  # however slowly it drains
    assert not gate.update(0, 0, t)


def test_shedding_starts_with_kernel_drops_and_lasts_while_behind_within_exit() -> None:
    gate = OverloadGate(512)
    t = 100.0
    assert not gate.update(900, 0, t)
    assert gate.update(1000, 37, t + 0.001)  # the kernel dropped SYNs: shed
    assert not gate.update(100, 37, t + 0.01)  # caught up for a moment: this batch is answered
    assert gate.update(520, 37, t + 0.02)  # behind again within EXIT: shed, no new drop needed
    assert not gate.update(0, 37, t + 0.5)
    later = t + 0.02 + OverloadGate.EXIT + 0.01
    assert not gate.update(600, 37, later)  # EXIT passed without being behind: needs drops again
    assert gate.update(600, 50, later + 0.001)
    assert not gate.update(600, 60, later - 100)  # the clock stepped back: start over, from then
    assert not gate.update(600, 60, later - 99.99)
    assert gate.update(600, 61, later - 99.98)


def test_a_full_queue_starts_shedding_without_a_drop() -> None:
    """--queue-bypass: the kernel passes what does not fit to the server and counts no drop, so a full
    queue must start the shedding (it never did: the server got the flood's overflow unprotected)."""
    gate = OverloadGate(512)
    assert not gate.update(900, 0, 100.0)
    assert gate.update(1000, 0, 100.001, full=True)
    assert gate.update(600, 0, 100.01)  # behind within EXIT: still shedding
    assert not gate.update(600, 0, 101.5)  # EXIT passed: neither full nor dropping, so not shed


def test_drops_seen_long_ago_do_not_start_shedding() -> None:
    gate = OverloadGate(512)
    assert not gate.update(0, 10, 100.0)
    # Drops happened some time in the next ten minutes; the next full batch is a burst.
    assert not gate.update(800, 500, 700.0)
    assert not gate.update(700, 500, 700.01)


def test_shedding_starts_at_a_full_queue_before_the_kernel_drops() -> None:
    """The kernel's queue has room beyond SYN_QUEUE_FULL (SYN_QUEUE_ROOM), so a queue that long
    counts as full and starts the shedding without a drop; one SYN less does not."""
    batch = Shell.SYN_BATCH_IDLE
    for waiting, shed in ((Shell.SYN_QUEUE_FULL, True), (Shell.SYN_QUEUE_FULL - 1, False)):
        seen: list[bool] = []
        _run(traffic=0, syns=waiting, shed=True, engine_log=seen, kernel_drops=False)
        assert seen[0] is shed and seen[batch] is shed, waiting
    assert Shell.SYN_QUEUE_ROOM > Shell.SYN_QUEUE_FULL


@pytest.mark.parametrize("backlog, depth_fails, room", [
    (Shell.OVERLOAD_BACKLOG, False, Shell.SYN_QUEUE_ROOM),
    (0, False, Shell.SYN_QUEUE_FULL),  # no shedding: the kernel drops beyond the short queue
    (Shell.OVERLOAD_BACKLOG, True, Shell.SYN_QUEUE_FULL),  # no queue length, no shedding: likewise
])
def test_the_syn_queue_has_room_beyond_full_only_while_shedding(monkeypatch: pytest.MonkeyPatch, backlog: int,
                                                                 depth_fails: bool, room: int) -> None:
    opened: list[tuple[int, int]] = []

    class _Opened:
        def close(self) -> None:
            pass

    def fake_open(binding: Any, queue_num: int, maxlen: int, fail_open: bool, batch: int) -> _Opened:
        opened.append((queue_num, maxlen))
        return _Opened()

    class _FakeDepth:
        def __init__(self, queue_num: int) -> None:
            if depth_fails:
                raise OSError("no such file")

        def close(self) -> None:
            pass

    monkeypatch.setattr("synproxy.shell.open_queue", fake_open)
    monkeypatch.setattr("synproxy.shell.QueueDepth", _FakeDepth)
    shell = Shell.__new__(Shell)  # no kernel queues or sockets
    shell.binding, shell.queue_num, shell.syn_queue_num, shell.fail_open = None, 7, 8, False  # type: ignore[assignment]
    shell._queue_maxlen, shell.overload_backlog, shell.sender = 8192, backlog, _Opened()  # type: ignore[assignment]
    monkeypatch.setattr(Shell, "_serve", lambda self, queues, depth: None)
    shell.run()
    assert opened == [(7, 8192), (8, room)]


def test_no_overload_without_a_queue_length() -> None:
    """--overload-backlog 0: the shell never asks, the engine is never told."""
    seen: list[bool] = []
    _run(traffic=0, syns=Shell.OVERLOAD_BACKLOG * 3, engine_log=seen)
    assert seen and not any(seen)


def test_traffic_batches_are_never_overloaded() -> None:
    seen: list[bool] = []
    _run(traffic=Shell.OVERLOAD_BACKLOG * 3, syns=0, shed=True, engine_log=seen)
    assert seen and not any(seen)


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
        self.queued.append(f"{'accept' if accept else 'drop'} {handle}" + (f" as {payload.decode()}" if payload else ""))

    def flush(self, drops_may_wait: bool = False) -> None:
        self.wire.out.extend(self.queued)
        self.queued = []


    def pass_to(self, handle: Any, queue_num: int) -> None:
        self.queued.append(f"queue {handle} to {queue_num}")


class _ImmediateQueue(_BatchedQueue):
    """Like NetfilterQueue: a verdict leaves when it is given."""

    def verdict(self, handle: Any, accept: bool, payload: bytes | None = None) -> None:
        self.wire.out.append(f"{'accept' if accept else 'drop'} {handle}" + (f" as {payload.decode()}" if payload else ""))


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
    shell.sender, shell._held = _Sender(wire), {}  # type: ignore[assignment]
    queue = queue_kind(wire)
    shell._handle_batch(queue, [(i, f"p{i}".encode()) for i in range(1, 6)])
    order = [w for w in wire.out if not w.startswith("drop")]
    assert order == ["synack1", "ack-for-p2", "accept 2", "synack3", "accept 4"]
    assert sorted(w for w in wire.out if w.startswith("drop")) == ["drop 1", "drop 3", "drop 5"]


class _TimerEngine(_ScriptedEngine):
    def __init__(self, script: dict[bytes, list[Any]], timer: list[Any]) -> None:
        super().__init__(script)
        self.timer = timer

    def next_deadline(self) -> float:
        return 0.0

    def handle_timer(self, now: float) -> list[Any]:
        return self.timer


@pytest.mark.parametrize("queue_kind", [_BatchedQueue, _ImmediateQueue])
def test_held_packets_get_their_verdicts_when_released_in_the_engines_order(queue_kind: type) -> None:
    """Client data held during the server handshake keeps its queue slot without a verdict, and
    its release is a verdict: after the sends made before it, before those made after it and
    before any later packet's; a release from a timer (the handshake gave up) drops it."""
    script = {
        b"data1": [Hold(11), _send("syn-to-server")],
        b"data2": [Hold(12)],
        b"data3": [Hold(13)],
        b"other": [Accept()],
        b"synack": [Drop("synack_stolen"), Release(11, Accept(b"d1")), Release(12, Accept(b"d2")),
                    _send("window-update")],
        b"data4": [Accept(b"d4")],
    }
    wire = _Wire()
    shell = Shell.__new__(Shell)
    shell.engine, shell.clock = _TimerEngine(script, [Release(13, Drop("held_discarded"))]), lambda: 0.0  # type: ignore[assignment]
    shell.stats, shell.sender, shell._held = ShellStats(), _Sender(wire), {}  # type: ignore[assignment]
    shell._next_tick, shell.on_tick = float("inf"), None
    queue = queue_kind(wire)
    shell._handle_batch(queue, [(1, b"data1"), (2, b"data2"), (3, b"data3"), (4, b"other")])
    assert wire.out == ["syn-to-server", "accept 4"] and shell.held == 3
    shell._handle_batch(queue, [(5, b"synack"), (6, b"data4")])
    assert [w for w in wire.out[2:] if not w.startswith("drop")] == [
        "accept 1 as d1", "accept 2 as d2", "window-update", "accept 6 as d4"]
    assert [w for w in wire.out[2:] if w.startswith("drop")] == ["drop 5"]  # a drop may leave at any time
    assert shell.held == 1
    shell._service(0.0)
    assert wire.out[-1] == "drop 3" and shell.held == 0


@pytest.mark.parametrize(("pass_on_queue", "want"), [(7, "queue 1 to 7"), (None, "accept 1")])
def test_a_packet_the_engine_passes_on_goes_to_the_next_worker_or_through(pass_on_queue: int | None,
                                                                         want: str) -> None:
    """An ICMP error about a connection this worker does not hold: the next worker's queue, or
    (the last worker) through unchanged."""
    wire = _Wire()
    shell = Shell.__new__(Shell)
    shell.engine, shell.clock = _ScriptedEngine({b"icmp": [PassOn()]}), lambda: 0.0  # type: ignore[assignment]
    shell.stats, shell.sender, shell.pass_on_queue = ShellStats(), _Sender(wire), pass_on_queue  # type: ignore[assignment]
    shell._handle_batch(_BatchedQueue(wire), [(1, b"icmp")])
    assert wire.out == [want]


@pytest.mark.parametrize(("backlog", "fail_open", "want"), [(512, False, 512), (512, True, 1), (0, True, 0), (0, False, 0)])
def test_fail_open_sheds_behind_any_full_batch(backlog: int, fail_open: bool, want: int) -> None:
    """With --queue-bypass an overflow crosses to the server unprotected: once behind, a worker
    sheds every full batch with a SYN behind it. 0 (shedding off) stays off."""
    assert OverloadGate(backlog, fail_open).backlog == want
