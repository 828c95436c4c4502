"""A direct nfnetlink_queue binding: packets in batches, verdicts in one write.

Why not NetfilterQueue: it reads one packet per system call, writes one
verdict per system call, copies at most 4016 bytes and cannot set the queue's
flags (fail-open under overload). Under a SYN flood those calls are most of the
cost. Here `receive()` takes up to `batch` packets with one recvmmsg(2) and
`flush()` writes every verdict collected since with one send(2): nfnetlink
processes all messages in a datagram. Verdicts are netlink messages built with
struct; the kernel interface is <linux/netfilter/nfnetlink_queue.h>.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 1
NF_DROP = 0
NF_ACCEPT = 1
NF_QUEUE = 3  # with the queue number in the upper 16 bits
NF_VERDICT_FLAG_QUEUE_BYPASS = 0x8000  # an unbound queue lets the packet pass instead of dropping it
MSG_DONTWAIT = 0x40
SO_SNDBUFFORCE = 32  # not in Python's socket module
SO_RCVBUFFORCE = 33

MAX_COPY_RANGE = 0xFFFF - 4  # the kernel's NFQNL_MAX_COPY_RANGE: a payload attribute must fit 16 bits
_HEADROOM = 512  # netlink, nfgenmsg and the metadata attributes around the payload

_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian, packed by hand)
_NLATTR = struct.Struct("=HH")
# nlmsghdr, nfgenmsg, attribute header, verdict header. The verdict header is big
# endian: the verdict is packed pre-swapped and the packet id is carried as the
# native reading of the kernel's big-endian bytes, so packing it natively gives
# the same bytes back without a swap per packet.
_VERDICT = struct.Struct("=IHHIIBBHHHII")
_VERDICT_LEN = _VERDICT.size
# nlmsg type, then (past nlmsg rest and nfgenmsg) the first attribute's type and the packet id
_HEAD = struct.Struct("=4xH16xHI")
_NF_DROP_BE = socket.htonl(NF_DROP)
_NF_ACCEPT_BE = socket.htonl(NF_ACCEPT)
_VERDICT_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
_BATCH_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH
_PACKET_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET


class QueueError(OSError):
    """The kernel refused to bind or configure the queue."""


class Iovec(ctypes.Structure):
    """struct iovec (shared with rawsend's sendmmsg)."""

    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(Iovec)),
        ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]


libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_recvmmsg = libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(Mmsghdr), ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int


@dataclass(frozen=True, slots=True)
class QueueConfig:
    queue_num: int
    maxlen: int = 8192  # packets the kernel holds for us before it drops (or fails open)
    copy_range: int = MAX_COPY_RANGE
    fail_open: bool = False  # on overload, accept instead of drop (the kernel's FAIL_OPEN flag)
    batch: int = 64  # packets per recvmmsg
    rcvbuf: int = 16 << 20


