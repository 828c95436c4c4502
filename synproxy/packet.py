"""Parse and build IPv4/IPv6 TCP packets with `struct` on bytes.

This is the hot path: no scapy here (tests use scapy to check us). Malformed
input raises exactly one exception type, `PacketError`, whose `reason` is a
short label fit for a metric.

Translation rewrites header fields in place and updates the TCP checksum
incrementally (RFC 1624) instead of recomputing it: that costs a fraction of a
full sum for large segments and, more importantly, keeps a segment that was
corrupted on the wire corrupted, so the receiver still drops it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# TCP flags
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

# TCP option kinds
OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERM = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

PROTO_TCP = 6
_IPV6_EXT_HEADERS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT = 44

_U32 = 0xFFFFFFFF

_unpack_tcp = struct.Struct("!HHIIBBHHH").unpack_from
_pack_tcp = struct.Struct("!HHIIBBHHH").pack
_unpack_ipv4 = struct.Struct("!BBHHHBBH4s4s").unpack_from
_pack_ipv4 = struct.Struct("!BBHHHBBH4s4s").pack
_unpack_ipv6 = struct.Struct("!IHBB16s16s").unpack_from
_pack_ipv6 = struct.Struct("!IHBB16s16s").pack
_pack_u32 = struct.Struct("!I").pack_into
_pack_u16 = struct.Struct("!H").pack_into
_unpack_u32 = struct.Struct("!I").unpack_from
_unpack_ts = struct.Struct("!II").unpack_from
_pack_v4_tcp = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH").pack
_pack_v6_tcp = struct.Struct("!IHBB16s16sHHIIBBHHH").pack


class PacketError(ValueError):
    """A packet we cannot or will not handle; `reason` is a metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True)
class TcpOptions:
    """The TCP options we understand; anything else is kept verbatim in `unknown`."""

    mss: int | None = None
    wscale: int | None = None
    sack_ok: bool = False
    sack: tuple[tuple[int, int], ...] = ()
    ts: tuple[int, int] | None = None  # (TSval, TSecr)
    unknown: tuple[tuple[int, bytes], ...] = ()


