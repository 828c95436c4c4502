"""The thin I/O shell around the engine: NFQUEUE in, verdicts and raw sockets out.

It holds no protocol logic: it reads the clock, hands each queued packet to the
engine, carries out the actions it returns and calls the engine's timers.
"""

from __future__ import annotations

import bisect
import errno
import logging
import select
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .engine import Accept, Action, Drop, Engine, Send

log = logging.getLogger("synproxy")

SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
COPY_RANGE = 4016  # NetfilterQueue's ceiling; the engine keeps every segment below it


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

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.total += seconds


class RawSender:
    """Sends the packets the engine builds, marked so the rules let them pass."""

    def __init__(self, mark: int) -> None:
        try:
            self.v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except PermissionError as err:
            raise ShellError("raw sockets need CAP_NET_RAW: run as root or grant the capability") from err
        for sock in (self.v4, self.v6):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            except PermissionError as err:
                raise ShellError("setting the packet mark needs CAP_NET_ADMIN") from err
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setblocking(False)

    def send(self, action: Send) -> None:
        if action.family == 4:
            self.v4.sendto(action.data, (socket.inet_ntop(socket.AF_INET, action.dst), 0))
        else:
            self.v6.sendto(action.data, (socket.inet_ntop(socket.AF_INET6, action.dst), 0, 0, 0))

    def close(self) -> None:
        self.v4.close()
        self.v6.close()


class Shell:
    """Binds one NFQUEUE and runs the engine on it until stopped."""

    def __init__(
        self,
        engine: Engine,
        queue_num: int,
        mark: int,
        clock: Callable[[], float] = time.time,
        on_tick: Callable[[float], None] | None = None,
        queue_maxlen: int = 8192,
    ) -> None:
        self.engine = engine
        self.queue_num = queue_num
        self.clock = clock
        self.on_tick = on_tick  # once a second or so: key reloads, gauges
        self.stats = ShellStats()
        self.sender = RawSender(mark)
        self._stop = False
        self._queue_maxlen = queue_maxlen
        self._next_tick = 0.0
        self._service_due = 0.0

    def stop(self, *_: Any) -> None:
        self._stop = True

    def _execute(self, actions: list[Action], nfpkt: Any | None) -> None:
        for action in actions:
            if isinstance(action, Send):
                try:
                    self.sender.send(action)
                    self.stats.sent[action.kind] += 1
                except OSError as err:
                    self.stats.send_errors[errno.errorcode.get(err.errno or 0, "unknown")] += 1
            elif nfpkt is None:
                continue
            elif isinstance(action, Accept):
                if action.payload is not None:
                    nfpkt.set_payload(action.payload)
                nfpkt.accept()
            elif isinstance(action, Drop):
                nfpkt.drop()

    def _on_packet(self, nfpkt: Any) -> None:
        start = time.perf_counter()
        now = self.clock()
        self.stats.packets += 1
        try:
            actions = self.engine.handle_raw(nfpkt.get_payload(), now)
        except Exception:  # a bug must cost one packet, never the daemon
            self.stats.handler_errors += 1
            log.exception("engine failed on a packet; dropped it")
            nfpkt.drop()
            return
        self._execute(actions, nfpkt)
        self.stats.handling.observe(time.perf_counter() - start)
        # NetfilterQueue drains the socket before returning, which under a flood is
        # forever: timers, ticks and a stop request are served from here too.
        if now >= self._service_due:
            self._service(now)
        if self._stop:
            raise _StopLoop

    def _service(self, now: float) -> None:
        """Run due timers and the once-a-second tick; note when to come back."""
        deadline = self.engine.next_deadline()
        if deadline is not None and deadline <= now:
            self._execute(self.engine.handle_timer(now), None)
            deadline = self.engine.next_deadline()
        if now >= self._next_tick:
            self._next_tick = now + 1.0
            if self.on_tick is not None:
                self.on_tick(now)
        self._service_due = self._next_tick if deadline is None else min(deadline, self._next_tick)

    def run(self, on_bound: Callable[[], None] | None = None) -> None:
        """Serve the queue until SIGTERM/SIGINT or `stop()`.

        `on_bound` runs once the queue is bound (the daemon installs its rules
        then, so no packet is queued before a reader exists).
        """
        from netfilterqueue import NetfilterQueue

        nfq = NetfilterQueue()
        try:
            # The netlink socket must hold what the queue may: ~2 KiB per queued packet.
            nfq.bind(self.queue_num, self._on_packet, max_len=self._queue_maxlen, range=COPY_RANGE,
                     sock_len=self._queue_maxlen * 2048)
        except OSError as err:
            raise ShellError(
                f"cannot bind NFQUEUE {self.queue_num} ({err}): is another synproxy serving it, "
                "or is the nfnetlink_queue kernel module missing?"
            ) from err
        fd = nfq.get_fd()
        nl = socket.socket(fileno=fd)
        try:
            nl.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        except OSError:
            pass
        finally:
            nl.detach()
        old = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}
        if on_bound is not None:
            try:
                on_bound()
            except BaseException:
                nfq.unbind()
                self.sender.close()
                raise
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        try:
            while not self._stop:
                now = self.clock()
                if now >= self._service_due:
                    self._service(now)
                wait = max(0.0, self._service_due - self.clock())
                if poller.poll(wait * 1000 + 1):
                    try:
                        nfq.run(block=False)
                    except _StopLoop:
                        break
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            nfq.unbind()
            self.sender.close()


class _StopLoop(Exception):
    """Raised from the packet callback to leave NetfilterQueue's drain loop."""