class NfQueue:
    """One bound queue. Not thread-safe; one per process (the GIL would serialise them anyway)."""

    def __init__(self, config: QueueConfig) -> None:
        self.config = config
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            for force, plain, value in ((SO_RCVBUFFORCE, socket.SO_RCVBUF, config.rcvbuf),
                                        (SO_SNDBUFFORCE, socket.SO_SNDBUF, 4 << 20)):
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, force, value)
                except PermissionError:  # without CAP_NET_ADMIN: the ordinary (capped) size
                    self.sock.setsockopt(socket.SOL_SOCKET, plain, value)
            # A full socket buffer drops packets (counted in /proc); it must not fail recv.
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            self._seq = 0
            self._res_id = socket.htons(config.queue_num)  # nfgenmsg's big-endian queue number
            self._configure(config)
        except BaseException:
            self.sock.close()
            raise
        self._slot = min(config.copy_range, MAX_COPY_RANGE) + _HEADROOM
        n = config.batch
        self._buf = ctypes.create_string_buffer(self._slot * n)
        self._view = memoryview(self._buf).cast("B")
        self._iov = (Iovec * n)()
        self._msgs = (Mmsghdr * n)()
        base = ctypes.addressof(self._buf)
        for i in range(n):
            self._iov[i].base = base + i * self._slot
            self._iov[i].len = self._slot
            self._msgs[i].hdr.iov = ctypes.pointer(self._iov[i])
            self._msgs[i].hdr.iovlen = 1
        self._msgview = memoryview(self._msgs).cast("B")
        # One unpack reads every message length out of the mmsghdr array.
        stride, at = ctypes.sizeof(Mmsghdr), Mmsghdr.len.offset
        self._lens = [struct.Struct("=" + f"{at}xI{stride - at - 4}x" * k) for k in range(n + 1)]
        self._payload_at = 0
        self._fd = self.sock.fileno()
        self._pending: list[bytes] = []  # verdict messages other than plain drops
        self._drops: list[int] = []  # handles to drop
        self._unanswered = 0  # packets received and not yet given a verdict in a write
        self._last_received = 0  # handle of the newest packet received (the highest id)

    # ------------------------------------------------------------ configuration

    def _request(self, attrs: list[tuple[int, bytes]], flags: int = 0) -> None:
        """Send one NFQNL_MSG_CONFIG and wait for the kernel's acknowledgement."""
        body = b"".join(_nlattr(t, v) for t, v in attrs)
        self._seq += 1
        msg = _NLMSG.pack(16 + 4 + len(body), (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG,
                          NLM_F_REQUEST | NLM_F_ACK | flags, self._seq, 0)
        msg += _NFGEN.pack(socket.AF_UNSPEC, 0, self._res_id) + body
        self.sock.send(msg)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _, seq, _ = _NLMSG.unpack_from(data, off)
                if mtype == NLMSG_ERROR and seq == self._seq:
                    code = -struct.unpack_from("=i", data, off + 16)[0]
                    if code:
                        raise QueueError(code, os.strerror(code))
                    return
                if mtype == _PACKET_TYPE and off + 28 <= len(data):
                    # A packet queued while we configure (the rules were already in place):
                    # it must not wait forever without a verdict; fail closed.
                    handle = _HEAD.unpack_from(data, off)[2]
                    self.sock.send(_verdict_message(self._res_id, _VERDICT_TYPE, _NF_DROP_BE, handle))
                off += (length + 3) & ~3 or len(data)

    def _configure(self, c: QueueConfig) -> None:
        cmd = struct.pack("=BxH", NFQNL_CFG_CMD_BIND, 0)
        try:
            self._request([(NFQA_CFG_CMD, cmd)])
        except QueueError as err:
            if err.errno == errno.EBUSY:
                raise QueueError(err.errno, "this process has bound it already") from err
            if err.errno == errno.EPERM:  # another socket holds the queue, or no CAP_NET_ADMIN
                raise QueueError(err.errno, "another process holds it (another synproxy on the same --queue?), "
                                            "or CAP_NET_ADMIN is missing") from err
            raise
        params = struct.pack(">IB", min(c.copy_range, MAX_COPY_RANGE), NFQNL_COPY_PACKET)
        flags = NFQA_CFG_F_FAIL_OPEN if c.fail_open else 0
        self._request([
            (NFQA_CFG_PARAMS, params),
            (NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", c.maxlen)),
            (NFQA_CFG_FLAGS, struct.pack(">I", flags)),
            (NFQA_CFG_MASK, struct.pack(">I", NFQA_CFG_F_FAIL_OPEN)),
        ])

    # ------------------------------------------------------------ data path

    def fileno(self) -> int:
        return self._fd

    def receive(self, limit: int = 0) -> list[tuple[int, bytes]]:
        """Up to `batch` queued packets as (packet handle, IP packet); [] when none are waiting.

        `limit` (if > 0) asks for fewer. The handle is what `verdict()` takes: the kernel's
        big-endian packet id read in host byte order, so it packs back without a swap.
        """
        want = self.config.batch if limit <= 0 else min(limit, self.config.batch)
        n = _recvmmsg(self._fd, self._msgs, want, MSG_DONTWAIT, None)
        if n <= 0:
            if n < 0:
                err = ctypes.get_errno()
                if err not in (errno.EAGAIN, errno.EINTR, errno.ENOBUFS):
                    raise OSError(err, os.strerror(err))
            return []
        out = []
        view, slot = self._view, self._slot
        lens = self._lens[n].unpack_from(self._msgview)
        for i in range(n):
            base = i * slot
            end = base + lens[i]
            # NFQA_PACKET_HDR is always the first attribute and NFQA_PAYLOAD the last;
            # the attributes between them are the same for most packets, so the
            # payload's offset from the last packet is tried first.
            mtype, atype, pid = _HEAD.unpack_from(view, base)
            if mtype != _PACKET_TYPE or atype != NFQA_PACKET_HDR:
                continue  # an error report for a verdict, or not a packet
            off = base + self._payload_at
            alen, atype = _NLATTR.unpack_from(view, off)
            if atype != NFQA_PAYLOAD or off + alen > end or end - (off + alen) > 3:
                off = base + 32  # past the headers and NFQA_PACKET_HDR
                while off + 4 <= end:
                    alen, atype = _NLATTR.unpack_from(view, off)
                    if alen < 4:
                        off = end
                        break
                    if atype & 0x7FFF == NFQA_PAYLOAD:
                        self._payload_at = off - base
                        break
                    off += (alen + 3) & ~3
                if off + 4 > end:
                    out.append((pid, b""))
                    continue
            out.append((pid, bytes(view[off + 4:off + alen])))
        if out:
            self._unanswered += len(out)
            self._last_received = out[-1][0]
        return out

    def verdict(self, packet_id: int, accept: bool, payload: bytes | None = None) -> None:
        """Queue a verdict; `flush()` sends all of them in one write."""
        if not accept:
            self._drops.append(packet_id)
            return
        self._pending.append(_verdict_message(self._res_id, _VERDICT_TYPE, _NF_ACCEPT_BE, packet_id, payload))

    def pass_to(self, packet_id: int, queue_num: int) -> None:
        """Queue a verdict that hands the packet to queue `queue_num` (another worker's), with the
        kernel's fail-open flag if this queue has it; `flush()` sends it."""
        verdict = NF_QUEUE | queue_num << 16 | (NF_VERDICT_FLAG_QUEUE_BYPASS if self.config.fail_open else 0)
        self._pending.append(_verdict_message(self._res_id, _VERDICT_TYPE, socket.htonl(verdict), packet_id))

    DROPS_MAY_WAIT = 64  # plain drops held back for one write (flush(drops_may_wait=True))

    @property
    def unanswered(self) -> int:
        """Packets received and not yet given a verdict in a write."""
        return self._unanswered

    @property
    def drops_waiting(self) -> int:
        """Drop verdicts held back by `flush(drops_may_wait=True)`."""
        return len(self._drops)

    def flush(self, drops_may_wait: bool = False) -> None:
        """Send the verdicts queued since the last flush (as few writes as fit the socket).

        When every packet received so far gets its verdict in this write and all but
        the accepted ones (which go first) are dropped, one batch verdict drops them
        all: the kernel drops every queued packet up to the newest id (a SYN flood's
        batches are all drops).

        With `drops_may_wait`, plain drops stay held while no accept is pending and
        fewer than DROPS_MAY_WAIT wait: a drop's verdict can be late without harm (the
        packet only keeps its queue slot), and one write then drops many. The caller
        must flush without it soon after (the shell does within Shell.DROP_DELAY).
        """
        pending, drops = self._pending, self._drops
        if not pending and (not drops or (drops_may_wait and len(drops) < self.DROPS_MAY_WAIT)):
            return
        answered = len(pending) + len(drops)
        self._pending, self._drops = [], []
        if len(drops) > 1 and answered == self._unanswered:
            pending.append(_verdict_message(self._res_id, _BATCH_TYPE, _NF_DROP_BE, self._last_received))
        else:
            res_id = self._res_id
            pending.extend(_verdict_message(res_id, _VERDICT_TYPE, _NF_DROP_BE, handle) for handle in drops)
        self._unanswered -= answered
        chunk: list[bytes] = []
        size = 0
        for msg in pending:
            if size + len(msg) > 256 << 10 and chunk:
                self._send(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(msg)
            size += len(msg)
        self._send(b"".join(chunk))

    def _send(self, data: bytes) -> None:
        while True:
            try:
                self.sock.send(data)
                return
            except InterruptedError:
                continue

    def close(self) -> None:
        try:
            self.flush()
            self._request([(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_UNBIND, 0))])
        except OSError:
            pass
        self.sock.close()


PROC_PATH = "/proc/net/netfilter/nfnetlink_queue"  # per network namespace


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One line of /proc/net/netfilter/nfnetlink_queue."""

    queue: int
    waiting: int  # held by the kernel: not yet read, or read and without a verdict
    dropped_queue_full: int
    dropped_socket_full: int
    total: int


def _rows(text: str) -> Iterator[list[str]]:
    """The proc file's lines, as columns: one line per bound queue, its number first."""
    return (cols for cols in (line.split() for line in text.splitlines()) if len(cols) >= 8)


def parse_queue_status(text: str, queue: int) -> QueueStatus | None:
    for cols in _rows(text):
        if int(cols[0]) == queue:
            return QueueStatus(queue, int(cols[2]), int(cols[5]), int(cols[6]), int(cols[7]))
    return None


def read_queue_status(queue: int, path: str | os.PathLike[str] = PROC_PATH) -> QueueStatus | None:
    try:
        with open(path) as f:
            return parse_queue_status(f.read(), queue)
    except OSError:
        return None


def bound_queues(path: str | os.PathLike[str] = PROC_PATH) -> set[int] | None:
    """The queues a process reads (one line each in the proc file, of this network namespace);
    without the file nfnetlink_queue is not loaded and none is. None: the file is unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return set()
    except OSError:
        return None
    return parse_bound_queues(text)


def parse_bound_queues(text: str) -> set[int]:
    """The queue numbers in the proc file's text."""
    return {int(cols[0]) for cols in _rows(text)}


class QueueDepth:
    """A queue's length from the kernel's own count, cheap enough to ask once per batch.

    The file stays open (a read from offset 0 gives fresh figures each time) and
    describes the network namespace this process was in when it opened it.
    """

    def __init__(self, queue_num: int, path: str = PROC_PATH) -> None:
        self.queue_num = queue_num
        self._fd = os.open(path, os.O_RDONLY)

    def status(self) -> QueueStatus:
        """The kernel's figures now: `waiting` counts packets read without a verdict too."""
        status = parse_queue_status(os.pread(self._fd, 1 << 16, 0).decode(), self.queue_num)
        return QueueStatus(self.queue_num, 0, 0, 0, 0) if status is None else status

    def close(self) -> None:
        os.close(self._fd)


def _verdict_message(res_id: int, mtype: int, verdict_be: int, handle: int, payload: bytes | None = None) -> bytes:
    """One NFQNL_MSG_VERDICT(_BATCH) message, with a replacement packet if `payload` is given."""
    if payload is None:
        return _VERDICT.pack(_VERDICT_LEN, mtype, NLM_F_REQUEST, 0, 0, socket.AF_UNSPEC, 0, res_id,
                             12, NFQA_VERDICT_HDR, verdict_be, handle)
    pad = -len(payload) & 3
    return (_VERDICT.pack(_VERDICT_LEN + 4 + len(payload) + pad, mtype, NLM_F_REQUEST, 0, 0, socket.AF_UNSPEC, 0,
                          res_id, 12, NFQA_VERDICT_HDR, verdict_be, handle)
            + _NLATTR.pack(4 + len(payload), NFQA_PAYLOAD) + payload + b"\0" * pad)


def _nlattr(atype: int, value: bytes) -> bytes:
    return _NLATTR.pack(4 + len(value), atype) + value + b"\0" * (-len(value) & 3)
