"""Raw-socket output: the packets the engine builds, sent in batches with sendmmsg(2).

Why batches: under a SYN flood every queued SYN is answered with a SYN-ACK, and one
sendto(2) per SYN-ACK cost about 1.5 µs of Python and system-call overhead on top
of the kernel's own work. Here packets are copied into fixed slots of a ctypes
buffer and leave with one sendmmsg(2) per `flush()` (or when the slots are full);
a packet longer than a slot leaves alone, with sendto(2), after what is pending.
The caller decides when to flush, so it can keep its packets in order with the
queue's verdicts.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections import Counter

from .nfqueue import Iovec, Mmsghdr, libc

_sendmmsg = libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int

_MSG_SIZE = ctypes.sizeof(Mmsghdr)
_IOV_SIZE = ctypes.sizeof(Iovec)
_IOV_LEN_AT = Iovec.len.offset
_SIZE_T = struct.Struct("N")  # native size_t


class SenderError(RuntimeError):
    """Something the operator must fix before the proxy can send (one sentence)."""


class _Batch:
    """Pending packets of one raw socket: data slots, destination addresses, one sendmmsg."""

    SLOT = 256  # bytes per packet: a SYN-ACK, RST or ACK is at most 100; data segments go alone

    def __init__(self, sock: socket.socket, family: int, size: int, sent: Counter[str], errors: Counter[str]) -> None:
        self.sock, self.fd, self.family, self.size = sock, sock.fileno(), family, size
        self.sent, self.errors = sent, errors  # the sender's counters, shared by both families
        if family == 4:
            namelen, self._addr_at, alen = 16, 4, 4
            name = struct.pack("=HH4s8x", socket.AF_INET, 0, b"")
        else:
            namelen, self._addr_at, alen = 28, 8, 16
            name = struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, b"", 0)
        self._namelen, self._alen = namelen, alen
        self._data = ctypes.create_string_buffer(self.SLOT * size)
        self._names = ctypes.create_string_buffer(name * size, namelen * size)
        self._iov = (Iovec * size)()
        self._msgs = (Mmsghdr * size)()
        data, names = ctypes.addressof(self._data), ctypes.addressof(self._names)
        for i in range(size):
            self._iov[i].base = data + i * self.SLOT
            self._msgs[i].hdr.name = names + i * namelen
            self._msgs[i].hdr.namelen = namelen
            self._msgs[i].hdr.iov = ctypes.pointer(self._iov[i])
            self._msgs[i].hdr.iovlen = 1
        self._msgs_at = ctypes.addressof(self._msgs)
        self._dview = memoryview(self._data).cast("B")
        self._nview = memoryview(self._names).cast("B")
        self._iview = memoryview(self._iov).cast("B")
        self.kinds: list[str] = []  # what each pending slot holds (counted when sent)

    def add(self, dst: bytes, data: bytes, kind: str) -> None:
        n = len(self.kinds)
        size = len(data)
        if size > self.SLOT:  # in order: what is pending first, then this one alone
            self.flush()
            self._sendto(dst, data, kind)
            return
        at = n * self.SLOT
        self._dview[at:at + size] = data
        _SIZE_T.pack_into(self._iview, n * _IOV_SIZE + _IOV_LEN_AT, size)
        at = n * self._namelen + self._addr_at
        self._nview[at:at + self._alen] = dst
        self.kinds.append(kind)
        if n + 1 == self.size:
            self.flush()

    def flush(self) -> None:
        kinds, sent, errors = self.kinds, self.sent, self.errors
        n = len(kinds)
        done = 0
        while done < n:
            r = _sendmmsg(self.fd, self._msgs_at + done * _MSG_SIZE, n - done, 0)
            if r > 0:
                sent.update(kinds[done:done + r])
                done += r
                continue
            err = ctypes.get_errno()
            if r < 0 and err == errno.EINTR:
                continue
            # sendmmsg reports an error only for the first message it tried: that one is lost.
            errors[errno.errorcode.get(err, "unknown")] += 1
            done += 1
        kinds.clear()

    def _sendto(self, dst: bytes, data: bytes, kind: str) -> None:
        if self.family == 4:
            addr: tuple[str, int] | tuple[str, int, int, int] = (socket.inet_ntoa(dst), 0)
        else:
            addr = (socket.inet_ntop(socket.AF_INET6, dst), 0, 0, 0)
        try:
            self.sock.sendto(data, addr)
            self.sent[kind] += 1
        except OSError as err:
            self.errors[errno.errorcode.get(err.errno or 0, "unknown")] += 1


class RawSender:
    """Sends the packets the engine builds, marked so the rules let them pass.

    `send()` only queues; nothing leaves before `flush()` (or a full batch), so the
    caller orders packets against the queue's verdicts by when it flushes.
    """

    BATCH = 64

    def __init__(self, mark: int, sent: Counter[str] | None = None, errors: Counter[str] | None = None) -> None:
        self.sent: Counter[str] = Counter() if sent is None else sent  # by kind, once the kernel took them
        self.errors: Counter[str] = Counter() if errors is None else errors  # by errno name
        try:
            self.v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except PermissionError as err:
            raise SenderError("raw sockets need CAP_NET_RAW: run as root or grant the capability") from err
        for sock in (self.v4, self.v6):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            except PermissionError as err:
                raise SenderError("setting the packet mark needs CAP_NET_ADMIN") from err
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setblocking(False)
        self._batches = {family: _Batch(sock, family, self.BATCH, self.sent, self.errors)
                         for family, sock in ((4, self.v4), (6, self.v6))}
        self._all = tuple(self._batches.values())

    @property
    def pending(self) -> bool:
        """Whether packets are queued that have not left yet."""
        v4, v6 = self._all
        return bool(v4.kinds or v6.kinds)

    def send(self, family: int, dst: bytes, data: bytes, kind: str) -> None:
        """Queue one IP packet to `dst` (its header's destination, 4 or 16 bytes)."""
        self._batches[family].add(dst, data, kind)

    def flush(self) -> None:
        """Send everything queued (IPv4 first, then IPv6: order across families does not matter)."""
        for batch in self._all:
            if batch.kinds:
                batch.flush()

    def close(self) -> None:
        self.v4.close()
        self.v6.close()
