"""The SYN-ACKs the proxy may send again, in memory allocated once.

A server's TCP resends an unanswered SYN-ACK (Linux after 1, 3, 7 ... s), so a client whose ACK
was lost answers again. Where the server speaks first (SMTP, FTP, POP3) that resend is all that
completes the connection: the client has nothing else to send and waits for the greeting until it
gives up. The proxy keeps no state per SYN, so it keeps only the last SYN-ACKs it sent, in a
fixed ring per retry, and no SYN, however many, takes more memory. More SYNs in a second than a
ring holds are a flood: the engine then empties the rings and keeps no more that second, so a
flood gets none resent (and costs a counter per SYN, not a copy).
"""

from __future__ import annotations

import struct

__all__ = ["ResendRing", "MAX_SYNACK"]

MAX_SYNACK = 40 + 40  # an IPv6 header and a TCP header with every option the proxy sends
_HEAD = struct.Struct("!dB")  # when it is due, its length
_SLOT = 96  # _HEAD.size + MAX_SYNACK, rounded up
_pack_head = _HEAD.pack_into
_unpack_head = _HEAD.unpack_from


class ResendRing:
    """The last `slots` packets pushed, oldest first, each with the time it is due.

    Packets must be pushed in order of their due times (each ring holds one retry, whose
    delay is fixed). A push over a full ring overwrites the oldest packet.
    """

    __slots__ = ("slots", "_buf", "_read", "_written")

    def __init__(self, slots: int) -> None:
        if slots <= 0:
            raise ValueError(f"a ring needs at least one slot, got {slots}")
        self.slots = slots
        self._buf = bytearray(slots * _SLOT)
        self._read = self._written = 0  # counts of packets taken out and pushed

    def __len__(self) -> int:
        return min(self._written - self._read, self.slots)

    def push(self, due: float, packet: bytes) -> None:
        """Keep `packet` until `due` (ValueError if it is longer than MAX_SYNACK)."""
        n = len(packet)
        if n > MAX_SYNACK:
            raise ValueError(f"{n} bytes do not fit a slot of {MAX_SYNACK}")
        off = (self._written % self.slots) * _SLOT
        _pack_head(self._buf, off, due, n)
        self._buf[off + _HEAD.size:off + _HEAD.size + n] = packet
        self._written += 1

    def next_due(self) -> float | None:
        """When the oldest packet kept is due (None: the ring is empty)."""
        if self._written - self._read > self.slots:
            self._read = self._written - self.slots  # overwritten unread: gone
        if self._read == self._written:
            return None
        return _unpack_head(self._buf, (self._read % self.slots) * _SLOT)[0]

    def clear(self) -> None:
        """Forget every packet kept."""
        self._read = self._written

    def pop(self) -> bytes:
        """Take the oldest packet kept out (call after next_due said there is one)."""
        off = (self._read % self.slots) * _SLOT
        n = _unpack_head(self._buf, off)[1]
        self._read += 1
        return bytes(self._buf[off + _HEAD.size:off + _HEAD.size + n])
