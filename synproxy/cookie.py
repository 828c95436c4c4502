"""SYN cookies: a stateless, exact check that an ACK answers our SYN-ACK.

Pure code: no I/O and no clock reads (time comes in as ``now``, in seconds).
See docs/cookie.md for the design and the measurements behind it.

The 32-bit cookie (our ISN toward the client) is::

    mac23 << 9 | (data9 ^ (mac23 >> 14))
    data9 = ecn << 8 | mss_index << 5 | sack << 4 | wscale_code      (wscale_code 15 = none)
    mac23 = keyed BLAKE2s, 24-bit digest, over
            family, data9 (2 bytes), src, dst, sport, dport, client_isn; its top 23 bits

The MAC covers the client's *exact* ISN, so an ACK whose sequence number is
off by any k != 0 fails (false accept 2**-23 per key and slot tried), unlike
Linux's additive cookies which accept seq+k for k <= mss_index and lose data.
The XOR only whitens the low 9 bits of the ISN; it hides nothing.

Time is cut into slots of ``slot_seconds``; a cookie made in slot s is valid in
s and s+1. Each slot has its own key derived from the master secret, so no slot
bit is carried: ``check`` simply tries slot(now) and then slot(now)-1.
"""

from __future__ import annotations

import hashlib
import struct
from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .keys import KeyRing

__all__ = [
    "CookieMaker",
    "CookieMatch",
    "CookieOptions",
    "DEFAULT_MSS",
    "MSS_TABLES",
    "WSCALE_NONE",
    "ECN_BIT",
]

U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF

#: MSS values a cookie can carry, by address family (3-bit index).
#: IPv4 covers the RFC 879 default, common tunnel/PPPoE sizes, Ethernet and jumbo
#: frames; IPv6 starts at 1220 (the minimum IPv6 MTU of 1280 minus 60).
MSS_TABLES: dict[int, tuple[int, ...]] = {
    4: (536, 1220, 1360, 1400, 1440, 1452, 1460, 8960),
    6: (1220, 1280, 1340, 1400, 1420, 1432, 1440, 8940),
}
#: MSS assumed when the SYN has no MSS option (RFC 9293 section 3.7.1).
DEFAULT_MSS: dict[int, int] = {4: 536, 6: 1220}
#: wscale_code meaning "the client sent no window scale option".
WSCALE_NONE = 15
#: data9 bit: the SYN-ACK agreed to ECN (RFC 3168), so the server is asked for it too.
ECN_BIT = 0x100
_DATA_BITS = 9
_DATA_MASK = (1 << _DATA_BITS) - 1
MAX_WSCALE = 14  # RFC 7323 2.3: larger shift counts are treated as 14

_SLOT_LABEL = b"synproxy-slot"
_SLOT_KEYS_KEPT = 4  # slot keys cached per master secret (make uses 1, check 2)
_MAC_SIZE = 3  # BLAKE2s digest size in bytes: 24 bits, of which the cookie keeps 23

# Fixed message layout: family tag, data9, src, dst, sport, dport, client_isn.
_MSG = {4: struct.Struct("!BH4s4sHHI"), 6: struct.Struct("!BH16s16sHHI")}
_ADDR_LEN = {4: 4, 6: 16}


@dataclass(frozen=True, slots=True)
class CookieOptions:
    """What a cookie carries of the client's SYN (already rounded to what fits)."""

    mss: int  # a table value, <= the client's MSS unless it was below the table
    wscale: int | None  # 0..14; None = the client sent no window scale
    sack_ok: bool
    ecn: bool = False  # the SYN asked for ECN and the SYN-ACK agreed


#: A validated cookie: (its options, the slot it was made in). The slot lets the
#: engine recover per-slot choices the cookie has no room for (the window scale
#: the proxy advertised in that SYN-ACK). A plain tuple: a NamedTuple costs 0.3 µs.
CookieMatch = tuple[CookieOptions, int]


def _decode_table(family: int) -> tuple[CookieOptions, ...]:
    """All 512 data9 values decoded; also the interned results of encode_options."""
    table = MSS_TABLES[family]
    out = []
    for data9 in range(1 << _DATA_BITS):
        code = data9 & 0x0F
        out.append(
            CookieOptions(
                mss=table[(data9 >> 5) & 7],
                wscale=None if code == WSCALE_NONE else code,
                sack_ok=bool(data9 & 0x10),
                ecn=bool(data9 & ECN_BIT),
            )
        )
    return tuple(out)


_DECODE: dict[int, tuple[CookieOptions, ...]] = {f: _decode_table(f) for f in MSS_TABLES}
# data9 of the interned options, by identity: hashing a dataclass costs more than
# the whole encoding; other equal instances take the slow path in `_data9`.
_CODE_BY_ID: dict[int, dict[int, int]] = {f: {id(o): d for d, o in enumerate(t)} for f, t in _DECODE.items()}
_MSS_INDEX: dict[int, dict[int, int]] = {f: {m: i for i, m in enumerate(t)} for f, t in MSS_TABLES.items()}


