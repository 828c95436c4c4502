"""Packet parsing/building checked against scapy, plus a fuzz invariant."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment

from synproxy import packet as P

V4 = (P.addr_bytes("198.18.0.1"), P.addr_bytes("198.18.1.2"))
V6 = (P.addr_bytes("fd53:5059::1"), P.addr_bytes("fd53:5059:1::2"))


def _scapy(family: int, **tcp: object) -> bytes:
    ip = IP(src="198.18.0.1", dst="198.18.1.2") if family == 4 else IPv6(src="fd53:5059::1", dst="fd53:5059:1::2")
    payload = tcp.pop("load", b"")
    return bytes(ip / TCP(**tcp) / payload)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", [4, 6])
def test_parse_syn_with_all_options(family: int) -> None:
    raw = _scapy(
        family,
        sport=40000,
        dport=80,
        seq=123456789,
        flags="S",
        window=64240,
        options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (111, 0)), ("NOP", None), ("WScale", 7), (253, b"\x01\x02")],
    )
    pkt = P.parse(raw)
    assert (pkt.family, pkt.sport, pkt.dport, pkt.seq, pkt.flags, pkt.window) == (family, 40000, 80, 123456789, P.SYN, 64240)
    assert pkt.options.mss == 1460 and pkt.options.wscale == 7 and pkt.options.sack_ok
    assert pkt.options.ts == (111, 0)
    assert pkt.options.unknown == ((253, b"\x01\x02"),)
    assert pkt.payload_len == 0 and P.checksum_ok(pkt)


@pytest.mark.parametrize("family", [4, 6])
def test_build_matches_scapy_checksums(family: int) -> None:
    src, dst = V4 if family == 4 else V6
    opts = P.TcpOptions(mss=1400, wscale=9, sack_ok=True, ts=(5, 6), sack=((100, 200), (300, 400)))
    raw = P.build(family, src, dst, 80, 40000, 1, 2, P.SYN | P.ACK, 1000, opts, b"hello")
    sc = (IP if family == 4 else IPv6)(raw)
    tcp = sc[TCP]
    want = tcp.chksum
    del tcp.chksum
    if family == 4:
        want_ip = sc.chksum
        del sc.chksum
    rebuilt = sc.__class__(bytes(sc))
    assert rebuilt[TCP].chksum == want
    if family == 4:
        assert rebuilt.chksum == want_ip
    assert bytes(tcp.payload) == b"hello"
    d = dict((k, v) for k, v in tcp.options)
    assert d["MSS"] == 1400 and d["WScale"] == 9 and d["Timestamp"] == (5, 6) and "SAckOK" in d
    assert d["SAck"] == (100, 200, 300, 400)
    back = P.parse(raw)
    assert back.options.sack == ((100, 200), (300, 400)) and back.payload == b"hello"


@pytest.mark.parametrize("family", [4, 6])
def test_rewrite_keeps_checksum_valid(family: int) -> None:
    raw = _scapy(
        family, sport=80, dport=40000, seq=10, ack=20, flags="A", window=500,
        options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2)), ("NOP", None), ("NOP", None), ("SAck", (30, 40))],
        load=b"x" * 1001,
    )
    pkt = P.parse(raw)
    out = P.parse(P.rewrite(pkt, seq=0xFFFFFFF0, ack=7, window=65535, tsval=0xDEADBEEF, tsecr=3, sack_delta=-50))
    assert (out.seq, out.ack, out.window, out.options.ts) == (0xFFFFFFF0, 7, 65535, (0xDEADBEEF, 3))
    assert out.options.sack == (((30 - 50) & 0xFFFFFFFF, (40 - 50) & 0xFFFFFFFF),)
    assert P.checksum_ok(out)
    assert out.payload == b"x" * 1001


def test_rewrite_keeps_a_corrupt_segment_corrupt() -> None:
    raw = bytearray(_scapy(4, sport=80, dport=1, seq=1, ack=1, flags="A", load=b"abcdef"))
    raw[-1] ^= 0x01  # flipped on the wire
    out = P.parse(P.rewrite(P.parse(bytes(raw)), seq=999, ack=5))
    assert not P.checksum_ok(out)


def test_rewrite_unaligned_timestamp_option() -> None:
    # MSS, NOP, TS: TSval starts at an odd offset inside the TCP header.
    raw = _scapy(4, sport=80, dport=1, flags="A", options=[("NOP", None), ("Timestamp", (1, 2)), ("NOP", None)])
    pkt = P.parse(raw)
    assert (pkt.ts_offset - pkt.tcp_offset) % 2 == 1
    out = P.parse(P.rewrite(pkt, tsval=0x01020304, tsecr=0xA0B0C0D0))
    assert out.options.ts == (0x01020304, 0xA0B0C0D0) and P.checksum_ok(out)


def test_ipv6_extension_headers_and_fragments() -> None:
    raw = bytes(IPv6(src="fd53:5059::1", dst="fd53:5059::2") / IPv6ExtHdrDestOpt() / TCP(sport=1, dport=2, flags="S"))
    pkt = P.parse(raw)
    assert pkt.dport == 2 and pkt.tcp_offset == 48
    frag = bytes(IPv6(src="fd53:5059::1", dst="fd53:5059::2") / IPv6ExtHdrFragment() / TCP(sport=1, dport=2))
    with pytest.raises(P.PacketError) as err:
        P.parse(frag)
    assert err.value.reason == "fragment"


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"", "short"),
        (b"\x45" + bytes(10), "short"),
        (bytes(IP(dst="198.18.0.1", frag=3) / TCP()), "fragment"),
        (bytes(IP(dst="198.18.0.1") / TCP())[:30], "truncated"),
        (bytes(IP(dst="198.18.0.1", proto=17) / (b"x" * 30)), "not_tcp"),
        (b"\x75" + bytes(40), "bad_ip_version"),
    ],
)
def test_malformed(raw: bytes, reason: str) -> None:
    with pytest.raises(P.PacketError) as err:
        P.parse(raw)
    assert err.value.reason == reason


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 2))
def test_fuzz_parse_raises_only_packet_error(data: bytes, prefix: int) -> None:
    """Any input either parses or raises the one PacketError."""
    base = [b"", bytes(IP(src="1.2.3.4", dst="5.6.7.8") / TCP()), bytes(IPv6() / TCP())][prefix]
    buf = bytearray(base + data)
    if base and data:  # mutate a few header bytes too
        rnd = random.Random(len(data))
        for _ in range(3):
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
    try:
        P.parse(bytes(buf))
    except P.PacketError:
        pass


# ------------------------------------------------------------------ flood fast path helpers

u32 = st.integers(0, 2**32 - 1)


@settings(max_examples=1000, deadline=None)
@given(family=st.sampled_from([4, 6]), data=st.data(), sport=st.integers(0, 65535), dport=st.integers(0, 65535),
       seq=u32, ack=st.integers(0, 2**32), window=st.integers(0, 65535), mss=st.integers(0, 65535),
       sack_ok=st.booleans(), wscale=st.none() | st.integers(0, 255), ts=st.none() | st.tuples(u32, u32),
       ece=st.booleans())
def test_build_synack_is_build_byte_for_byte(
    family: int, data: st.DataObject, sport: int, dport: int, seq: int, ack: int, window: int, mss: int,
    sack_ok: bool, wscale: int | None, ts: tuple[int, int] | None, ece: bool,
) -> None:
    n = 4 if family == 4 else 16
    src = data.draw(st.binary(min_size=n, max_size=n))
    dst = data.draw(st.binary(min_size=n, max_size=n))
    want = P.build(family, src, dst, sport, dport, seq, ack, P.SYN | P.ACK | (P.ECE if ece else 0), window,
                   P.TcpOptions(mss=mss, wscale=wscale, sack_ok=sack_ok, ts=ts))
    got = P.build_synack(family, src, dst, sport, dport, seq, ack, window, mss, sack_ok, wscale,
                         None if ts is None else ts[0], 0 if ts is None else ts[1], ece)
    assert got == want


@settings(max_examples=300, deadline=None)
@given(tos=st.integers(0, 255), ident=st.integers(0, 65535), ttl=st.integers(1, 255), v6_tc=st.integers(0, 255),
       ip_options=st.booleans())
def test_clear_ecn_keeps_the_rest_and_a_valid_header_checksum(
    tos: int, ident: int, ttl: int, v6_tc: int, ip_options: bool,
) -> None:
    """clear_ecn's IPv4 header checksum (options included) is the one scapy computes; DSCP stays."""
    from scapy.layers.inet import IP, TCP, IPOption
    from scapy.layers.inet6 import IPv6

    opts = [IPOption(b"\x01\x01\x01\x00")] if ip_options else []  # NOP NOP NOP EOL
    v4 = bytes(IP(src="198.18.0.2", dst="198.18.1.2", tos=tos, id=ident, ttl=ttl, options=opts)
               / TCP(dport=80) / b"abc")
    assert P.ip_ecn(v4) == tos & 3
    got = IP(P.clear_ecn(v4))
    assert got.tos == tos & 0xFC and got.id == ident and bytes(got.payload) == bytes(IP(v4).payload)
    want = got.chksum
    del got.chksum
    assert IP(bytes(got)).chksum == want
    v6 = bytes(IPv6(src="fd53:5059::2", dst="fd53:5059:1::2", tc=v6_tc, fl=0x12345) / TCP(dport=80) / b"abc")
    assert P.ip_ecn(v6) == v6_tc & 3
    got6 = IPv6(P.clear_ecn(v6))
    assert got6.tc == v6_tc & 0xFC and got6.fl == 0x12345 and bytes(got6.payload) == bytes(IPv6(v6).payload)