@dataclass(slots=True)
class Packet:
    """A parsed IP+TCP packet plus the offsets needed to rewrite it in place."""

    raw: bytes
    family: int  # 4 or 6
    src: bytes  # packed address, 4 or 16 bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    urgent: int
    options: TcpOptions
    tcp_offset: int  # where the TCP header starts in raw
    tcp_header_len: int
    payload_len: int
    ts_offset: int = -1  # absolute offset of TSval in raw, -1 without timestamps
    sack_offset: int = -1  # absolute offset of the first SACK block, -1 without

    @property
    def payload(self) -> bytes:
        start = self.tcp_offset + self.tcp_header_len
        return self.raw[start : start + self.payload_len]

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies (payload plus SYN and FIN)."""
        return self.payload_len + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)

    def has(self, flags: int) -> bool:
        return self.flags & flags == flags


_NO_OPTIONS = TcpOptions()  # shared by every packet without options: treat as read-only


def parse(data: bytes) -> Packet:
    """Parse one IPv4 or IPv6 packet carrying TCP. Raises PacketError otherwise."""
    if not data:
        raise PacketError("short", "empty packet")
    version = data[0] >> 4
    if version == 4:
        if len(data) < 20:
            raise PacketError("short", "IPv4 header")
        vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _unpack_ipv4(data, 0)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or total < ihl:
            raise PacketError("bad_ip_header", f"ihl={ihl} total={total}")
        if total > len(data):
            raise PacketError("truncated", f"IPv4 total length {total} > captured {len(data)}")
        if frag & 0x3FFF:
            raise PacketError("fragment")
        if proto != PROTO_TCP:
            raise PacketError("not_tcp", f"protocol {proto}")
        tcp_offset = ihl
        end = total
        family = 4
    elif version == 6:
        if len(data) < 40:
            raise PacketError("short", "IPv6 header")
        _vtcfl, plen, nxt, _hop, src, dst = _unpack_ipv6(data, 0)
        end = 40 + plen
        if end > len(data):
            raise PacketError("truncated", f"IPv6 length {end} > captured {len(data)}")
        off = 40
        while nxt != PROTO_TCP:
            if nxt == _IPV6_FRAGMENT:
                raise PacketError("fragment")
            if nxt not in _IPV6_EXT_HEADERS or off + 8 > end:
                raise PacketError("not_tcp", f"next header {nxt}")
            nxt, hlen = data[off], (data[off + 1] + 1) * 8
            off += hlen
        tcp_offset = off
        family = 6
    else:
        raise PacketError("bad_ip_version", str(version))

    if end - tcp_offset < 20:
        raise PacketError("short", "TCP header")
    sport, dport, seq, ack, off_byte, flags, window, _csum, urgent = _unpack_tcp(data, tcp_offset)
    thl = (off_byte >> 4) * 4
    if thl < 20 or tcp_offset + thl > end:
        raise PacketError("bad_tcp_header", f"data offset {thl}")
    pkt = Packet(
        data if len(data) == end else bytes(data[:end]), family, src, dst, sport, dport, seq, ack,
        flags, window, urgent, _NO_OPTIONS if thl == 20 else TcpOptions(), tcp_offset, thl,
        end - tcp_offset - thl,
    )
    if thl > 20:
        _parse_options(pkt)
    return pkt


def _parse_options(pkt: Packet) -> None:
    data = pkt.raw
    i = pkt.tcp_offset + 20
    end = pkt.tcp_offset + pkt.tcp_header_len
    opts = pkt.options
    unknown: list[tuple[int, bytes]] = []
    while i < end:
        kind = data[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise PacketError("bad_tcp_option", f"kind {kind} without length")
        length = data[i + 1]
        if length < 2 or i + length > end:
            raise PacketError("bad_tcp_option", f"kind {kind} length {length}")
        if kind == OPT_MSS and length == 4:
            opts.mss = (data[i + 2] << 8) | data[i + 3]
        elif kind == OPT_WSCALE and length == 3:
            opts.wscale = data[i + 2]
        elif kind == OPT_SACK_PERM and length == 2:
            opts.sack_ok = True
        elif kind == OPT_TIMESTAMP and length == 10:
            opts.ts = _unpack_ts(data, i + 2)
            pkt.ts_offset = i + 2
        elif kind == OPT_SACK and length >= 10 and (length - 2) % 8 == 0:
            n = (length - 2) // 8
            blocks = struct.unpack_from(f"!{2 * n}I", data, i + 2)
            opts.sack = tuple(zip(blocks[0::2], blocks[1::2]))
            pkt.sack_offset = i + 2
        elif kind in (OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_TIMESTAMP, OPT_SACK):
            raise PacketError("bad_tcp_option", f"kind {kind} length {length}")
        else:
            unknown.append((kind, bytes(data[i + 2 : i + length])))
        i += length
    if unknown:
        opts.unknown = tuple(unknown)


_pack_mss = struct.Struct("!BBH").pack
_pack_ts = struct.Struct("!BBBBII").pack  # two bytes of NOPs or SACK-permitted, then TS
_pack_ws = struct.Struct("!BBBB").pack
_pack_sack_block = struct.Struct("!II").pack
_SACK_PERM_ALIGNED = bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2))


def encode_options(opts: TcpOptions) -> bytes:
    """Encode options in the order and alignment Linux uses, padded to 4 bytes."""
    parts: list[bytes] = []
    if opts.mss is not None:
        parts.append(_pack_mss(OPT_MSS, 4, opts.mss))
    if opts.ts is not None:
        if opts.sack_ok:
            parts.append(_pack_ts(OPT_SACK_PERM, 2, OPT_TIMESTAMP, 10, opts.ts[0] & _U32, opts.ts[1] & _U32))
        else:
            parts.append(_pack_ts(OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, opts.ts[0] & _U32, opts.ts[1] & _U32))
    elif opts.sack_ok:
        parts.append(_SACK_PERM_ALIGNED)
    if opts.wscale is not None:
        parts.append(_pack_ws(OPT_NOP, OPT_WSCALE, 3, opts.wscale))
    if opts.sack:
        parts.append(bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(opts.sack))))
        for left, right in opts.sack:
            parts.append(_pack_sack_block(left & _U32, right & _U32))
    for kind, value in opts.unknown:
        parts.append(bytes((kind, 2 + len(value))) + value)
    out = b"".join(parts)
    if len(out) % 4:
        out += bytes(4 - len(out) % 4)  # EOL padding
    if len(out) > 40:
        raise PacketError("options_too_long", f"{len(out)} bytes")
    return out


def _ones_sum(data: bytes | bytearray | memoryview) -> int:
    """One's-complement sum of 16-bit big-endian words, as a value mod 0xffff.

    2**16 = 1 (mod 0xffff), so the sum of the words equals the whole buffer as a
    big integer mod 0xffff; CPython does that in C far faster than a word loop.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    return int.from_bytes(data, "big") % 0xFFFF


