"""The fast paths of handle_raw (Engine._handle_peeked) against the general path.

Two engines with the same key, configuration and clock see the same packets
through `handle_raw`, one with `fast_paths=False` (parse + handle, the
reference): every action, byte for byte, and every counter must agree, for
randomised SYNs (IPv4 and IPv6, any option layout, clamped MSS values, ECN and
other flags), bogus and valid ACKs, rate-limited and capped sources, tuples
that have state, and the traffic of connections once open. Garbage that looks
like a SYN must never raise.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt

from synproxy import packet as P
from synproxy.cookie import CookieMaker
from synproxy.engine import Action, BackendProfile, Drop, Engine, EngineConfig, Send
from synproxy.keys import KeyRing
from synproxy.limits import LimitsConfig
from synproxy.packet import ACK, CWR, ECE, FIN, PSH, RST, SYN, URG, TcpOptions

T0 = 1_800_000_000.0
PORT = 80
CLIENTS = {
    4: [P.addr_bytes(a) for a in ("198.18.0.2", "198.18.0.3", "198.18.7.9")],
    6: [P.addr_bytes(a) for a in ("fd53:5059::2", "fd53:5059::3", "fd53:5059:7::9")],
}
SERVERS = {4: [P.addr_bytes(a) for a in ("198.18.1.2", "198.18.1.3")],
           6: [P.addr_bytes(a) for a in ("fd53:5059:1::2", "fd53:5059:1::3")]}
CLIENT_PORTS = [40000, 40001, 40002, 80]  # 80: a client port that is also protected

CONFIGS = {
    "default": {},
    "tight_limits": {"limits": LimitsConfig(
        max_pending_per_source=1, max_pending=3, max_established=2,
        synack_rate_per_source=2.0, synack_burst_per_source=3.0, synack_rate_global=20.0, synack_buckets=4,
    )},
    "subnet_limits": {"limits": LimitsConfig(source_prefix_v4=24, source_prefix_v6=64, max_pending_per_source=2,
                                             synack_rate_per_source=5.0, synack_burst_per_source=5.0)},
    "fixed": {"wscale": 3, "mss": 1300},
    "fixed_big_mss": {"wscale": 0, "mss": 9000},
}
PROFILES = [
    None,
    BackendProfile(mss=1400, wscale=None, sack_ok=False, ts_ok=False, window=29200),
    BackendProfile(mss=8960, wscale=14, sack_ok=True, ts_ok=True, window=70000),
    BackendProfile(mss=536, wscale=255, sack_ok=True, ts_ok=False, window=0),
]


def engines(config: str, profile: BackendProfile | None) -> tuple[Engine, Engine]:
    ring = KeyRing(current=bytes(range(32)), previous=bytes(32), rotated_at=T0 - 30, generation=2)
    pair = []
    for fast in (True, False):
        cfg = EngineConfig(ports=frozenset({PORT}), ts_base=777, **CONFIGS[config])  # type: ignore[arg-type]
        eng = Engine(cfg, CookieMaker(ring, slot_seconds=64), fast_paths=fast)
        if profile is not None:
            for family in (4, 6):
                eng.learn_profile(family, SERVERS[family][0], PORT, profile)
        pair.append(eng)
    return pair[0], pair[1]


def same_state(fast: Engine, slow: Engine) -> None:
    assert fast.stats == slow.stats
    assert fast.conns.keys() == slow.conns.keys()
    assert [c.state for c in fast.conns.values()] == [c.state for c in slow.conns.values()]
    assert (fast.limits.pending_by_source, fast.limits.established_by_source) == (
        slow.limits.pending_by_source, slow.limits.established_by_source)
    assert fast._advertised_wscale == slow._advertised_wscale


# ------------------------------------------------------------------ packets

mss_values = st.sampled_from([0, 1, 535, 536, 537, 1219, 1220, 1221, 1400, 1440, 1460, 1500, 3956, 3957,
                              8940, 8960, 9000, 65535]) | st.integers(0, 65535)


@st.composite
def tcp_options(draw: st.DrawFn) -> bytes:
    """Option bytes as some stack might send them: any subset, any order, NOPs,
    unknown kinds, an EOL, now and then a malformed option; padded to 4 bytes."""
    if draw(st.integers(0, 5)) == 0:  # Linux's exact layout (the matched-whole case)
        return P.encode_options(TcpOptions(
            mss=draw(mss_values), sack_ok=True, wscale=draw(st.integers(0, 255)),
            ts=(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)))))
    chunks: list[bytes] = []
    if draw(st.booleans()):
        chunks.append(bytes((2, 4)) + draw(mss_values).to_bytes(2, "big"))
    if draw(st.booleans()):
        chunks.append(bytes((3, 3, draw(st.sampled_from([0, 1, 7, 14, 15, 200, 255])))))
    if draw(st.booleans()):
        chunks.append(bytes((4, 2)))
    if draw(st.booleans()):
        chunks.append(bytes((8, 10)) + draw(st.binary(min_size=8, max_size=8)))
    if draw(st.integers(0, 4)) == 0:
        chunks.append(bytes((draw(st.sampled_from([6, 30, 34, 253])),)) + bytes((2,)))  # e.g. a TFO cookie request
    if draw(st.integers(0, 6)) == 0:
        chunks.append(bytes((5, 10)) + bytes(8))  # a SACK block on a SYN: odd but well-formed
    if draw(st.integers(0, 6)) == 0:  # malformed: parse() and the fast path must both refuse it
        chunks.append(draw(st.sampled_from([b"\x02\x03\x05", b"\x03\x04\x07\x00", b"\x08\x09" + bytes(7),
                                            b"\x04\x03\x00", b"\x05\x05\x00\x00\x00", b"\x1e\x01", b"\x02"])))
    chunks = list(draw(st.permutations(chunks)))
    for _ in range(draw(st.integers(0, 2))):
        chunks.insert(draw(st.integers(0, len(chunks))), b"\x01")
    if draw(st.integers(0, 5)) == 0:
        chunks.insert(draw(st.integers(0, len(chunks))), b"\x00")  # EOL: what follows is ignored
    out = b"".join(chunks)[:40]
    return out + bytes(-len(out) % 4)


def client_packet(family: int, client: bytes, server: bytes, cport: int, dport: int, seq: int, ack: int,
                  flags: int, options: bytes, payload: bytes = b"") -> bytes:
    return P.build(family, client, server, cport, dport, seq, ack, flags, 64240, options, payload)


@st.composite
def syn_packets(draw: st.DrawFn) -> tuple[bytes, int]:
    """(a SYN as bytes, its ISN); a few are not quite SYNs or not for us."""
    family = draw(st.sampled_from([4, 6]))
    flags = SYN | draw(st.sampled_from([0, 0, 0, ECE | CWR, ECE, PSH, URG, FIN, ACK, RST]))
    dport = draw(st.sampled_from([PORT] * 8 + [81]))
    isn = draw(st.sampled_from([0, 2**32 - 1]) | st.integers(0, 2**32 - 1))
    payload = b"early data" if draw(st.integers(0, 8)) == 0 else b""
    raw = client_packet(family, draw(st.sampled_from(CLIENTS[family])), draw(st.sampled_from(SERVERS[family])),
                        draw(st.sampled_from(CLIENT_PORTS)), dport, isn, 0, flags, draw(tcp_options()), payload)
    return raw, isn


def ack_options(draw: st.DrawFn, tsecr: int) -> bytes:
    return draw(st.sampled_from([
        b"", P.encode_options(TcpOptions(ts=(12345, tsecr))),
        P.encode_options(TcpOptions(ts=(12345, tsecr), sack=((1, 2),))), b"\x01\x08\x0a" + bytes(8) + b"\x01",
        b"\x08\x0a" + bytes(6),  # malformed
    ]))


class Run:
    """Feeds both engines and checks they agree."""

    def __init__(self, config: str, profile: BackendProfile | None) -> None:
        self.fast, self.slow = engines(config, profile)
        self.now = T0
        self.synacks: list[tuple[bytes, P.Packet]] = []  # (the SYN, our SYN-ACK)
        self.syns_to_server: list[P.Packet] = []
        self.updates: list[P.Packet] = []  # window updates: the proxy's side of open connections

    def feed(self, raw: bytes) -> list[Action]:
        got = self.fast.handle_raw(raw, self.now)
        want = self.slow.handle_raw(raw, self.now)
        assert got == want
        same_state(self.fast, self.slow)
        for action in want:
            if isinstance(action, Send) and action.kind == "synack":
                self.synacks.append((raw, P.parse(action.data)))
            if isinstance(action, Send) and action.kind == "syn":
                self.syns_to_server.append(P.parse(action.data))
            if isinstance(action, Send) and action.kind == "window_update":
                self.updates.append(P.parse(action.data))
        return got


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(sorted(CONFIGS)), profile=st.sampled_from(PROFILES), data=st.data())
def test_fast_path_gives_the_same_actions_and_counts(config: str, profile: BackendProfile | None,
                                                     data: st.DataObject) -> None:
    run = Run(config, profile)
    draw = data.draw
    for _ in range(draw(st.integers(1, 40))):
        step = draw(st.sampled_from(["syn"] * 6 + ["ack", "bogus_ack", "server_synack", "client_rst", "wait"]
                                    + ["client_data", "server_data"] * 2))
        if step == "syn":
            raw, _ = draw(syn_packets())
            run.feed(raw)
            if draw(st.integers(0, 3)) == 0:
                run.feed(raw)  # a retransmission, or a flood's repeats
        elif step == "ack" and run.synacks:
            syn_raw, synack = draw(st.sampled_from(run.synacks))
            syn = P.parse(syn_raw)
            tsecr = synack.options.ts[0] if synack.options.ts else 0
            payload = draw(st.sampled_from([b"", b"", b"GET / HTTP/1.0\r\n\r\n"]))
            run.feed(client_packet(syn.family, syn.src, syn.dst, syn.sport, syn.dport, syn.seq + 1 + draw(
                st.sampled_from([0, 0, 0, 1])), synack.seq + 1, ACK | (PSH if payload else 0),
                ack_options(draw, tsecr), payload))
        elif step == "bogus_ack":
            family = draw(st.sampled_from([4, 6]))
            flags = draw(st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | URG]))
            run.feed(client_packet(family, draw(st.sampled_from(CLIENTS[family])), SERVERS[family][0],
                                   draw(st.sampled_from(CLIENT_PORTS)), PORT, draw(st.integers(0, 2**32 - 1)),
                                   draw(st.integers(0, 2**32 - 1)), flags, ack_options(draw, 1),
                                   draw(st.sampled_from([b"", b"x" * 100]))))
        elif step == "server_synack" and run.syns_to_server:
            syn = draw(st.sampled_from(run.syns_to_server))
            run.feed(P.build(syn.family, syn.dst, syn.src, syn.dport, syn.sport, 5_000_000, syn.seq + 1, SYN | ACK,
                             65000, TcpOptions(mss=1460, wscale=draw(st.sampled_from([None, 2, 7])), sack_ok=True,
                                               ts=(99, syn.options.ts[0]) if syn.options.ts else None)))
        elif step == "client_rst" and run.syns_to_server:
            syn = draw(st.sampled_from(run.syns_to_server))
            run.feed(client_packet(syn.family, syn.src, syn.dst, syn.sport, syn.dport, syn.seq + 1, 0, RST, b""))
        elif step == "client_data" and run.updates:
            upd = draw(st.sampled_from(run.updates))  # server -> client: swap the ends
            flags = draw(st.sampled_from([ACK, ACK | PSH, ACK | FIN, RST, ACK | RST, SYN, SYN | ACK]))
            opts = draw(st.sampled_from([b"", P.encode_options(TcpOptions(ts=(700, 3), sack=((upd.seq + 5, upd.seq + 9),))),
                                         b"\x08\x0a" + bytes(6)]))
            run.feed(client_packet(upd.family, upd.dst, upd.src, upd.dport, upd.sport, upd.ack,
                                   upd.seq + draw(st.sampled_from([0, 1, 100])), flags, opts,
                                   draw(st.sampled_from([b"", b"more data"]))))
        elif step == "server_data" and run.syns_to_server:
            syn = draw(st.sampled_from(run.syns_to_server))
            flags = draw(st.sampled_from([ACK, ACK | PSH, ACK | FIN, RST, SYN | ACK]))
            run.feed(P.build(syn.family, syn.dst, syn.src, syn.dport, syn.sport, 5_000_001, syn.seq + 1, flags, 500,
                             draw(st.sampled_from([b"", P.encode_options(TcpOptions(ts=(120, 700)))])),
                             draw(st.sampled_from([b"", b"response"]))))
        elif step == "wait":
            run.now += draw(st.sampled_from([0.001, 0.5, 1.0, 11.0, 70.0, 200.0]))
            assert run.fast.handle_timer(run.now) == run.slow.handle_timer(run.now)
            same_state(run.fast, run.slow)


@pytest.mark.parametrize("family", [4, 6])
def test_a_plain_syn_and_a_bogus_ack_are_not_parsed(family: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the fast path: no Packet for a flood's SYN or bogus ACK."""
    fast, slow = engines("default", None)
    client, server = CLIENTS[family][0], SERVERS[family][0]
    syns = [client_packet(family, client, server, 40000, PORT, 7, 0, SYN, opts) for opts in (
        b"", P.encode_options(TcpOptions(mss=1460, sack_ok=True, ts=(1, 0), wscale=7)),
        b"\x02\x04\x05\xb4\x01\x03\x03\x08\x01\x01\x04\x02")]  # Windows' layout
    bogus = client_packet(family, client, server, 40000, PORT, 8, 5, ACK, P.encode_options(TcpOptions(ts=(1, 2))))
    want = [slow.handle_raw(raw, T0) for raw in (*syns, bogus)]

    def no_parse(data: bytes) -> P.Packet:
        raise AssertionError("parsed")

    monkeypatch.setattr(P, "parse", no_parse)
    assert [fast.handle_raw(raw, T0) for raw in (*syns, bogus)] == want
    assert want[-1] == [Drop("cookie_invalid")] and all(isinstance(out[1], Send) for out in want[:-1])
    same_state(fast, slow)