def test_build_synack_zero_sum_checksum_like_build() -> None:
    """A segment whose words sum to 0 mod 0xffff: both builders write 0xffff there."""
    src, dst = V4
    base = P.build_synack(4, src, dst, 80, 40000, 0, 0, 0, 1460, False, None, None)
    csum = int.from_bytes(base[36:38], "big")
    seq = csum  # = 0xffff - (sum mod 0xffff): with it in the seq field the sum is 0 mod 0xffff
    want = P.build(4, src, dst, 80, 40000, seq, 0, P.SYN | P.ACK, 0, P.TcpOptions(mss=1460))
    assert P.build_synack(4, src, dst, 80, 40000, seq, 0, 0, 1460, False, None, None) == want
    assert want[36:38] == b"\xff\xff" and P.checksum_ok(P.parse(want))


@settings(max_examples=3000, deadline=None)
@given(options=st.lists(st.sampled_from([
    b"\x00", b"\x01", b"\x02\x04\x05\xb4", b"\x03\x03\x07", b"\x04\x02", b"\x08\x0a" + bytes(range(8)),
    b"\x05\x0a" + bytes(8), b"\x05\x12" + bytes(16), b"\x22\x02", b"\xfd\x04\xab\xcd",
    b"\x02\x03\x05", b"\x03\x04\x07\x00", b"\x04\x03\x00", b"\x05\x06\x00\x00\x00\x00", b"\x08\x08" + bytes(6),
    b"\x07\x01", b"\x07", b"\x09\xff",
]), max_size=8), family=st.sampled_from([4, 6]), payload=st.sampled_from([b"", b"data"]))
def test_peek_scan_options_and_from_peeked_read_what_parse_reads(options: list[bytes], family: int, payload: bytes) -> None:
    opts = b"".join(options)[:40]
    opts += bytes(-len(opts) % 4)
    src, dst = V4 if family == 4 else V6
    raw = P.build(family, src, dst, 40000, 80, 123, 456, P.SYN | P.ECE | P.CWR, 1000, opts, payload)
    head = P.peek(raw)
    pkt = P.parse(raw.replace(opts, bytes(len(opts)), 1)) if opts else P.parse(raw)  # the header alone
    assert head is not None
    assert head[:8] == (family, src, dst, 40000, 80, 123, 456, P.SYN | P.ECE | P.CWR)
    assert head[8] == pkt.tcp_offset + 20 and head[9] == pkt.tcp_offset + pkt.tcp_header_len
    got = P.scan_options(raw, head[8], head[9])
    try:
        whole = P.parse(raw)
    except P.PacketError as err:
        assert err.reason == "bad_tcp_option" and got is None
        with pytest.raises(P.PacketError, match="bad_tcp_option"):
            P.from_peeked(raw, head)
    else:
        o = whole.options
        assert got == (o.mss, o.wscale, o.sack_ok, None if o.ts is None else o.ts[0])
        assert P.from_peeked(raw, head) == whole


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=100), st.integers(0, 2))
def test_peek_accepts_only_what_parse_accepts_and_from_peeked_is_parse(data: bytes, prefix: int) -> None:
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)), ("WScale", 7), ("SAck", (5, 6))]
    base = [b"", bytes(IP(src="1.2.3.4", dst="5.6.7.8") / TCP(options=opts)), bytes(IPv6() / TCP())][prefix]
    buf = bytearray(base + data)
    rnd = random.Random(len(data))
    for _ in range(3 if base and data else 0):
        buf[rnd.randrange(len(buf))] = rnd.randrange(256)
    raw = bytes(buf)
    head = P.peek(raw)
    if head is None:
        return
    try:
        pkt = P.parse(raw)  # raises for bad options only: the headers are fine
    except P.PacketError as err:
        assert err.reason == "bad_tcp_option"
        with pytest.raises(P.PacketError, match="bad_tcp_option"):
            P.from_peeked(raw, head)
        return
    assert head[:8] == (pkt.family, pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.seq, pkt.ack, pkt.flags)
    assert head[9] == pkt.tcp_offset + pkt.tcp_header_len and len(raw) == head[9] + pkt.payload_len
    assert P.from_peeked(raw, head) == pkt