class _SlotKeys:
    """Per-slot keyed BLAKE2s objects derived from one master secret.

    Keying BLAKE2s costs a compression of the key block; copying a keyed
    prototype and hashing the message is about 30 % cheaper than keying per call,
    and deriving the slot key per call would double the cost. Hence the cache.
    """

    __slots__ = ("master", "_cache")

    def __init__(self, master: bytes) -> None:
        self.master = master
        self._cache: dict[int, hashlib.blake2s] = {}

    def proto(self, slot: int) -> hashlib.blake2s:
        h = self._cache.get(slot)
        if h is None:
            slot_key = hashlib.blake2s(_SLOT_LABEL + (slot & U64).to_bytes(8, "big"), key=self.master).digest()
            h = hashlib.blake2s(key=slot_key, digest_size=_MAC_SIZE)
            cache = self._cache
            if len(cache) >= _SLOT_KEYS_KEPT:
                del cache[min(cache)]  # slots only move forward, bar clock jumps
            cache[slot] = h
        return h


class CookieMaker:
    """Makes and checks cookies; holds the keys and their caches (one per engine)."""

    SLOT_SECONDS = 64  # a cookie is valid in its slot and the next: 64-128 s
    LIFETIME = 2 * SLOT_SECONDS  # the longest a cookie made with the default slots validates
    # Seconds after a rotation in which a worker that has not yet read the key file (they
    # poll it about once a second) may still make cookies with the old key.
    ROTATION_GRACE = 5.0
    # The shortest interval between rotations that breaks no handshake in flight: an old-key
    # cookie made at the end of the grace lives a full LIFETIME after it (133 s by default).
    MIN_ROTATION_INTERVAL = int(LIFETIME + ROTATION_GRACE)

    @classmethod
    def rotation_breaks_handshakes(cls, ring: KeyRing, now: float) -> bool:
        """Whether rotating `ring` at `now` drops a key that cookies in flight may carry: `check`
        tries only the current and the previous key, so a second rotation within the lifetime of
        the last old-key cookies (made up to ROTATION_GRACE after the first) stops checking them."""
        return ring.previous is not None and now - ring.rotated_at < cls.MIN_ROTATION_INTERVAL

    def __init__(self, keyring: KeyRing, slot_seconds: int = SLOT_SECONDS, rotation_grace: float = ROTATION_GRACE) -> None:
        """`rotation_grace`: seconds after a rotation during which another worker
        may still make cookies with the old key (workers poll the key file about
        once a second); those cookies keep their full two-slot lifetime."""
        if slot_seconds <= 0:
            raise ValueError("slot_seconds must be positive")
        self.slot_seconds = slot_seconds
        self.rotation_grace = rotation_grace
        self.set_keyring(keyring)

    def set_keyring(self, keyring: KeyRing) -> None:
        """Use new keys (after a reload); drops every cached slot key."""
        self.keyring = keyring
        self._current = _SlotKeys(keyring.current)
        self._previous = _SlotKeys(keyring.previous) if keyring.previous is not None else None
        # The previous key is tried only for slots in which it may have made cookies.
        self._previous_last_slot = int((keyring.rotated_at + self.rotation_grace) // self.slot_seconds)
        # The current key's object for the latest slot seen, and that slot's time
        # span: the hot path costs two float comparisons, no division, no lookup.
        self._hot_slot = 0
        self._hot_start = self._hot_end = float("nan")  # matches no `now`
        self._hot_proto = hashlib.blake2s(digest_size=_MAC_SIZE)  # never used while start is nan

    def slot(self, now: float) -> int:
        """The time slot of `now` (cookies made in slot s are valid in s and s+1)."""
        return int(now // self.slot_seconds)

    def encode_options(
        self, family: int, mss: int | None, wscale: int | None, sack_ok: bool, ecn: bool = False
    ) -> CookieOptions:
        """Round the client's SYN options to what a cookie can carry.

        MSS: the largest table value <= the client's (a missing option means the
        RFC default; a value below the smallest entry gets the smallest, which
        every host of the family must accept anyway). wscale > 14 becomes 14.
        `ecn`: the SYN-ACK agrees to ECN (the client asked, the server takes it).
        """
        if family not in MSS_TABLES:
            raise ValueError(f"unknown address family {family!r}")
        return _DECODE[family][_syn_data9(family, mss, wscale, sack_ok, ecn)]

    def make(
        self,
        family: int,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        client_isn: int,
        opts: CookieOptions,
        now: float,
    ) -> int:
        """The cookie ISN for a SYN; the same for a retransmitted SYN in the same slot.

        Raises ValueError for unknown families, options no cookie can carry
        (use `encode_options`), wrong address lengths or a non-finite `now`.
        """
        codes = _CODE_BY_ID.get(family)
        if codes is None:
            raise ValueError(f"unknown address family {family!r}")
        data9 = codes.get(id(opts))
        if data9 is None:
            data9 = _data9(family, opts)
        alen = _ADDR_LEN[family]
        if len(src) != alen or len(dst) != alen:
            raise ValueError(f"IPv{family} addresses must be {alen} bytes")
        return self._sign(family, data9, src, dst, sport, dport, client_isn, now)

    def make_for_syn(
        self,
        family: int,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        client_isn: int,
        mss: int | None,
        wscale: int | None,
        sack_ok: bool,
        ecn: bool,
        now: float,
    ) -> int:
        """`make(..., encode_options(family, mss, wscale, sack_ok, ecn), now)` in one call,
        without the options object: the engine's SYN fast path. The caller vouches
        for the family (4 or 6) and the address lengths."""
        return self._sign(
            family, _syn_data9(family, mss, wscale, sack_ok, ecn), src, dst, sport, dport, client_isn, now
        )

    def _sign(
        self, family: int, data9: int, src: bytes, dst: bytes, sport: int, dport: int, client_isn: int, now: float
    ) -> int:
        """The cookie: 23 MAC bits over the tuple, the client's ISN and data9, then data9 masked by the MAC."""
        if self._hot_start <= now < self._hot_end:
            h = self._hot_proto.copy()
        else:
            h = self._current.proto(self._move_hot(now)).copy()  # ValueError for nan/inf
        h.update(_MSG[family].pack(family, data9, src, dst, sport, dport, client_isn))
        mac = int.from_bytes(h.digest(), "big") >> 1
        return mac << 9 | (data9 ^ (mac >> 14))

    def check(
        self,
        family: int,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        client_isn: int,
        cookie: int,
        now: float,
    ) -> CookieMatch | None:
        """Validate `cookie` (= ack-1) against the exact `client_isn` (= seq-1).

        Returns (the carried options, the slot the cookie was made in), or None
        for anything invalid; never raises for bad values. Tries the current key
        in slot(now), then slot(now)-1, then the previous key likewise while a
        rotation is recent: one BLAKE2s typically, four at most.
        """
        msg_struct = _MSG.get(family)
        if msg_struct is None or not 0 <= cookie <= U32:
            return None
        alen = _ADDR_LEN[family]
        if len(src) != alen or len(dst) != alen:
            return None
        mac = cookie >> 9
        data9 = (cookie ^ (mac >> 14)) & _DATA_MASK
        try:
            msg = msg_struct.pack(family, data9, src, dst, sport, dport, client_isn)
            if self._hot_start <= now < self._hot_end:
                slot = self._hot_slot
            else:
                slot = self._move_hot(now)
        except (struct.error, ValueError, OverflowError):
            return None  # ports or ISN out of range, now not finite
        # The MAC is the top 23 bits of a 24-bit digest.
        h = self._current.proto(slot).copy() if slot != self._hot_slot else self._hot_proto.copy()
        h.update(msg)
        if int.from_bytes(h.digest(), "big") >> 1 == mac:
            return _DECODE[family][data9], slot
        # Not made in this slot with the current key: the rarer cases.
        h = self._current.proto(slot - 1).copy()
        h.update(msg)
        if int.from_bytes(h.digest(), "big") >> 1 == mac:
            return _DECODE[family][data9], slot - 1
        previous = self._previous
        if previous is not None:
            for s in (slot, slot - 1):
                if s <= self._previous_last_slot:
                    h = previous.proto(s).copy()
                    h.update(msg)
                    if int.from_bytes(h.digest(), "big") >> 1 == mac:
                        return _DECODE[family][data9], s
        return None

    def _move_hot(self, now: float) -> int:
        """The slot of `now`; it becomes the hot slot unless it is older (a late
        packet must not make every following one miss)."""
        slot = int(now // self.slot_seconds)
        if slot > self._hot_slot or self._hot_start != self._hot_start:
            try:
                start, end = float(slot * self.slot_seconds), float((slot + 1) * self.slot_seconds)
            except OverflowError:  # absurd `now`: serve it without caching
                return slot
            self._hot_slot, self._hot_start, self._hot_end = slot, start, end
            self._hot_proto = self._current.proto(slot)
        return slot


def _syn_data9(family: int, mss: int | None, wscale: int | None, sack_ok: bool, ecn: bool) -> int:
    """data9 of a client's SYN options, rounded to what a cookie carries (see encode_options)."""
    index = bisect_right(MSS_TABLES[family], DEFAULT_MSS[family] if mss is None else mss) - 1
    if wscale is None:
        code = WSCALE_NONE
    else:
        code = MAX_WSCALE if wscale > MAX_WSCALE else (wscale if wscale > 0 else 0)
    return (ECN_BIT if ecn else 0) | (index if index > 0 else 0) << 5 | (0x10 if sack_ok else 0) | code


def _data9(family: int, opts: CookieOptions) -> int:
    """data9 of options not interned by `encode_options` (ValueError if no cookie can carry them)."""
    index = _MSS_INDEX[family].get(opts.mss)
    wscale = opts.wscale
    if index is None or not (wscale is None or 0 <= wscale <= MAX_WSCALE):
        raise ValueError(f"options not encodable for IPv{family}: {opts!r}")
    return (
        (ECN_BIT if opts.ecn else 0) | index << 5 | (0x10 if opts.sack_ok else 0)
        | (WSCALE_NONE if wscale is None else wscale)
    )