@pytest.mark.parametrize("raw", [
    bytes(IP(src="198.18.0.2", dst="198.18.1.2", options=[b"\x01\x01\x01\x00"]) / TCP(sport=40000, dport=PORT,
                                                                                       flags="S")),
    bytes(IPv6(src="fd53:5059::2", dst="fd53:5059:1::2") / IPv6ExtHdrDestOpt() / TCP(sport=40000, dport=PORT,
                                                                                     flags="S")),
    bytes(IP(src="198.18.0.2", dst="198.18.1.2") / TCP(sport=40000, dport=PORT, flags="S")) + b"\0" * 6,  # padded
    bytes(IP(src="198.18.0.2", dst="198.18.1.2", flags="MF") / TCP(sport=40000, dport=PORT, flags="S")),
    client_packet(6, CLIENTS[6][0], SERVERS[6][0], 40000, PORT, 1, 0, SYN, b"\x02\x03\x05\x00"),  # bad MSS length
    client_packet(4, CLIENTS[4][0], SERVERS[4][0], 40000, PORT, 1, 0, SYN, b"", b"TFO data"),
    client_packet(4, CLIENTS[4][0], SERVERS[4][0], 40000, PORT, 1, 0, SYN | ACK, b""),
    client_packet(4, CLIENTS[4][0], SERVERS[4][0], 40000, 81, 1, 0, SYN, b""),  # not protected
])
def test_unusual_packets_take_the_general_path(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = engines("default", None)
    want = slow.handle_raw(raw, T0)
    built = []
    for name in ("parse", "from_peeked"):
        def spy(*args: object, _real=getattr(P, name)) -> P.Packet:  # type: ignore[no-untyped-def]
            built.append(args)
            return _real(*args)
        monkeypatch.setattr(P, name, spy)
    assert fast.handle_raw(raw, T0) == want
    assert built  # a Packet was made: not answered by the SYN fast path
    same_state(fast, slow)


# ------------------------------------------------------------------ garbage


@settings(max_examples=3000, deadline=None)
@given(syn=syn_packets(), cut=st.integers(0, 100), flips=st.lists(st.tuples(st.integers(0, 99), st.integers(0, 255)),
                                                                   max_size=4), tail=st.binary(max_size=8))
def test_garbage_that_looks_like_a_syn_never_raises(syn: tuple[bytes, int], cut: int,
                                                    flips: list[tuple[int, int]], tail: bytes) -> None:
    raw = bytearray(syn[0])
    for pos, value in flips:
        if pos < len(raw):
            raw[pos] = value
    data = bytes(raw[: len(raw) - cut % (len(raw) + 1)] + tail)
    fast, slow = engines("tight_limits", None)
    got = fast.handle_raw(data, T0)
    assert got == slow.handle_raw(data, T0)
    same_state(fast, slow)


@settings(max_examples=1000, deadline=None)
@given(syn=syn_packets(), cut=st.integers(0, 100), flips=st.lists(st.tuples(st.integers(0, 99), st.integers(0, 255)),
                                                                   max_size=4))
def test_garbage_while_overloaded_never_raises(syn: tuple[bytes, int], cut: int, flips: list[tuple[int, int]]) -> None:
    """The overload check reads a SYN's key before any other parsing: it must cope with anything,
    and shed only a pure SYN that P.peek reads (both paths alike)."""
    raw = bytearray(syn[0])
    for pos, value in flips:
        if pos < len(raw):
            raw[pos] = value
    data = bytes(raw[: len(raw) - cut % (len(raw) + 1)])
    fast, slow = engines("default", None)
    fast.overloaded = slow.overloaded = True
    got = fast.handle_raw(data, T0)
    assert got == slow.handle_raw(data, T0)
    if got == [Drop("shed_overload")]:
        head = P.peek(data)
        assert head is not None and head[7] & (SYN | ACK | RST | FIN) == SYN
    same_state(fast, slow)


def test_garbage_with_fixed_lengths_never_raises() -> None:
    """Random bytes under valid IPv4/IPv6 and TCP length fields: the fast path's own checks."""
    rnd = random.Random(7)
    fast, slow = engines("default", None)
    for i in range(20000):
        family = 4 if i % 2 else 6
        syn = client_packet(family, CLIENTS[family][0], SERVERS[family][0], 40000, PORT, i, 0, SYN,
                            bytes(rnd.randrange(256) for _ in range(4 * rnd.randrange(11))))
        t = 20 if family == 4 else 40
        raw = bytearray(syn)
        for pos in rnd.sample(range(t + 20, len(raw)), min(3, len(raw) - t - 20)):
            raw[pos] = rnd.choice((0, 1, 2, 3, 4, 5, 8, 10, rnd.randrange(256)))
        data = bytes(raw)
        assert fast.handle_raw(data, T0 + i) == slow.handle_raw(data, T0 + i)
    same_state(fast, slow)


def test_synack_plans_stay_bounded_and_follow_profile_changes() -> None:
    """SYNs may name any server address (a gateway): the per-server cache is bounded,
    and a profile learned between two SYNs shows in the next SYN-ACK."""
    fast, slow = engines("default", None)
    for i in range(5000):
        server, client = bytes((198, 19, i >> 8, i & 0xFF)), bytes((198, 18, 100 + (i >> 8), i & 0xFF))
        raw = client_packet(4, client, server, 40000, PORT, i, 0, SYN, P.encode_options(TcpOptions(mss=1460)))
        assert fast.handle_raw(raw, T0) == slow.handle_raw(raw, T0)
    assert len(fast._synack_plans) <= 4096
    # Both paths answer SYNs through the same bounded cache and count its evictions.
    assert fast.stats.evicted.pop("synack_plans") >= 4096
    assert slow.stats.evicted.pop("synack_plans") >= 4096
    syn = client_packet(4, CLIENTS[4][0], SERVERS[4][0], 40000, PORT, 1, 0, SYN,
                        P.encode_options(TcpOptions(mss=1460, sack_ok=True, ts=(5, 0), wscale=7)))
    before = fast.handle_raw(syn, T0)
    assert before == slow.handle_raw(syn, T0)
    for eng in (fast, slow):
        eng.learn_profile(4, SERVERS[4][0], PORT, PROFILES[1])
    after = fast.handle_raw(syn, T0)
    assert after == slow.handle_raw(syn, T0) and after != before
    assert P.parse(after[1].data).options.mss == 1400  # type: ignore[union-attr]
    same_state(fast, slow)
