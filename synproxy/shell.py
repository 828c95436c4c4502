"""The thin I/O shell around the engine: NFQUEUE in, verdicts and raw sockets out.

It holds no protocol logic: it reads the clock, hands each queued packet to the
engine, carries out the actions it returns and calls the engine's timers.
Packets come in batches (one system call for up to 64); their verdicts, and the
packets the engine made for them (rawsend, sendmmsg), go out together after the
batch, so a flood costs few system calls per packet.
"""

from __future__ import annotations

import bisect
import enum
import errno
import logging
import select
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .engine import Direction, Drop, Engine, Hold, PassOn, Release, Send
from .nfqueue import MAX_COPY_RANGE, NfQueue, QueueConfig, QueueDepth
from .rawsend import RawSender, SenderError

log = logging.getLogger("synproxy")

SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NFQ_COPY_RANGE = 4016  # NetfilterQueue's ceiling; the engine keeps every segment below it


class ShellError(RuntimeError):
    """Something the operator must fix before the daemon can run (one sentence)."""


@dataclass
class ShellStats:
    """What only the shell can see."""

    packets: int = 0
    send_errors: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    handler_errors: int = 0
    handling: "LatencyHistogram" = field(default_factory=lambda: LatencyHistogram())


class LatencyHistogram:
    """Per-packet handling time in fixed buckets: cheap enough for every packet."""

    BOUNDS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 2e-2)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.total = 0.0

    def observe(self, seconds: float, count: int = 1) -> None:
        """Record `count` packets that took `seconds` each (a batch's mean)."""
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += count
        self.total += seconds * count


class OverloadGate:
    """Whether a worker is behind on its SYNs: the input Engine.overloaded.

    Shedding starts when the kernel drops SYNs because the queue is full, or the queue
    is found full (1,024 SYNs, Shell.SYN_QUEUE_FULL, of the kernel's 4,096; with
    --queue-bypass the kernel passes its overflow to the server instead, and counts
    nothing): only then would SYNs have been lost anyway, at random, without the room
    above. A burst that fits 1,024 SYNs is left alone: 1,000 connects at once from one
    host (a client pool reconnecting) drain in well under a second, and shedding
    whenever 512 were waiting made up to a third of them wait 1 s for their
    retransmission. From then on a full batch
    that finds `backlog` or more SYNs behind it is shed, until EXIT passes without
    one, so the queue stays near `backlog` instead of overflowing again.
    """

    EXIT = 1.0  # seconds without being behind before shedding needs the kernel to drop again

    # With --queue-bypass an overflow is not dropped but passed to the server unprotected (and
    # the legitimate SYNs in it fail), so once behind the worker sheds every full batch that
    # finds any SYN behind it, keeping the queue far from full. Under hping3's full speed on
    # this VM, with 512: 2-54% of the SYNs crossed over seven runs; with 64: 1-5%; with this:
    # 0.1-2.1% over six runs, no legitimate connection failing (0-2 of ~213; with no shedding,
    # 66-73% crossed and 83-134 of ~220 failed), but 54% in a seventh: in local mode the server's
    # stack answering crossed SYNs takes CPU from the worker, which falls further behind.
    FAIL_OPEN_BACKLOG = 1

    def __init__(self, backlog: int, fail_open: bool = False) -> None:
        """`backlog` 0 never sheds; with `fail_open` (--queue-bypass) any other is FAIL_OPEN_BACKLOG."""
        self.backlog = min(backlog, self.FAIL_OPEN_BACKLOG) if fail_open else backlog
        self._shedding_until = float("-inf")
        self._dropped: int | None = None  # the queue's drop counter at the last look
        self._looked = float("-inf")

    def update(self, waiting: int, dropped: int, now: float, full: bool = False) -> bool:
        """After a full batch: `waiting` SYNs behind it, the queue's drop counter, and whether
        the queue is full. True: shed.

        A full queue counts as a drop: with --queue-bypass the kernel passes what does not fit
        to the server unprotected, and counts nothing."""
        if now < self._looked:  # the wall clock stepped back: start over from now
            self._shedding_until, self._dropped = float("-inf"), None
        fresh = full or (self._dropped is not None and dropped > self._dropped and now - self._looked < self.EXIT)
        self._dropped, self._looked = dropped, now
        if waiting < self.backlog:
            return False
        if fresh or now < self._shedding_until:
            self._shedding_until = now + self.EXIT
            return True
        return False