def _pseudo_header(family: int, src: bytes, dst: bytes, length: int, proto: int = PROTO_TCP) -> bytes:
    """What TCP's (and ICMPv6's) checksum covers besides the segment or message."""
    if family == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def tcp_checksum(family: int, src: bytes, dst: bytes, segment: bytes | bytearray) -> int:
    """The TCP checksum of `segment` whose checksum field is zero."""
    total = _ones_sum(_pseudo_header(family, src, dst, len(segment))) + _ones_sum(segment)
    total %= 0xFFFF
    return (~total) & 0xFFFF


def checksum_ok(pkt: Packet) -> bool:
    """True when the TCP checksum of a parsed packet verifies."""
    end = pkt.tcp_offset + pkt.tcp_header_len + pkt.payload_len
    seg = pkt.raw[pkt.tcp_offset : end]
    total = _ones_sum(_pseudo_header(pkt.family, pkt.src, pkt.dst, len(seg))) + _ones_sum(seg)
    return total % 0xFFFF == 0


def ipv4_checksum(header: bytes | bytearray) -> int:
    return (~_ones_sum(header)) & 0xFFFF


def build(
    family: int,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: TcpOptions | bytes | None = None,
    payload: bytes = b"",
    ttl: int = 64,
) -> bytes:
    """Build a complete IPv4 or IPv6 packet with correct checksums.

    One struct call packs both headers; the checksums are patched in after,
    each a single big-integer sum (see `_ones_sum`). This runs once per SYN.
    """
    opt = encode_options(options) if isinstance(options, TcpOptions) else (options or b"")
    thl = 20 + len(opt)
    tcp_len = thl + len(payload)
    if family == 4:
        buf = bytearray(_pack_v4_tcp(
            0x45, 0, 20 + tcp_len, 0, 0x4000, ttl, PROTO_TCP, 0, src, dst,
            sport, dport, seq & _U32, ack & _U32, (thl // 4) << 4, flags, window, 0, 0,
        ))
        t = 20
        pseudo = int.from_bytes(src + dst, "big") + PROTO_TCP + tcp_len
        _pack_u16(buf, 10, ~(int.from_bytes(buf[:20], "big") % 0xFFFF) & 0xFFFF)
    else:
        buf = bytearray(_pack_v6_tcp(
            6 << 28, tcp_len, PROTO_TCP, ttl, src, dst,
            sport, dport, seq & _U32, ack & _U32, (thl // 4) << 4, flags, window, 0, 0,
        ))
        t = 40
        pseudo = int.from_bytes(src + dst, "big") + PROTO_TCP + tcp_len
    buf += opt
    if payload:
        buf += payload
        if len(payload) % 2:
            buf += b"\0"  # checksum padding, cut again below
    total = (pseudo + int.from_bytes(buf[t:], "big")) % 0xFFFF
    _pack_u16(buf, t + 16, ~total & 0xFFFF)
    if len(payload) % 2:
        del buf[-1]
    return bytes(buf)


def rewrite(
    pkt: Packet,
    *,
    seq: int | None = None,
    ack: int | None = None,
    window: int | None = None,
    tsval: int | None = None,
    tsecr: int | None = None,
    sack_delta: int = 0,
) -> bytes:
    """Return pkt.raw with TCP header fields replaced and the checksum updated incrementally.

    `sack_delta` is added to every SACK block edge (mod 2**32).
    """
    buf = bytearray(pkt.raw)
    t = pkt.tcp_offset
    hend = t + pkt.tcp_header_len
    old_csum = (buf[t + 16] << 8) | buf[t + 17]
    buf[t + 16] = buf[t + 17] = 0
    before = int.from_bytes(buf[t:hend], "big") % 0xFFFF
    if seq is not None:
        _pack_u32(buf, t + 4, seq & _U32)
    if ack is not None:
        _pack_u32(buf, t + 8, ack & _U32)
    if window is not None:
        _pack_u16(buf, t + 14, window)
    if pkt.ts_offset >= 0:
        if tsval is not None:
            _pack_u32(buf, pkt.ts_offset, tsval & _U32)
        if tsecr is not None:
            _pack_u32(buf, pkt.ts_offset + 4, tsecr & _U32)
    if sack_delta and pkt.sack_offset >= 0:
        off = pkt.sack_offset
        for _ in range(2 * len(pkt.options.sack)):
            _pack_u32(buf, off, (_unpack_u32(buf, off)[0] + sack_delta) & _U32)
            off += 4
    after = int.from_bytes(buf[t:hend], "big") % 0xFFFF
    folded = ((~old_csum & 0xFFFF) - before + after) % 0xFFFF
    _pack_u16(buf, t + 16, (~folded) & 0xFFFF)
    return bytes(buf)


# ECN codepoints of the IP header (RFC 3168 section 5)
ECN_NOT_ECT, ECN_CE = 0, 3


def ip_ecn(data: bytes | bytearray) -> int:
    """The ECN field of an IPv4 or IPv6 packet: 0 not ECN-capable, 1 or 2 ECT, 3 CE."""
    return data[1] & 3 if data[0] >> 4 == 4 else (data[1] >> 4) & 3


def clear_ecn(data: bytes) -> bytes:
    """The packet marked not ECN-capable (its IPv4 header checksum updated)."""
    buf = bytearray(data)
    if buf[0] >> 4 == 4:
        buf[1] &= 0xFC
        buf[10] = buf[11] = 0
        _pack_u16(buf, 10, ipv4_checksum(buf[:(buf[0] & 0x0F) * 4]))  # options included
    else:
        buf[1] &= 0xCF
    return bytes(buf)


def addr_text(family: int, addr: bytes) -> str:
    """Printable address, for logs and tests."""
    import socket

    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, addr)


def addr_bytes(text: str) -> bytes:
    """Packed address from text; the family follows from the text."""
    import socket

    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


# ---------------------------------------------------------------- flood fast path
#
# Under a spoofed SYN or ACK flood every packet pays for parse() (a Packet and a
# TcpOptions object, a generic option walk) and build() (an options object, its
# encoding, two checksum passes). The functions below read and write only what
# a SYN-ACK or a cookie check needs. They never decide anything parse() would:
# whatever is unusual or malformed makes them return None and the caller falls
# back to parse(), so the outcome is the same either way.

_PEEK_V4 = struct.Struct("!xxHxxHxBxx4s4sHHIIBB").unpack_from  # 34 bytes
_PEEK_V6 = struct.Struct("!xxxxHBx16s16sHHIIBB").unpack_from  # 54 bytes

Peeked = tuple[int, bytes, bytes, int, int, int, int, int, int, int]


def peek(data: bytes) -> Peeked | None:
    """The TCP fields of a plain packet, without building a Packet.

    Returns (family, src, dst, sport, dport, seq, ack, flags, options_start,
    options_end): the TCP options are data[options_start:options_end] and the
    payload is what follows. Only for IPv4 without IP options, unfragmented, and
    IPv6 without extension headers, whose length field matches len(data) and whose
    TCP header fits; None for anything else (parse() then says what it is).
    """
    n = len(data)
    if n >= 40 and data[0] == 0x45:
        total, frag, proto, src, dst, sport, dport, seq, ack, off, flags = _PEEK_V4(data)
        if total != n or frag & 0x3FFF or proto != PROTO_TCP:
            return None
        hend = 20 + (off >> 4) * 4
        if hend < 40 or hend > n:
            return None
        return 4, src, dst, sport, dport, seq, ack, flags, 40, hend
    if n >= 60 and data[0] >> 4 == 6:
        plen, nxt, src, dst, sport, dport, seq, ack, off, flags = _PEEK_V6(data)
        if plen + 40 != n or nxt != PROTO_TCP:
            return None
        hend = 40 + (off >> 4) * 4
        if hend < 60 or hend > n:
            return None
        return 6, src, dst, sport, dport, seq, ack, flags, 60, hend
    return None


_unpack_window_urgent = struct.Struct("!HxxH").unpack_from


def from_peeked(data: bytes, head: Peeked) -> Packet:
    """parse(data) for a packet peek() returned `head` for (the same Packet, or the
    same PacketError for bad options) without reading the headers again."""
    family, src, dst, sport, dport, seq, ack, flags, opt_start, opt_end = head
    window, urgent = _unpack_window_urgent(data, opt_start - 6)
    pkt = Packet(
        data, family, src, dst, sport, dport, seq, ack, flags, window, urgent,
        _NO_OPTIONS if opt_end == opt_start else TcpOptions(), opt_start - 20, opt_end - opt_start + 20,
        len(data) - opt_end,
    )
    if opt_end > opt_start:
        _parse_options(pkt)
    return pkt


# Linux's SYN options: MSS, SACK-permitted, timestamps, NOP, window scale.
_LINUX_SYN_OPTIONS = struct.Struct("!HHIIII").unpack_from
_NOP_NOP_TS = bytes((OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10))

SynOptions = tuple[int | None, int | None, bool, int | None]  # mss, wscale, sack_ok, TSval


def scan_options(data: bytes, i: int, end: int) -> SynOptions | None:
    """(mss, wscale, sack_ok, TSval) from the options in data[i:end], as parse() reads them.

    None where parse() would raise (the options are malformed); any other option
    is skipped as parse() skips it. The layouts Linux puts on a SYN and on an ACK
    are matched whole first.
    """
    n = end - i
    if n == 0:
        return None, None, False, None
    if n == 20:
        k1, mss, k2, tsval, _tsecr, k3 = _LINUX_SYN_OPTIONS(data, i)
        if k1 == 0x0204 and k2 == 0x0402080A and k3 >> 8 == 0x010303:
            return mss, k3 & 0xFF, True, tsval
    elif n == 12 and data.startswith(_NOP_NOP_TS, i):
        return None, None, False, _unpack_u32(data, i + 4)[0]
    mss = wscale = tsval = None
    sack_ok = False
    while i < end:
        kind = data[i]
        if kind == OPT_NOP:
            i += 1
            continue
        if kind == OPT_EOL:
            break
        if i + 1 >= end:
            return None
        length = data[i + 1]
        if length < 2 or i + length > end:
            return None
        if kind == OPT_MSS:
            if length != 4:
                return None
            mss = (data[i + 2] << 8) | data[i + 3]
        elif kind == OPT_TIMESTAMP:
            if length != 10:
                return None
            tsval = _unpack_u32(data, i + 2)[0]
        elif kind == OPT_WSCALE:
            if length != 3:
                return None
            wscale = data[i + 2]
        elif kind == OPT_SACK_PERM:
            if length != 2:
                return None
            sack_ok = True
        elif kind == OPT_SACK and (length < 10 or (length - 2) % 8):
            return None
        i += length
    return mss, wscale, sack_ok, tsval


_pack_v4_header = struct.Struct("!BxHxxHBBH4s4s").pack
_pack_v6_header = struct.Struct("!IHBB16s16s").pack
# The TCP header of a SYN-ACK (urgent pointer 0) and its options, by which are present.
_pack_synack_ts_ws = struct.Struct("!HHIIHHHxxHHHHIII").pack
_pack_synack_ts = struct.Struct("!HHIIHHHxxHHHHII").pack
_pack_synack_2 = struct.Struct("!HHIIHHHxxHHII").pack  # MSS + SACK-permitted + window scale
_pack_synack_1 = struct.Struct("!HHIIHHHxxHHI").pack  # MSS + SACK-permitted or window scale
_pack_synack_0 = struct.Struct("!HHIIHHHxxHH").pack  # MSS only
_MSS_WORD = OPT_MSS << 8 | 4
_TS_WORD = OPT_TIMESTAMP << 8 | 10
_SACK_PERM_TS_WORD = OPT_SACK_PERM << 8 | 2  # SACK-permitted before the timestamps
_NOP_NOP_WORD = OPT_NOP << 8 | OPT_NOP  # or two NOPs
_SACK_PERM_WORD = OPT_NOP << 24 | OPT_NOP << 16 | OPT_SACK_PERM << 8 | 2
_WSCALE_WORD = OPT_NOP << 24 | OPT_WSCALE << 16 | 3 << 8  # the scale goes in the low byte
_V4_HEADER_SUM = 0x4500 + 20 + 0x4000 + (64 << 8 | PROTO_TCP)  # plus the TCP length and addresses


def _offset_flags(thl: int) -> int:
    return (thl // 4) << 12 | SYN | ACK


def _constant_sum(thl: int, *option_words: int) -> int:
    """What a SYN-ACK's checksum sums besides its variable fields: the pseudo
    header's protocol and length, data offset and flags, the options' kinds."""
    return PROTO_TCP + thl + _offset_flags(thl) + _MSS_WORD + sum(option_words)


_K_TS_WS = _constant_sum(40, _TS_WORD, _WSCALE_WORD)
_K_TS = _constant_sum(36, _TS_WORD)
_K_SACK_WS = _constant_sum(32, _SACK_PERM_WORD, _WSCALE_WORD)
_K_SACK = _constant_sum(28, _SACK_PERM_WORD)
_K_WS = _constant_sum(28, _WSCALE_WORD)
_K_NONE = _constant_sum(24)
_OFF_FLAGS_24, _OFF_FLAGS_28, _OFF_FLAGS_32, _OFF_FLAGS_36, _OFF_FLAGS_40 = map(_offset_flags, (24, 28, 32, 36, 40))


def build_synack(
    family: int,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    window: int,
    mss: int,
    sack_ok: bool,
    wscale: int | None,
    tsval: int | None,
    tsecr: int = 0,
    ece: bool = False,
) -> bytes:
    """Exactly `build(family, src, dst, sport, dport, seq, ack, SYN | ACK, window,
    TcpOptions(mss=mss, wscale=wscale, sack_ok=sack_ok, ts=(tsval, tsecr)))` (no
    timestamps when tsval is None; tsval and tsecr are 32-bit), in under half the time.
    `ece` adds ECE to the flags: the ECN-setup SYN-ACK of RFC 3168.

    No bytes are summed: a checksum is the sum of the 16-bit words of the fields,
    and as 2**16 = 1 (mod 0xffff) a 32-bit field or a whole address taken as one
    integer counts the same as its words. It is build()'s arithmetic (mod 0xffff),
    so the same bytes, including its 0xffff rather than 0x0000 for a zero sum.
    """
    seq &= _U32
    ack &= _U32
    addr = int.from_bytes(src + dst, "big")
    ece_bit = ECE if ece else 0  # in the offset-and-flags word, so in the sum as it is
    total = addr + sport + dport + seq + ack + window + mss + ece_bit
    if tsval is not None:
        first = _SACK_PERM_TS_WORD if sack_ok else _NOP_NOP_WORD
        if wscale is not None:
            thl = 40
            total += _K_TS_WS + first + tsval + tsecr + wscale
            tcp = _pack_synack_ts_ws(
                sport, dport, seq, ack, _OFF_FLAGS_40 | ece_bit, window, ~(total % 0xFFFF) & 0xFFFF,
                _MSS_WORD, mss, first, _TS_WORD, tsval, tsecr, _WSCALE_WORD | wscale,
            )
        else:
            thl = 36
            total += _K_TS + first + tsval + tsecr
            tcp = _pack_synack_ts(
                sport, dport, seq, ack, _OFF_FLAGS_36 | ece_bit, window, ~(total % 0xFFFF) & 0xFFFF,
                _MSS_WORD, mss, first, _TS_WORD, tsval, tsecr,
            )
    elif wscale is None:
        if sack_ok:
            thl = 28
            total += _K_SACK
            tcp = _pack_synack_1(
                sport, dport, seq, ack, _OFF_FLAGS_28 | ece_bit, window, ~(total % 0xFFFF) & 0xFFFF,
                _MSS_WORD, mss, _SACK_PERM_WORD,
            )
        else:
            thl = 24
            total += _K_NONE
            tcp = _pack_synack_0(
                sport, dport, seq, ack, _OFF_FLAGS_24 | ece_bit, window, ~(total % 0xFFFF) & 0xFFFF, _MSS_WORD, mss
            )
    elif sack_ok:
        thl = 32
        total += _K_SACK_WS + wscale
        tcp = _pack_synack_2(
            sport, dport, seq, ack, _OFF_FLAGS_32 | ece_bit, window, ~(total % 0xFFFF) & 0xFFFF,
            _MSS_WORD, mss, _SACK_PERM_WORD, _WSCALE_WORD | wscale,
        )
    else:
        thl = 28
        total += _K_WS + wscale
        tcp = _pack_synack_1(
            sport, dport, seq, ack, _OFF_FLAGS_28 | ece_bit, window, ~(total % 0xFFFF) & 0xFFFF,
            _MSS_WORD, mss, _WSCALE_WORD | wscale,
        )
    if family == 4:
        ip_sum = (_V4_HEADER_SUM + thl + addr) % 0xFFFF
        return _pack_v4_header(0x45, 20 + thl, 0x4000, 64, PROTO_TCP, ~ip_sum & 0xFFFF, src, dst) + tcp
    return _pack_v6_header(6 << 28, thl, PROTO_TCP, 64, src, dst) + tcp


# ---------------------------------------------------------------- ICMP errors about a TCP segment

PROTO_ICMP = 1
PROTO_ICMPV6 = 58
ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED = 3, 4
ICMPV6_PACKET_TOO_BIG = 2


@dataclass(frozen=True, slots=True)
class TooBig:
    """An ICMP "fragmentation needed" or ICMPv6 "packet too big" about a TCP segment it quotes.

    Routers send it to the segment's source (here the server) so it sends smaller segments;
    the server's TCP takes it only if the quoted sequence number is one it sent. The addresses
    and ports are the quoted segment's; `seq_at` is where its sequence number sits in the packet.
    """

    family: int
    src: bytes  # the quoted segment's source (the server)
    dst: bytes  # and destination (the client)
    sport: int
    dport: int
    seq: int
    seq_at: int
    icmp_at: int  # where the ICMP message starts (its checksum is at icmp_at + 2)


def parse_too_big(data: bytes) -> TooBig | None:
    """The TooBig in an IPv4 or IPv6 packet (without options or extension headers around the
    ICMP message or inside the quote, unfragmented), or None for anything else."""
    n = len(data)
    if n >= 20 and data[0] == 0x45:  # outer IPv4 without options
        _vihl, _tos, total, _ident, frag, _ttl, proto, _csum, _src, _dst = _unpack_ipv4(data, 0)
        if proto != PROTO_ICMP or frag & 0x3FFF or total != n or n < 20 + 8 + 20 + 8:
            return None
        if data[20] != ICMP_DEST_UNREACH or data[21] != ICMP_FRAG_NEEDED:
            return None
        inner = 28
        vihl, _tos, _total, _ident, frag, _ttl, proto, _csum, src, dst = _unpack_ipv4(data, inner)
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20 or proto != PROTO_TCP or frag & 0x1FFF or n < inner + ihl + 8:
            return None
        sport, dport, seq = struct.unpack_from("!HHI", data, inner + ihl)
        return TooBig(4, src, dst, sport, dport, seq, inner + ihl + 4, 20)
    if n >= 40 and data[0] >> 4 == 6:
        _vtcfl, plen, nxt, _hop, _src, _dst = _unpack_ipv6(data, 0)
        if nxt != PROTO_ICMPV6 or plen + 40 != n or n < 40 + 8 + 40 + 8:
            return None
        if data[40] != ICMPV6_PACKET_TOO_BIG or data[41] != 0:
            return None
        inner = 48
        vtcfl, _plen, nxt, _hop, src, dst = _unpack_ipv6(data, inner)
        if vtcfl >> 28 != 6 or nxt != PROTO_TCP:
            return None
        sport, dport, seq = struct.unpack_from("!HHI", data, inner + 40)
        return TooBig(6, src, dst, sport, dport, seq, inner + 44, 40)
    return None


def rewrite_too_big(data: bytes, tb: TooBig, seq: int) -> bytes:
    """The same packet quoting sequence number `seq` instead, with its ICMP checksum made anew
    (the quote's own TCP checksum is left: a quote is usually cut short, so no one checks it)."""
    out = bytearray(data)
    struct.pack_into("!I", out, tb.seq_at, seq & _U32)
    at = tb.icmp_at
    out[at + 2:at + 4] = b"\0\0"
    message = out[at:]
    if tb.family == 4:
        total = _ones_sum(message)
    else:  # ICMPv6's checksum covers a pseudo-header like TCP's
        total = _ones_sum(_pseudo_header(6, bytes(out[8:24]), bytes(out[24:40]), len(message), PROTO_ICMPV6)) \
            + _ones_sum(message)
    struct.pack_into("!H", out, at + 2, ~(total % 0xFFFF) & 0xFFFF)
    return bytes(out)