class Binding(enum.Enum):
    """How the daemon talks to the kernel's queue."""

    NETLINK = "netlink"  # synproxy.nfqueue: batched reads and verdicts, fail-open flag, 64 KiB copies
    NETFILTERQUEUE = "netfilterqueue"  # the NetfilterQueue package: one call per packet (fallback)

    @property
    def copy_range(self) -> int:
        """The longest packet this binding hands over whole (the engine caps every MSS to fit)."""
        return MAX_COPY_RANGE if self is Binding.NETLINK else NFQ_COPY_RANGE


class QueueReader(Protocol):
    """What the shell needs from a queue binding."""

    def fileno(self) -> int: ...
    def receive(self, limit: int = 0) -> list[tuple[Any, bytes]]: ...
    def verdict(self, handle: Any, accept: bool, payload: bytes | None = None) -> None: ...
    def pass_to(self, handle: Any, queue_num: int) -> None: ...
    def flush(self, drops_may_wait: bool = False) -> None: ...
    @property
    def unanswered(self) -> int: ...
    @property
    def drops_waiting(self) -> int: ...
    def close(self) -> None: ...


class NetfilterQueueReader:
    """The NetfilterQueue package behind the same batch interface (the fallback binding)."""

    def __init__(self, queue_num: int, maxlen: int) -> None:
        from netfilterqueue import NetfilterQueue

        self._nfq = NetfilterQueue()
        self._batch: list[tuple[Any, bytes]] = []
        self._held = 0  # packets retained without a verdict
        # The netlink socket must hold what the queue may: ~2 KiB per queued packet.
        self._nfq.bind(queue_num, self._collect, max_len=maxlen, range=NFQ_COPY_RANGE, sock_len=maxlen * 2048)
        nl = socket.socket(fileno=self._nfq.get_fd())
        try:
            nl.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        except OSError:
            pass
        finally:
            nl.detach()

    def _collect(self, pkt: Any) -> None:
        pkt.retain()  # the verdict comes after the callback returns
        self._held += 1
        self._batch.append((pkt, pkt.get_payload()))

    def fileno(self) -> int:
        return int(self._nfq.get_fd())

    def receive(self, limit: int = 0) -> list[tuple[Any, bytes]]:
        """Everything pending: NetfilterQueue drains the socket and cannot stop at `limit`."""
        self._nfq.run(block=False)  # drains what is pending through _collect
        batch, self._batch = self._batch, []
        return batch

    def verdict(self, handle: Any, accept: bool, payload: bytes | None = None) -> None:
        self._held -= 1
        if not accept:
            handle.drop()
            return
        if payload is not None:
            handle.set_payload(payload)
        handle.accept()

    def pass_to(self, handle: Any, queue_num: int) -> None:
        self.verdict(handle, True)  # NetfilterQueue gives no verdict to another queue: it passes unchanged

    def flush(self, drops_may_wait: bool = False) -> None:
        pass  # every verdict left when it was given

    @property
    def unanswered(self) -> int:
        return self._held

    @property
    def drops_waiting(self) -> int:
        return 0

    def close(self) -> None:
        self._nfq.unbind()


def open_queue(binding: Binding, queue_num: int, maxlen: int, fail_open: bool, batch: int = 64) -> QueueReader:
    """Bind the queue, or say in one sentence why not."""
    try:
        if binding is Binding.NETLINK:
            return NfQueue(QueueConfig(queue_num, maxlen=maxlen, fail_open=fail_open, batch=batch))
        return NetfilterQueueReader(queue_num, maxlen)
    except OSError as err:
        why = err.strerror or str(err)
        if err.errno not in (errno.EPERM, errno.EBUSY):  # those say what is wrong already
            why += " (is the nfnetlink_queue kernel module missing?)"
        raise ShellError(f"cannot bind NFQUEUE {queue_num}: {why}") from err


class Shell:
    """Binds the traffic and SYN queues and runs the engine on them until stopped."""

    BATCH = 64  # packets per read (recvmmsg) from the traffic queue
    # Traffic batches per round, at most, before the SYN queue's turn. With both queues busy
    # (a download through the proxy while SYNs arrive), one batch of 64 packets and one of 16
    # SYNs give new connections about a third of the time. With 8 batches per round one
    # download starved them: 8,394 SYN-queue drops and 12% of connections waiting for a SYN
    # retransmission at 7,000 SYN/s (31% at 13,000), against 0 and 0 with one batch; a 30 MB
    # download under a full flood took 0.57 s against 0.48 s (0.42 s quiet).
    TRAFFIC_BATCHES = 1
    SYN_BATCH = 16  # SYNs per round while traffic is waiting: ~0.2 ms of work, the most it waits for them
    # SYNs per round while the traffic queue is empty. Each round has costs of its own (read,
    # send and poll system calls, the loop around them): under a full flood on this VM, rounds
    # of 64 answered 10-14% more SYNs per core than rounds of 16. Traffic that arrives
    # meanwhile waits for up to one such round (~0.7 ms).
    SYN_BATCH_IDLE = 64
    # The SYN queue counts as full at 1024 SYNs (~12 ms of work): a SYN that is answered should
    # not first wait behind thousands. Without overload shedding that is the kernel queue's
    # length, and the kernel drops the excess either way.
    SYN_QUEUE_FULL = 1024
    # With overload shedding the worker keeps the queue near --overload-backlog once it has
    # been full, and the kernel's queue has room for this many: the room above
    # SYN_QUEUE_FULL takes what arrives while the worker is not running (a pause of 10 ms
    # is over 1,000 SYNs at hping3's full speed), which a queue of 1024 dropped at random.
    # A full-speed flood against one worker: the kernel dropped 0.5-2.4% of the SYNs with
    # 1024 and 0-0.12% with this, in eight runs of 12 s each.
    SYN_QUEUE_ROOM = 4096
    # How long a drop verdict may wait to leave with others: at moderate flood rates the
    # proxy wakes for every SYN or two, and a write per wake-up was an eighth of its CPU.
    DROP_DELAY = 0.002
    # SYNs waiting (beyond those in hand) at which the proxy is behind, once the kernel
    # has had to drop SYNs (OverloadGate): the default of --overload-backlog, about 6 ms
    # of work. Below SYN_QUEUE_FULL, so the proxy then sheds first attempts itself and
    # remembers them (Engine.overloaded) instead of the kernel dropping SYNs at random,
    # retransmissions included.
    OVERLOAD_BACKLOG = 512

    def __init__(
        self,
        engine: Engine,
        queue_num: int,
        mark: int,
        clock: Callable[[], float] = time.time,
        on_tick: Callable[[float], None] | None = None,
        queue_maxlen: int = 8192,
        binding: Binding = Binding.NETLINK,
        fail_open: bool = False,
        syn_queue_num: int | None = None,
        overload_backlog: int = OVERLOAD_BACKLOG,
        pass_on_queue: int | None = None,
    ) -> None:
        self.engine = engine
        self.queue_num = queue_num
        self.syn_queue_num = syn_queue_num  # new SYNs, served after the traffic queue each round
        # The next worker's traffic queue: the rules send ICMP errors about protected connections
        # to the first worker's, and each hands on those about connections it does not hold.
        self.pass_on_queue = pass_on_queue
        self.clock = clock
        self.on_tick = on_tick  # once a second or so: key reloads, gauges
        self.stats = ShellStats()
        try:
            self.sender = RawSender(mark, self.stats.sent, self.stats.send_errors)
        except SenderError as err:
            raise ShellError(str(err)) from err
        self.binding = binding
        self.fail_open = fail_open
        if not 0 <= overload_backlog < self.SYN_QUEUE_FULL:
            raise ShellError(f"--overload-backlog must be 0 (off) to {self.SYN_QUEUE_FULL - 1}, "
                             f"got {overload_backlog}")
        self.overload_backlog = overload_backlog  # 0: never shed; the kernel drops the overflow
        self._stop = False
        self._queue_maxlen = queue_maxlen
        self._next_tick = 0.0
        self._service_due = 0.0
        # Packets the engine holds in a queue without a verdict (Hold), by token: their queue
        # and handle, for the verdict its Release gives later.
        self._held: dict[int, tuple[QueueReader, Any]] = {}

    def stop(self, *_: Any) -> None:
        self._stop = True

    def _handle_batch(self, queue: QueueReader, batch: list[tuple[Any, bytes]]) -> None:
        """Run the engine over a batch; its sends and verdicts leave together at the end.

        Packets leave in the order the engine made them: the sends made for a packet
        and for earlier ones go out before its accept verdict, and an accepted packet
        is never overtaken by a send made for a later one. A held packet's release
        (`Release`, after the verdict of the packet that caused it) keeps its place
        in that order too. A SYN flood's batch (all drops and SYN-ACKs) is one
        sendmmsg and one batch verdict.
        """
        start = time.perf_counter()
        now = self.clock()
        engine, sender = self.engine, self.sender
        send = sender.send
        accepts_pending = False
        for handle, data in batch:
            try:
                actions = engine.handle_raw(data, now)
            except Exception:  # a bug must cost one packet, never the daemon
                self.stats.handler_errors += 1
                log.exception("engine failed on a packet; dropped it")
                queue.verdict(handle, False)
                continue
            verdict = actions[0]  # the engine's first action is the verdict, then Sends and Releases
            for action in actions[1:] if len(actions) > 1 else ():
                if type(action) is Release:
                    accepts_pending = self._release(action, queue) or accepts_pending
                    continue
                if accepts_pending:
                    sender.flush()
                    queue.flush()
                    accepts_pending = False
                send(action.family, action.dst, action.data, action.kind)  # type: ignore[union-attr]
            if type(verdict) is Drop:
                queue.verdict(handle, False)
            elif type(verdict) is Hold:
                self._held[verdict.token] = (queue, handle)
            else:
                if sender.pending:
                    sender.flush()  # a binding may hand the verdict over at once
                if type(verdict) is PassOn:  # another worker may hold its connection
                    if self.pass_on_queue is None:
                        queue.verdict(handle, True)
                    else:
                        queue.pass_to(handle, self.pass_on_queue)
                else:
                    queue.verdict(handle, True, verdict.payload)  # type: ignore[union-attr]
                accepts_pending = True
        sender.flush()
        queue.flush(drops_may_wait=True)  # drops may wait for more (at most DROP_DELAY, see _serve)
        self.stats.packets += len(batch)
        self.stats.handling.observe((time.perf_counter() - start) / len(batch), len(batch))

    def _release(self, release: Release, current: QueueReader | None) -> bool:
        """Give a held packet its verdict after the sends made before it; whether it is an accept
        still to be written to `current` (a verdict for another queue is written at once)."""
        held = self._held.pop(release.token, None)
        if held is None:
            return False  # its queue was closed (never while the engine holds it)
        queue, handle = held
        verdict = release.verdict
        accept = type(verdict) is not Drop
        if accept and self.sender.pending:
            self.sender.flush()
        queue.verdict(handle, accept, verdict.payload if accept else None)  # type: ignore[union-attr]
        if queue is not current:
            queue.flush()
            return False
        return accept

    @property
    def held(self) -> int:
        """Packets left in the queues without a verdict for the engine (Hold)."""
        return len(self._held)

    def _carry_out(self, actions: list[Any]) -> None:
        """Send the packets and give the verdicts of actions that answer no queued packet
        (a timer's, or the stop's)."""
        for action in actions:
            if isinstance(action, Send):
                self.sender.send(action.family, action.dst, action.data, action.kind)
            elif isinstance(action, Release):
                self._release(action, None)
        self.sender.flush()

    def _reset_all(self) -> None:
        """On a clean stop: a RST to both ends of every connection (Engine.reset_all), while
        the queues are still bound for the verdicts of held segments."""
        try:
            actions = self.engine.reset_all()
            self._carry_out(actions)
        except Exception:  # the stop must go on
            log.exception("resetting the connections on stop failed")
            return
        clients = sum(1 for a in actions if isinstance(a, Send) and a.to is Direction.FROM_SERVER)
        if clients:
            log.info("stopping: reset %d connections at both ends (their state goes with this process)", clients)

    def _service(self, now: float) -> None:
        """Run due timers and the once-a-second tick; note when to come back."""
        deadline = self.engine.next_deadline()
        if deadline is not None and deadline <= now:
            self._carry_out(self.engine.handle_timer(now))
            deadline = self.engine.next_deadline()
        if now >= self._next_tick:
            self._next_tick = now + 1.0
            if self.on_tick is not None:
                self.on_tick(now)
        self._service_due = self._next_tick if deadline is None else min(deadline, self._next_tick)

    def _serve(self, queues: list[QueueReader], depth: QueueDepth | None) -> None:
        """The loop: rounds of a traffic batch, then a few SYNs; poll only when nothing is ready.

        Each round takes a batch of traffic (TRAFFIC_BATCHES), then one batch of SYNs,
        small (SYN_BATCH) while traffic is waiting: a SYN flood fills
        only its own queue and delays established connections by at most one SYN
        batch (SYN_BATCH_IDLE when their packets arrive during it). A queue that returned
        less than asked is empty and is read again only once poll says so, which
        keeps a lightly loaded proxy at one poll and one read per wake-up. Drop
        verdicts may wait up to DROP_DELAY to leave together.

        A full batch of SYNs may mean the proxy is behind: `depth` (the kernel's figures
        for the SYN queue, None when overload shedding is off) tells, OverloadGate
        decides, and the engine handles that batch as overloaded (Engine.overloaded).
        """
        poller = select.poll()
        by_fd = {queue.fileno(): i for i, queue in enumerate(queues)}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        rounds = [self.TRAFFIC_BATCHES] + [1] * (len(queues) - 1)
        syn_queue = len(queues) - 1  # the SYN queue, or the only queue
        syn_full = self.SYN_QUEUE_FULL if len(queues) > 1 else self._queue_maxlen  # see OverloadGate
        gate = OverloadGate(self.overload_backlog, self.fail_open)
        ready = [True] * len(queues)
        drops_due: float | None = None  # when held drop verdicts must leave
        engine = self.engine
        while not self._stop:
            now = self.clock()
            if now >= self._service_due:
                self._service(now)
            for i, queue in enumerate(queues):
                if not ready[i]:
                    continue
                if i == 0:
                    want = self.BATCH
                else:  # the SYN queue: larger rounds while no traffic waits
                    want = self.SYN_BATCH if ready[0] else self.SYN_BATCH_IDLE
                for _ in range(rounds[i]):
                    batch = queue.receive(want)
                    if batch:
                        behind = False
                        if depth is not None and i == syn_queue and len(batch) >= want:
                            status = depth.status()
                            behind = gate.update(status.waiting - queue.unanswered, status.dropped_queue_full, now,
                                                 full=status.waiting >= syn_full)
                        if behind:
                            engine.overloaded = True
                            try:
                                self._handle_batch(queue, batch)
                            finally:
                                engine.overloaded = False
                        else:
                            self._handle_batch(queue, batch)
                    if len(batch) < want:
                        ready[i] = False
                        break
            if any(queue.drops_waiting for queue in queues):
                if drops_due is None:
                    drops_due = now + self.DROP_DELAY
                elif now >= drops_due:
                    for queue in queues:
                        queue.flush()
                    drops_due = None
            else:
                drops_due = None
            if not all(ready):
                # Block only when every queue is empty; otherwise just look.
                due = self._service_due if drops_due is None else min(self._service_due, drops_due)
                wait = 0.0 if any(ready) else max(0.0, due - self.clock()) * 1000 + 1
                for fd, _ in poller.poll(wait):
                    ready[by_fd[fd]] = True

    def run(self, on_bound: Callable[[], None] | None = None) -> None:
        """Serve the queue until SIGTERM/SIGINT or `stop()`.

        `on_bound` runs once the queue is bound (the daemon installs its rules
        then, so no packet is queued before a reader exists).
        """
        depth = None
        if self.overload_backlog:
            try:
                depth = QueueDepth(self.queue_num if self.syn_queue_num is None else self.syn_queue_num)
            except OSError as err:  # /proc without netfilter's files: shed nothing, say so
                log.warning("cannot read the queue's length (%s): SYNs beyond capacity are dropped at random", err)
        syn_room = self.SYN_QUEUE_FULL if depth is None else self.SYN_QUEUE_ROOM
        queues: list[QueueReader] = []
        try:
            queues.append(open_queue(self.binding, self.queue_num, self._queue_maxlen, self.fail_open, self.BATCH))
            if self.syn_queue_num is not None:
                queues.append(open_queue(self.binding, self.syn_queue_num, syn_room, self.fail_open, self.BATCH))
        except BaseException:
            for queue in queues:
                queue.close()
            if depth is not None:
                depth.close()
            raise
        old = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if on_bound is not None:
                on_bound()
            self._serve(queues, depth)
            self._reset_all()
        finally:
            if depth is not None:
                depth.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            for queue in queues:
                queue.close()
            self.sender.close()
